"""Block-by-block calibration: the same statistics as one whole-model pass when float outputs are
passed on, outputs as close as before when the compressed blocks' outputs are (GPTQ's convention),
and one block's statistics alive at a time."""

from __future__ import annotations

import copy
import weakref
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

from slimkit.calibrate.blockwise import calibrate_blockwise
from slimkit.calibrate.obs import hessian_hooks, input_hessians
from slimkit.calibrate.ranges import observer_hooks
from slimkit.core.editing import set_submodule
from slimkit.core.errors import SlimkitError
from slimkit.core.task import Task
from slimkit.measure.closeness import sqnr_db
from slimkit.prune.nm import NM, is_nm, prune_nm, sparsegpt_nm
from slimkit.quantize import Int8, WeightOnly
from slimkit.quantize.gptq import gptq_int4
from slimkit.quantize.int8 import quantize_int8
from slimkit.quantize.modules import QuantLinear
from slimkit.quantize.weight_only import quantize_weight_only
from tests.models import TinyEncoder

LAYERS_PER_BLOCK = 6  # query, key, value, output, intermediate, out


class Scaled(TinyEncoder):
    """Something between the blocks (x * 0.5): block k+1's input is not block k's output."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)  # (B, T, C)
        for block in self.encoder.layer:
            x = block(x) * 0.5
        return self.classifier(x.mean(1))


class TorchEncoder(nn.Module):
    """nn.TransformerEncoder: its layers get the padding mask as a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(64, 32)
        self.body = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), num_layers=3,
                                          enable_nested_tensor=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.body(self.embeddings(input_ids), src_key_padding_mask=input_ids == 0)  # (B, T, C)


class MLP(nn.Module):
    """No repeated blocks: the whole-model path."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(64, 32)
        self.net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.net(self.embeddings(input_ids))


def _model(cls: Callable[..., nn.Module], seed: int = 0, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    return cls(**kwargs).eval()


def _batches(seed: int, n: int = 8) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 64, (8, 12), generator=g),) for _ in range(n)]  # (B, T) token ids


def _task(model: nn.Module, calib: list) -> Task:
    return Task(name="tiny", model=model, example=calib[0], metric=None, eval=[], calib=calib)


def _hidden(model: TinyEncoder, ids: torch.Tensor) -> torch.Tensor:
    x = model.embeddings(ids)
    for block in model.encoder.layer:
        x = block(x)
    return x  # (B, T, C): the blocks' output, finer than 4 pooled logits


def _sqnr(base: nn.Module, model: nn.Module, batches: list) -> float:
    with torch.no_grad():
        ref = torch.cat([_hidden(base, *b) for b in batches])
        out = torch.cat([_hidden(model, *b) for b in batches])
    return sqnr_db(ref, out)


def _compressing(model: nn.Module, kind: str) -> Callable[[dict], None]:
    """The per-block step of GPTQ int4 g32 or SparseGPT 2:4, applied to ``model`` in place."""
    def apply(hessians: dict[str, torch.Tensor]) -> None:
        for name, h in hessians.items():
            layer = model.get_submodule(name)
            if kind == "gptq":
                int4 = gptq_int4(layer.weight, h, 32, act_order=False)  # the walk is under test, not act-order
                set_submodule(model, name, QuantLinear.from_float(layer, bits=4, group_size=32, int4=int4))
            else:
                with torch.no_grad():
                    layer.weight.copy_(sparsegpt_nm(layer.weight, h)[0])
    return apply


def _compressed(base: nn.Module, calib: list, kind: str, **walk: Any) -> nn.Module:
    model = copy.deepcopy(base)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder")]
    calibrate_blockwise(model, names, calib, hessian_hooks, _compressing(model, kind), **walk)
    return model


@pytest.mark.parametrize("kind", ["gptq", "sparsegpt"])
def test_passing_on_float_outputs_gives_exactly_the_whole_model_result(kind: str) -> None:
    base, calib = _model(TinyEncoder, layers=3), _batches(10, n=4)
    blockwise = _compressed(base, calib, kind, propagate="float")
    whole = _compressed(base, calib, kind, blocks=[])
    for (name, a), (_, b) in zip(blockwise.state_dict().items(), whole.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.slow  # 3 seeds x 6 blocks x 2 paths of GPTQ sweeps
@pytest.mark.parametrize(("kind", "mean_gain_db", "worst_db"), [
    # mean SQNR of the 6 blocks' output over 3 seeds, whole-model pass -> block by block (compressed
    # outputs passed on): GPTQ int4 g32 28.93 -> 29.09 dB, SparseGPT 2:4 12.33 -> 12.15 dB.
    ("gptq", 0.0, 0.05),
    ("sparsegpt", -0.4, 0.5),
])
def test_passing_on_compressed_outputs_keeps_the_outputs_as_close(kind: str, mean_gain_db: float,
                                                                  worst_db: float) -> None:
    gains = []
    for seed in range(3):
        base, calib = _model(TinyEncoder, seed, layers=6), _batches(seed + 10)
        whole = _sqnr(base, _compressed(base, calib, kind, blocks=[]), calib)
        sequential = _sqnr(base, _compressed(base, calib, kind), calib)
        assert sequential > whole - worst_db
        gains.append(sequential - whole)
    assert sum(gains) / len(gains) >= mean_gain_db


@pytest.mark.parametrize(("factory", "exact"), [(TinyEncoder, True), (TorchEncoder, True), (MLP, True), (Scaled, False)])
@pytest.mark.parametrize("calibration", ["minmax", "mse"])
def test_static_int8_takes_the_whole_model_ranges(factory: Callable[..., nn.Module], exact: bool,
                                                  calibration: str) -> None:
    """Float outputs passed on (int8's convention): every range and integer equals the one-pass result,
    with keyword inputs (masks) and with no blocks at all. Where something sits between the blocks
    (``Scaled``), a later block's inputs come from a forward through the blocks quantized already:
    its ranges move by under 0.1%."""
    base, calib = _model(factory), _batches(3, n=4)
    config = Int8(activations="static", calibration=calibration, symmetric=False)
    blockwise = quantize_int8(copy.deepcopy(base), config, _task(base, calib))
    whole = quantize_int8(copy.deepcopy(base), config, _task(base, calib), blockwise=False)
    a, b = blockwise.state_dict(), whole.state_dict()
    assert list(a) == list(b) and any(k.endswith("qweight") for k in a)
    for key in a:
        if exact or not key.startswith("encoder.layer.1"):
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=0)


@pytest.mark.parametrize(("factory", "blocks", "per_block", "captures"), [
    (TinyEncoder, 4, LAYERS_PER_BLOCK, 0),  # chained: each block's output is the next one's input
    (Scaled, 4, LAYERS_PER_BLOCK, 3),       # not chained: each later block's inputs from a forward up to it
    (TorchEncoder, 3, 2, 0),                # linear1, linear2 (attention reads its weights directly)
    (MLP, 0, 2, 0),
])
def test_one_blocks_statistics_are_alive_at_a_time(factory: Callable[..., nn.Module], blocks: int, per_block: int,
                                                   captures: int) -> None:
    model = _model(factory, layers=4) if factory in (TinyEncoder, Scaled) else _model(factory)
    calib = _batches(5, n=3)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "out_proj" not in n]
    reference = input_hessians(model, names, calib)
    alive: list[weakref.ref] = []
    held = []

    def apply(hessians: dict[str, torch.Tensor]) -> None:
        held.append(len(hessians) + sum(r() is not None for r in alive))  # this block's + any earlier still alive
        for name, h in hessians.items():
            torch.testing.assert_close(h, reference[name], rtol=1e-5, atol=1e-6)  # float passed on: same Hessians
            alive.append(weakref.ref(h))

    walk = calibrate_blockwise(model, names, calib, hessian_hooks, apply, propagate="float")
    assert len(walk.blocks) == blocks and walk.captures == captures
    # one entry per apply: its own statistics plus any earlier ones still alive (none ever are)
    assert held == [len(walk.outside)] * bool(walk.outside) + [per_block] * blocks
    assert walk.max_held == (per_block if blocks else len(names))


def test_weight_only_gptq_and_sparsegpt_through_their_configs() -> None:
    """The handlers walk the blocks by default: int4 layers, 2:4 masks and outputs within 0.5 dB of
    the whole-model pass (GPTQ int4 g32: 29.3 dB either way on this model)."""
    base, calib = _model(TinyEncoder, layers=4), _batches(10)
    task = _task(base, calib)
    gptq = WeightOnly(bits=4, group_size=32, method="gptq")
    q_walk = quantize_weight_only(copy.deepcopy(base), gptq, task)
    q_whole = quantize_weight_only(copy.deepcopy(base), gptq, task, blockwise=False)
    assert sum(isinstance(m, QuantLinear) for m in q_walk.modules()) == 4 * LAYERS_PER_BLOCK + 1
    assert _sqnr(base, q_walk, calib) > _sqnr(base, q_whole, calib) - 0.5 > 20.0
    p_walk = prune_nm(copy.deepcopy(base), NM(method="sparsegpt"), task)
    p_whole = prune_nm(copy.deepcopy(base), NM(method="sparsegpt"), task, blockwise=False)
    assert all(is_nm(m.weight) for n, m in p_walk.named_modules() if isinstance(m, nn.Linear))
    assert _sqnr(base, p_walk, calib) > _sqnr(base, p_whole, calib) - 0.5 > 5.0


def test_bad_inputs_are_refused_in_one_line() -> None:
    model = _model(TinyEncoder)
    with pytest.raises(SlimkitError, match="propagate"):
        calibrate_blockwise(model, ["classifier"], _batches(1), hessian_hooks, lambda s: None, propagate="x")
    with pytest.raises(SlimkitError, match="empty"):
        calibrate_blockwise(model, ["classifier"], [], hessian_hooks, lambda s: None)
    with pytest.raises(SlimkitError, match="never reached"):  # a layer the forward does not run
        model.encoder.layer[0].unused = nn.Linear(32, 32)
        calibrate_blockwise(model, ["encoder.layer.0.unused"], _batches(1), hessian_hooks, lambda s: None)
    observers = {}
    calibrate_blockwise(model, ["classifier"], _batches(1), observer_hooks, observers.update)
    assert observers["classifier"].count == 8 * 8 * 32  # 8 batches of 8 pooled (32,) vectors
