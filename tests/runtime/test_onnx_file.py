"""The measured ONNX file is kept beside the artifact and runs with onnxruntime and numpy alone."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnxruntime")

import slimkit as sk  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from slimkit.cli import app  # noqa: E402
from slimkit.pipeline.recipe import Recipe  # noqa: E402
from slimkit.pipeline.run import run_recipe  # noqa: E402
from slimkit.runtime import build  # noqa: E402
from slimkit.runtime.onnx_file import ONNX_FILE, SIDECAR, keep_onnx  # noqa: E402

runner = CliRunner()

#: Runs model.onnx in a fresh interpreter where importing torch or slimkit fails: only onnxruntime + numpy.
BARE = """
import sys, json, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "slimkit"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import numpy as np, onnxruntime as ort
path, inputs = sys.argv[1], np.load(sys.argv[2])
session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
feeds = {i.name: inputs[i.name] for i in session.get_inputs()}
np.save(sys.argv[3], session.run(None, feeds)[0])
"""


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).eval()


def _run_bare(onnx_path, feeds: dict[str, np.ndarray], tmp_path) -> np.ndarray:
    np.savez(tmp_path / "in.npz", **feeds)
    subprocess.run([sys.executable, "-c", BARE, str(onnx_path), str(tmp_path / "in.npz"), str(tmp_path / "out.npy")],
                   check=True, timeout=120)
    return np.load(tmp_path / "out.npy")


#: every scheme that has a file: int8 (QDQ), weight-only int4 / int8 (MatMulNBits; the conv as int8 + DequantizeLinear)
SCHEMES = [lambda: sk.quantize.Int8(), lambda: sk.quantize.Int8(activations="static"),
           lambda: sk.quantize.WeightOnly(bits=4, group_size=32), lambda: sk.quantize.WeightOnly(bits=8), lambda: None]


@pytest.mark.parametrize("config", SCHEMES, ids=["dynamic", "static", "w4", "w8", "float"])
def test_the_kept_file_gives_the_measured_outputs_without_torch(config, tmp_path):
    model, x = _net(), torch.randn(4, 3, 8, 8)
    task = sk.Task(name="t", model=model, example=(x,), eval=[], metric=lambda run, data: 0.0,
                   calib=[(torch.randn(4, 3, 8, 8),) for _ in range(4)])
    q = sk.apply(model, config(), task) if config() is not None else model
    runnable = build(q, "onnxruntime", (x,), threads=1)
    path = keep_onnx(runnable, tmp_path / "art")
    sidecar = json.loads((tmp_path / "art" / SIDECAR).read_text())
    assert path == tmp_path / "art" / ONNX_FILE and [i["name"] for i in sidecar["inputs"]] == ["input"]
    assert isinstance(sidecar["inputs"][0]["shape"][0], str)  # the batch axis is dynamic, named
    y = torch.randn(7, 3, 8, 8)  # another batch size than the example's
    got = _run_bare(path, {"input": y.numpy()}, tmp_path)
    assert np.abs(got - runnable(y).numpy()).max() < 1e-5  # the same file the measured session ran
    assert sidecar["dynamic_axes"] == {"input": {"0": "batch"}, "output": {"0": "batch"}} and sidecar["measured"]
    assert sidecar["quantization"] == getattr(runnable, "mode")
    if sidecar["quantization"] == "none":  # weight-only: every Linear on MatMulNBits, each layer's storage said
        assert sidecar["op_types"]["MatMulNBits"] == 1 and set(sidecar["weights"]) == {"0", "3"}
        assert "DequantizeLinear" in sidecar["weights"]["0"] and "MatMulNBits" in sidecar["weights"]["3"]


def test_binary_and_ternary_files_run_without_torch_and_say_why_they_are_float(tmp_path):
    from slimkit.quantize.extreme_modules import ExtremeConv2d, ExtremeLinear

    model, x = _net(), torch.randn(4, 3, 8, 8)
    model[0] = ExtremeConv2d.from_float(model[0], "ternary").convert()
    model[3] = ExtremeLinear.from_float(model[3], "binary").convert()
    runnable = build(model, "onnxruntime", (x,), threads=1)
    path = keep_onnx(runnable, tmp_path / "art")
    sidecar = json.loads((tmp_path / "art" / SIDECAR).read_text())
    assert "2-bit weights" in sidecar["kept_float"]["0"] and "1-bit weights" in sidecar["kept_float"]["3"]
    got = _run_bare(path, {"input": x.numpy()}, tmp_path)
    with torch.inference_mode():
        assert np.abs(got - model(x).numpy()).max() < 1e-5  # the same values, unpacked


def test_a_torch_served_model_keeps_no_onnx_file_and_an_old_one_is_removed(tmp_path):
    (tmp_path / ONNX_FILE).write_bytes(b"stale")
    assert keep_onnx(_net(), tmp_path) is None and not (tmp_path / ONNX_FILE).exists()


def test_a_command_run_on_onnx_runtime_leaves_model_onnx_in_its_out(digits_task, tmp_path, one_thread):
    recipe = Recipe.from_steps([sk.quantize.Int8().to_dict()], task="digits")
    result = run_recipe(digits_task, recipe, tmp_path, title="t", threads=1)
    assert result.candidates[-1].backend == "onnxruntime"
    x = digits_task.example[0]
    got = _run_bare(tmp_path / ONNX_FILE, {"input": x.numpy()}, tmp_path)
    with torch.inference_mode():
        reference = result.candidates[-1].runnable(x).numpy()
    assert np.abs(got - reference).max() < 1e-5
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["onnx"] == str(tmp_path / ONNX_FILE)
    # slimkit export: the kept file from the run directory; rebuilt from the artifact with the task's inputs
    copied = runner.invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "x" / "copy.onnx")])
    assert copied.exit_code == 0, copied.output
    assert (tmp_path / "x" / "copy.onnx").read_bytes() == (tmp_path / ONNX_FILE).read_bytes()
    rebuilt = runner.invoke(app, ["export", str(tmp_path / "model"), "--task", "digits", "--out",
                                  str(tmp_path / "x" / "again.onnx")])
    assert rebuilt.exit_code == 0, rebuilt.output
    again = _run_bare(tmp_path / "x" / "again.onnx", {"input": x.numpy()}, tmp_path)
    assert np.abs(again - reference).max() < 1e-5


@pytest.mark.parametrize("args,message", [
    (["{run}", "--out", "{tmp}/m.txt"], "does not end in .onnx"),
    (["{tmp}/nothing", "--out", "{tmp}/m.onnx"], "does not exist"),
    (["{run}/model", "--out", "{tmp}/m.onnx"], "needs example inputs"),
    (["{run}", "--format", "tflite", "--out", "{tmp}/m.onnx"], "--format 'tflite' is not supported"),
    (["{run}/model", "--task", "digits", "--out", "{tmp}/m.onnx"], "ONNX Runtime cannot run it"),
])
def test_export_refusals_are_one_line(args, message, digits_task, tmp_path):
    from slimkit.core.editing import set_submodule
    from slimkit.quantize.modules import QuantLinear

    run = tmp_path / "mixed"  # weight-only beside a dynamic int8 layer: served by torch, no ONNX Runtime form
    model = sk.apply(digits_task.model, sk.quantize.WeightOnly(bits=8), digits_task)
    last = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)][-1]
    set_submodule(model, last, QuantLinear.from_float(model.get_submodule(last).to_float(), activations="dynamic"))
    sk.save(model, run / "model")
    result = runner.invoke(app, ["export", *(a.format(run=run, tmp=tmp_path) for a in args)])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.txt").exists()


def test_export_of_a_torch_served_artifact_builds_the_file_and_says_it_was_not_measured(digits_task, tmp_path):
    sk.save(digits_task.model, tmp_path / "model", extra={"backend": "torch"})
    result = runner.invoke(app, ["export", str(tmp_path / "model"), "--task", "digits", "--out",
                                 str(tmp_path / "f.onnx")])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "f.onnx.json").read_text())
    assert sidecar["measured"] is False and sidecar["served_by"].startswith("torch")
    x = digits_task.example[0]
    got = _run_bare(tmp_path / "f.onnx", {"input": x.numpy()}, tmp_path)
    with torch.inference_mode():
        assert np.abs(got - digits_task.model(x).numpy()).max() < 1e-4


@pytest.mark.parametrize("backend,measured_on_ort", [("onnxruntime", True), ("torch", False)])
def test_loading_a_quantized_artifact_says_which_form_it_is(backend, measured_on_ort, digits_task, tmp_path, caplog):
    from slimkit.quantize._kernels import cpu_has_vnni

    model = sk.apply(digits_task.model, sk.quantize.Int8(activations="static"), digits_task)
    sk.save(model, tmp_path / "run" / "model", extra={"backend": backend})
    with caplog.at_level("INFO", logger="slimkit.io"):
        loaded = sk.load(tmp_path / "run" / "model")
    lines = [r.getMessage() for r in caplog.records if r.name == "slimkit.io"]
    assert len(lines) == 1 and lines[0] == loaded.slimkit_loaded_form
    if not cpu_has_vnni():  # static int8 without VNNI: fake-quant on torch
        assert lines[0].startswith("loaded the reference float form")
    assert ("measured on ONNX Runtime is " + str(tmp_path / "run" / "model.onnx") in lines[0]) == measured_on_ort
    assert f"slimkit export {tmp_path / 'run'} --format onnx" in lines[0]


def test_slimkits_own_loads_say_nothing_but_keep_the_form(digits_task, tmp_path, caplog):
    from slimkit.io.loaded_form import loads_unannounced

    model = sk.apply(digits_task.model, sk.quantize.Int8(activations="static"), digits_task)
    sk.save(model, tmp_path / "best", extra={"backend": "onnxruntime"})
    with caplog.at_level("INFO", logger="slimkit.io"), loads_unannounced():
        loaded = sk.load(tmp_path / "best")
    assert not [r for r in caplog.records if r.name == "slimkit.io"]
    assert "best.onnx" in loaded.slimkit_loaded_form
