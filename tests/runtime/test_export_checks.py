"""ONNX export refuses data-dependent control flow, and every ORT session is checked against torch
on the example inputs before use; ``backend="auto"`` falls back to torch with the reason logged."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import slimkit as sk  # noqa: E402
from slimkit.core.errors import SlimkitError  # noqa: E402
from slimkit.runtime import build, ort_plan  # noqa: E402
from slimkit.runtime.ort import build_ort  # noqa: E402
from slimkit.runtime.ort_inspect import output_mismatch  # noqa: E402
from tests.conftest import sqnr_db  # noqa: E402


class SignBranch(nn.Module):
    """A data-dependent ``if``: the trace keeps the branch the example took."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = nn.Linear(8, 8), SignBranch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.stem(x))


class MaxScale(nn.Module):
    """A tensor value turned into a Python float: the example's maximum is baked in as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) / float(x.abs().max())


class ShapeLoop(nn.Module):
    """Python control flow on shapes only (a loop over the batch, a size check): safe to trace."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)                 # (B, 8)
        for i in range(x.shape[0]):
            y = y + 0.1 * x[i]
        return y * 2 if x.shape[-1] > 4 else y


class ParameterBranch(nn.Module):
    """A branch on a parameter, not the inputs: constant for the exported model, so it exports."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.gate = nn.Linear(8, 8), nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * 2 if self.gate > 0 else self.fc(x)


class ExportDiffers(nn.Module):
    """Computes something else when exported (its second output is flipped): only the comparison sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.fc(x))
        out = self.head(h)
        return h, (out.flip(-1) if torch.onnx.is_in_onnx_export() else out)


def _line(cls: type, text: str) -> str:
    """``test_export_checks.py:<n>``: where ``text`` is in ``cls``'s source."""
    lines, start = inspect.getsourcelines(cls)
    return f"test_export_checks.py:{start + next(i for i, s in enumerate(lines) if text in s)}"


REFUSED = [  # (model, the site the error names)
    (SignBranch, lambda: f"at {_line(SignBranch, 'if x.sum() > 0')} in forward (data-dependent control flow)"),
    (Nested, lambda: f"at {_line(SignBranch, 'if x.sum() > 0')} in forward (module 'block')"),
    (MaxScale, lambda: f"at {_line(MaxScale, 'float(x.abs().max())')} in forward"),
]


@pytest.mark.parametrize("make,site", REFUSED, ids=["if-on-sum", "nested-module", "float-of-max"])
def test_data_dependent_control_flow_refuses_the_export_naming_the_line(make, site, tmp_path):
    torch.manual_seed(0)
    with pytest.raises(SlimkitError) as err:
        build_ort(make().eval(), (torch.randn(4, 8),), workdir=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{make.__name__} turns tensor data into a Python value")
    assert site() in msg and msg.endswith("run the model with backend='torch' (or write the branch as a tensor op, "
                                          "torch.where)")
    assert not (tmp_path / "float.onnx").exists()  # nothing half-checked is left to be used


@pytest.mark.parametrize("make", [ShapeLoop, ParameterBranch], ids=["shape-loop", "parameter-branch"])
def test_shape_and_parameter_control_flow_exports_and_matches_torch(make):
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(4, 8)
    run = build_ort(model, (x,))
    with torch.no_grad():
        want = model(x)
    got = run(x)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    assert output_mismatch([want], [got], quantized=False) == ""


def test_an_onnx_graph_that_differs_from_torch_is_refused_naming_the_output(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(SlimkitError) as err:
        build_ort(ExportDiffers().eval(), (torch.randn(4, 8),), workdir=tmp_path)
    msg = str(err.value)
    assert msg.startswith("the ONNX Runtime graph of ExportDiffers does not compute what torch does on the example "
                          "inputs: output 1 differs by") and "(float allows 0.001, 0.9999)" in msg


def _int8(model: nn.Module) -> nn.Module:
    return sk.apply(model.eval(), sk.quantize.Int8(), None)  # dynamic int8: auto picks onnxruntime


@pytest.mark.parametrize("make,why", [
    (SignBranch, "turns tensor data into a Python value"),
    (ExportDiffers, "output 1 has cosine"),
])
def test_auto_falls_back_to_torch_with_the_reason_and_an_explicit_backend_raises(make, why, caplog):
    torch.manual_seed(0)
    q, x = _int8(make()), torch.randn(4, 8)
    with caplog.at_level("WARNING", logger="slimkit.runtime"):
        run = build(q, "auto", (x,))
    assert run is q  # the torch model itself
    assert "backend auto: onnxruntime cannot run" in caplog.text and why in caplog.text
    with pytest.raises(SlimkitError, match=why):
        build(q, "onnxruntime", (x,))


MLP = lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))  # noqa: E731


@pytest.mark.parametrize("config", [sk.quantize.Int8(), sk.quantize.Int8(activations="static")],
                         ids=["dynamic", "static"])
def test_quantized_models_pass_the_int8_check_with_measured_closeness(config):
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(32, 16)
    task = sk.Task(name="mlp", model=model, example=(x,), metric=lambda m, d: {"score": 1.0}, eval=[],
                   calib=[(torch.randn(32, 16),) for _ in range(4)])
    q = sk.apply(model, config, task)
    run = build(q, "onnxruntime", (x,))
    exported, _ = ort_plan(q)  # the float model with the dequantized weights: what the check compares with
    with torch.no_grad():
        want, torch_q = exported(x), q(x)
    got = run(x)
    assert float(nn.functional.cosine_similarity(want.flatten(), got.flatten(), dim=0)) >= 0.999  # bound: 0.95
    assert sqnr_db(torch_q, got) >= 30.0
    assert output_mismatch([want], [got], quantized=True) == ""


@pytest.mark.parametrize("reference,got,quantized,why", [
    ([torch.ones(4)], [torch.ones(4) * 1.0005], False, ""),
    ([torch.ones(4)], [torch.ones(4) * 1.01], False, "output 0 differs by 0.01 of its largest value"),
    ([torch.ones(4)], [torch.ones(4) * 1.01], True, ""),
    ([torch.tensor([1.0, -1.0])], [torch.tensor([-1.0, 1.0])], True, "output 0 has cosine -1.0000"),
    ([torch.ones(2, 3)], [torch.ones(3, 2)], False, "output 0 has shape (3, 2), torch's (2, 3)"),
    ([torch.ones(2), torch.ones(2)], [torch.ones(2)], False, "1 outputs where torch returns 2"),
    ([torch.ones(2)], [torch.tensor([1.0, float("nan")])], True, "output 0 is not finite where torch's is"),
    ([torch.zeros(3)], [torch.zeros(3)], False, ""),
])
def test_output_mismatch_bounds(reference, got, quantized, why):
    result = output_mismatch(reference, got, quantized)
    assert result.startswith(why) if why else result == ""


def test_a_measured_candidate_the_exporter_refuses_runs_on_torch_and_says_so():
    from slimkit.pipeline.candidate import measure_candidate

    torch.manual_seed(0)
    model = SignBranch().eval()
    x = torch.randn(4, 8) + 1.0  # positive sum: the trace would bake in the first branch
    task = sk.Task(name="sign", model=model, example=(x,), eval=[x, -x],
                   metric=lambda run, xs: float(sum(torch.as_tensor(run(v)).abs().sum() for v in xs)))
    q = sk.apply(model, sk.quantize.Int8(), task)  # int8 dynamic: auto would pick onnxruntime
    c = measure_candidate("int8", q, [], task)
    assert c.backend == "torch" and isinstance(c.runnable, nn.Module)  # the fallback, not a wrong ONNX graph
    with torch.inference_mode():
        assert torch.equal(c.runnable(-x), q(-x))  # the other branch still runs
