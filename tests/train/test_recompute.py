"""Activation recomputation: which blocks get wrapped, same loss and gradients, less memory kept."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.distill import Distill
from slimkit.quantize import QAT
from slimkit.train import Finetune, finetune
from slimkit.train.recompute import activation_bytes, recomputing, repeated_blocks
from tests.models import INPUTS, encoder, mlp, residual_cnn, tiny_task


def torch_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)


def hf_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=32))


@pytest.mark.parametrize(("factory", "blocks"), [
    (encoder, ["encoder.layer.0", "encoder.layer.1"]),              # ModuleList of blocks
    (torch_encoder, ["layers.0", "layers.1", "layers.2"]),          # nn.TransformerEncoderLayer
    pytest.param(hf_bert, [f"encoder.layer.{i}" for i in range(3)],  # HF BertLayer (not its attention parts)
                 marks=pytest.mark.slow),                            # importing transformers takes seconds
    (mlp, []),                                                      # a Sequential of single layers
    (residual_cnn, []),                                             # one block: nothing repeats
])
def test_repeated_blocks_are_found(factory: Callable[[], nn.Module], blocks: list[str]) -> None:
    assert repeated_blocks(factory()) == blocks


def _loss_and_grads(model: nn.Module, x: torch.Tensor, recompute: bool) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # dropout on: recomputation must replay the same masks
    with recomputing(model, recompute) as wrapped:
        assert len(wrapped) == (2 if recompute else 0)
        loss = F.cross_entropy(model.train()(x), torch.arange(x.shape[0]) % 4)  # (B, 4) logits
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def test_recompute_gives_the_same_loss_and_gradients() -> None:
    model = encoder()
    x = INPUTS[encoder](torch.Generator().manual_seed(0))   # (B, T) token ids
    loss0, grads0 = _loss_and_grads(model, x, recompute=False)
    loss1, grads1 = _loss_and_grads(model, x, recompute=True)
    assert abs(loss0 - loss1) <= 1e-6
    assert max(float((a - b).abs().max()) for a, b in zip(grads0, grads1)) <= 1e-6
    assert all("forward" not in vars(m) for m in model.modules())   # unwrapped after the block


def test_batchnorm_statistics_count_each_batch_once() -> None:
    """Recomputing a block runs its BatchNorm again; the running statistics must not move twice."""
    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(*(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
                               for _ in range(3))).train()

    x = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(1))   # (B, C, H, W)
    states = []
    for recompute in (False, True):
        m = model()
        with recomputing(m, recompute) as wrapped:
            assert len(wrapped) == (3 if recompute else 0)
            m(x).pow(2).mean().backward()
        states.append(m.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0] if "running" in k or "tracked" in k)


def test_recompute_keeps_less_for_the_backward() -> None:
    model = encoder().train()
    x = INPUTS[encoder](torch.Generator().manual_seed(0)).repeat(4, 4)   # (32, 48)
    y = torch.arange(x.shape[0]) % 4

    def step() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    plain, recomputed = activation_bytes(model, step, False), activation_bytes(model, step, True)
    assert plain["largest_block"] > 0 and recomputed["largest_block"] == 0
    # Two blocks hold nearly all activations: kept + one block recomputed <= 60% of kept without.
    peak = (recomputed["saved"] + plain["largest_block"]) / plain["saved"]
    assert peak <= 0.6, peak


def test_finetune_with_recompute_trains_to_the_same_weights() -> None:
    def trained(recompute: bool) -> dict[str, torch.Tensor]:
        task = tiny_task(encoder, batches=4)
        finetune(task.model, task, steps=3, lr=1e-3, progress=False, recompute=recompute)
        return task.model.state_dict()

    a, b = trained(False), trained(True)
    # AdamW divides by sqrt(v): entries whose gradient is 0 up to rounding (attention key biases, which
    # softmax ignores) move by lr·sign(noise) either way, so compare the rest.
    diffs = {k: float((a[k] - b[k]).abs().max()) for k in a if not k.endswith("key.bias")}
    assert max(diffs.values()) <= 1e-5


@pytest.mark.parametrize("make", [
    lambda r: Finetune(steps=2, recompute=r),
    lambda r: Distill(steps=2, recompute=r),
    lambda r: QAT(steps=2, recompute=r, evaluate=False),
], ids=["Finetune", "Distill", "QAT"])
@pytest.mark.parametrize("recompute", [False, True])
def test_configs_recompute_their_blocks(make: Callable[[bool], object], recompute: bool) -> None:
    """A layer inside a block runs once per training step, twice when the backward recomputes it."""
    task = tiny_task(encoder, batches=4)
    calls = [0]

    def count(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        calls[0] += module.training  # training forwards only (not the teacher, not evaluation)

    task.model.encoder.layer[0].norm1.register_forward_hook(count)
    config = make(recompute)
    assert config.to_dict()["recompute"] is recompute
    config.apply_to(task.model, task)
    assert calls[0] == (4 if recompute else 2)
