"""BatchNorm folding: identical outputs (<= 1e-5) on the mnist CNN and HF CNN families, safe refusals, reload."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.architecture import Fuse, compiled, find_pairs, fold_batchnorm
from slimkit.graph.batchnorm import FoldedNorm
from tests.prune.hf_tiny import tiny


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine terms, so a wrong fold cannot hide."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=gen) * 0.5 + 1)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
    return model.eval()


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def test_mnist_cnn_folds_every_bn_and_keeps_outputs(mnist_task, tmp_path):
    x = mnist_task.eval[0][0][0]  # (256, 1, 28, 28)
    folded, names = fold_batchnorm(mnist_task.model, (x[:1],))
    assert names == ["1", "5", "9"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.inference_mode():
        ref, got = mnist_task.model(x), folded(x)
    assert (ref - got).abs().max().item() <= 1e-5
    assert mnist_task.evaluate(folded)["score"] == mnist_task.evaluate()["score"]
    sk.save(folded, tmp_path / "folded")
    back = sk.load(tmp_path / "folded")
    assert isinstance(back[1], FoldedNorm)
    with torch.inference_mode():
        assert torch.equal(back(x), got)


@pytest.mark.parametrize("family", ["resnet", "mobilenet_v1", "mobilenet_v2", "efficientnet", "regnet"])
def test_hf_cnn_families_fold_to_the_same_logits(family):
    model, example = tiny(family)
    _randomize_bn(model)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    folded, names = fold_batchnorm(model, example)
    with torch.inference_mode():
        ref, got = _logits(model(*example)), _logits(folded(*example))
    scale = max(1.0, ref.abs().max().item())
    assert (ref - got).abs().max().item() <= 1e-5 * scale
    # EfficientNet puts padding modules between some depthwise convs and their BN: those stay unfolded
    assert len(names) >= (0.6 if family == "efficientnet" else 1.0) * n_bn


def test_linear_batchnorm1d_folds():
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Linear(12, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 3)))
    x = torch.randn(16, 12)
    folded, names = fold_batchnorm(model, (x,))
    assert names == ["1"]
    with torch.inference_mode():
        assert (model(x) - folded(x)).abs().max().item() <= 1e-5


class _SharedConv(nn.Module):
    """The conv's output feeds the BN *and* a residual: folding would change the residual."""

    def __init__(self, traceable: bool) -> None:
        super().__init__()
        self.conv, self.bn, self.traceable = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), traceable

    def forward(self, x):
        y = self.conv(x)
        if not self.traceable and bool(y.sum() > -1e30):  # data-dependent Python: torch.fx cannot trace this
            return self.bn(y) + y
        return self.bn(y) + y


@pytest.mark.parametrize("traceable", [True, False])
def test_conv_output_used_twice_is_not_folded(traceable):
    torch.manual_seed(0)
    model = _randomize_bn(_SharedConv(traceable))
    x = torch.randn(2, 3, 8, 8)
    folded, names = fold_batchnorm(model, (x,))
    assert names == []
    with torch.inference_mode():
        assert torch.equal(model(x), folded(x))


def test_fuse_config_round_trips_and_rejects_unknown_compiler(mnist_task):
    cfg = Fuse(compile="onnxruntime")
    assert sk.BaseConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(sk.SlimkitError, match="compile='tensorrt'"):
        Fuse(compile="tensorrt")
    with pytest.raises(sk.SlimkitError, match="example inputs"):
        sk.apply(mnist_task.model, Fuse(), None)


def test_fused_onnxruntime_build_runs_fused_conv_kernels(mnist_task):
    fused = sk.apply(mnist_task.model, Fuse(compile="onnxruntime"), mnist_task)
    x = mnist_task.eval[0][0][0]
    run = compiled(fused, mnist_task.example)
    # ORT's NCHWc layout fuses the ReLUs into its Conv kernels; the BNs are already gone
    assert run.kernels["Conv"] == 3 and run.kernels["Relu"] == 0 and run.kernels["BatchNormalization"] == 0
    with torch.inference_mode():
        assert (run(x) - mnist_task.model(x)).abs().max().item() <= 1e-4
    assert find_pairs(fused, mnist_task.example) == []
