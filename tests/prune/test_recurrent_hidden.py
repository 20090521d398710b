"""LSTM / GRU hidden-size pruning: exact (the masked original) where the readers are known, kept with the reason otherwise."""

import copy

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.core.record import last_record
from slimkit.prune.channels import MACS_TOLERANCE
from slimkit.prune.recurrent_hidden import prune_recurrent
from tests.models import sequence, tiny_task


class LastStep(nn.Module):
    """LSTM output at the last step -> Linear (a keyword spotter's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 32, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 8)
        return self.head(self.lstm(x)[0][:, -1])


class SpeakerEncoder(nn.Module):
    """Three stacked LSTM layers, last layer's h_n -> embedding (GE2E's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 32, 3, batch_first=True)
        self.proj = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(x)
        return nn.functional.normalize(self.proj(h[-1]), dim=-1)  # (B, 16)


class BiStack(nn.Module):
    """Bidirectional two-layer GRU -> GRU -> flattened over time -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(8, 32, 2, bidirectional=True)
        self.gru2 = nn.GRU(64, 16)
        self.head = nn.Linear(16 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (T=6, B, 8)
        out, _ = self.gru(x)                               # (T, B, 64)
        out, _ = self.gru2(out)                            # (T, B, 16)
        return self.head(out.permute(1, 0, 2).flatten(1))  # (B, 4)


class ConvReader(nn.Module):
    """LSTM -> transpose -> Conv1d over time (a tagger's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 32, batch_first=True)
        self.conv = nn.Conv1d(32, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.lstm(x)[0].transpose(1, 2))  # (B, 4, T - 2)


class Normalized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 32, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.lstm(x)[0][:, -1]))


class ReturnsStates(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 32, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


class OwnState(nn.Module):
    """Starts the LSTM from a state the model's code sizes by a constant: the hidden size cannot change."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 32, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = x.new_zeros(1, x.shape[0], 32)
        return self.head(self.lstm(x, (h0, h0))[0][:, -1])


class Cell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(8, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 8)
        h = c = x.new_zeros(x.shape[0], 32)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


def _masked(model: nn.Module, name: str, keep: list[int]) -> nn.Module:
    """The original with every other unit's gate rows zeroed: such a unit's state stays exactly zero."""
    masked = copy.deepcopy(model)
    layer = masked.get_submodule(name)
    gates = 4 if isinstance(layer, nn.LSTM) else 3
    drop = [j for j in range(layer.hidden_size) if j not in keep]
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            p.view(gates, layer.hidden_size, -1)[:, drop] = 0
    return masked


PRUNED = [  # (model, input shape, {layer: hidden size after pruning half})
    (LastStep, (3, 10, 8), {"lstm": 16}),
    (SpeakerEncoder, (3, 10, 8), {"lstm": 16}),
    (BiStack, (6, 3, 8), {"gru": 16, "gru2": 8}),
    (ConvReader, (3, 10, 8), {"lstm": 16}),
]


@pytest.mark.parametrize("factory,shape,widths", PRUNED, ids=[p[0].__name__ for p in PRUNED])
def test_pruned_recurrent_layers_equal_the_masked_original(factory, shape, widths):
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(*shape)
    original = copy.deepcopy(model)
    result = prune_recurrent(model, 0.5, (x,), ignored=set())
    assert {n: len(k) for n, k in result.kept.items()} == widths
    assert result.skipped == {}
    for name, width in widths.items():
        assert model.get_submodule(name).hidden_size == width
    assert sum(p.numel() for p in model.parameters()) < 0.45 * sum(p.numel() for p in original.parameters())
    masked = original
    for name, keep in result.kept.items():
        masked = _masked(masked, name, keep)
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), atol=1e-5)


KEPT = [  # (model, input shape, layer, reason)
    (Normalized, (3, 10, 8), "lstm", "LayerNorm"),
    (ReturnsStates, (3, 10, 8), "lstm", "model's output"),
    (OwnState, (3, 10, 8), "lstm", "breaks the forward pass"),
    (Cell, (3, 10, 8), "cell", "carries its state"),
]


@pytest.mark.parametrize("factory,shape,layer,reason", KEPT, ids=[k[0].__name__ for k in KEPT])
def test_recurrent_layers_that_cannot_be_proven_safe_keep_their_size_with_the_reason(factory, shape, layer, reason):
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        before = model(x)
    result = prune_recurrent(model, 0.5, (x,), ignored=set())
    assert result.kept == {}
    assert reason in result.skipped[layer]
    assert model.get_submodule(layer).hidden_size == 32
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_channel_pruning_reaches_a_macs_target_through_the_lstm_and_reloads(tmp_path):
    task = tiny_task(sequence)
    pruned = sk.apply(task.model, sk.prune.Channels(macs_ratio=0.5), task)
    record = last_record(pruned)
    assert abs(record.macs[1] / record.macs[0] - 0.5) <= MACS_TOLERANCE
    assert record.layers["lstm"][1] < 32
    sk.save(pruned, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(sk.load(tmp_path / "m")(*task.example), pruned(*task.example))
