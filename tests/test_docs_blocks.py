"""Every Python block of docs/*.md runs as written: each in a fresh namespace, in this process (cheaper than a
process per block), in its own empty working directory, and what it computes is checked against numbers.

Blocks name their own imports and task (the built-in ``digits`` task, or a tiny model defined in the block).
The few that need what a test machine does not have stay compile-only, each listed in ``COMPILE_ONLY`` with
the reason; tests/test_readme.py checks their ``sk.<name>`` attributes and parses the pages' command lines.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)

Key = tuple[str, int]  # (page, index of the Python block on the page)


def python_blocks() -> dict[Key, str]:
    found = {}
    for page in sorted((ROOT / "docs").glob("*.md")):
        bodies = [body for lang, body in FENCE.findall(page.read_text()) if lang == "python"]
        found.update({(page.relative_to(ROOT).as_posix(), i): body for i, body in enumerate(bodies)})
    return found


BLOCKS = python_blocks()

#: Blocks that only compile here, and why: keep this list short; prefer rewriting a block onto ``digits``.
COMPILE_ONLY: dict[Key, str] = {
    ("docs/runtime.md", 2): "needs a CUDA GPU",
}

#: Blocks over ~5 s on one thread (a search with its report, training exit heads, several trainings).
SLOW = {("docs/search.md", 0), ("docs/architecture-techniques.md", 0), ("docs/distill.md", 1)}


def x_digits(ns: dict[str, Any]) -> torch.Tensor:
    return ns["task"].eval[0][0][0][:64]  # (64, 1, 8, 8)


def same_outputs(a: Any, b: Any, x: torch.Tensor, atol: float = 0.0) -> None:
    with torch.inference_mode():
        assert torch.allclose(a(x), b(x), atol=atol, rtol=0)


def score(ns: dict[str, Any], model: Any, task: str = "task") -> float:
    return ns[task].evaluate(model)["score"]


def check_fuse_and_exits(ns: dict[str, Any], out: str) -> None:
    assert score(ns, ns["run"]) >= 0.97  # BN folded and run on ONNX Runtime: digits' own accuracy (0.997)
    stats = ns["stats"]
    assert stats["accuracy"] >= 0.97 and math.isclose(sum(stats["exit_fraction"]), 1.0)
    assert stats["exit_fraction"][0] > 0.3  # most digits leave at the first exit
    same_outputs(ns["ee"], ns["ee2"], x_digits(ns))


def check_encoder_exits(ns: dict[str, Any], out: str) -> None:
    torch_ = ns["torch"]
    labels, ee = ns["labels"][128:], ns["ee"]
    with torch_.inference_mode():
        full = ns["clf"](ns["ids"][128:], ns["mask"][128:]).argmax(1)  # (128,) the classifier without exits
        routed = ee(ns["ids"][128:], ns["mask"][128:]).argmax(1)
    assert ns["logits"].shape == (256, 2) and (full == labels).float().mean() >= 0.8
    assert (routed == labels).float().mean() >= (full == labels).float().mean() - 0.005  # within max_drop held out
    assert (ee.last_exits == 0).float().mean() > 0.5  # most sentences leave after layer 3


def check_own_technique(ns: dict[str, Any], out: str) -> None:
    assert "['mine.Scale', 'quantize.Float16']" in out and "Scale(factor=3.0)" in out
    before, after = ns["task"].model[0].weight, ns["out"][0].weight
    assert torch.allclose(after.float(), 2 * before, rtol=1e-3, atol=1e-4)  # doubled, then fp16


def check_distill(ns: dict[str, Any], out: str) -> None:
    before, after = ns["before"]["score"], score(ns, ns["f"], "digits")
    assert after >= 0.97 and after >= before  # Tucker at 0.3 loses ~13 points; 60 distillation steps recover them


def check_encoder_students(ns: dict[str, Any], out: str) -> None:
    task = ns["minilm"]
    from slimkit.distill.student import kept_layers

    assert [len(m.bert.encoder.layer) for m in (ns["s"], ns["control"])] == [3, 3]
    assert kept_layers(6, 3) == [1, 3, 5]  # what the page says Student(layers=3) keeps
    distilled, control = task.evaluate(ns["s"])["score"], task.evaluate(ns["control"])["score"]
    assert distilled >= 0.9 and distilled > control + 0.2  # the teacher's embeddings kept; SimCSE alone drifts


def check_factorize(ns: dict[str, Any], out: str) -> None:
    before, after = ns["r"].params
    assert after < 0.5 * before and "14" in ns["r"].skipped
    same_outputs(ns["f"], ns["again"], x_digits(ns))
    assert score(ns, ns["f"]) >= 0.95


def check_io(ns: dict[str, Any], out: str) -> None:
    assert (Path("runs/mine/model.safetensors").is_file() and Path("runs/mine/slimkit.json").is_file())
    same_outputs(ns["model"], ns["sk"].load("runs/mine"), torch.rand(4, 1, 8, 8))
    assert ns["again"].fc.weight.shape == (2, 4)


def check_profile(ns: dict[str, Any], out: str) -> None:
    record = json.loads(ns["p"].to_json())
    assert record["params_total"] == 40618 and record["macs"] > 500_000 and "Conv2d" in out


def check_sensitivity(ns: dict[str, Any], out: str) -> None:
    sens, trace = ns["sens"], ns["trace"]
    assert set(sens) == set(trace) == {"0", "3", "7", "12", "14"}
    assert all(v >= 0 for v in sens.values()) and all(v > 0 for v in trace.values())


def check_channels(ns: dict[str, Any], out: str) -> None:
    r = ns["r"]
    assert r.macs[1] <= 0.55 * r.macs[0] and r.params[1] < r.params[0]
    assert all(after < before for before, after in r.layers.values())
    same_outputs(ns["p"], ns["again"], x_digits(ns))
    assert score(ns, ns["p"]) >= 0.95


def check_magnitude(ns: dict[str, Any], out: str) -> None:
    from slimkit.train.masks import global_sparsity

    assert global_sparsity(ns["m"]) == pytest.approx(0.9, abs=0.005)  # zeros kept through fine-tuning
    assert Path("runs/p90/model.safetensors").is_file() and score(ns, ns["m"]) >= 0.8
    same_outputs(ns["m"], ns["fast"], x_digits(ns), atol=1e-5)


def check_nm(ns: dict[str, Any], out: str) -> None:
    assert out.strip() == "True" and score(ns, ns["n"]) >= 0.9


def check_encoder_nas(ns: dict[str, Any], out: str) -> None:
    evals, limit, best = ns["evals"], ns["limit"], ns["best"]
    assert len(evals) == 6 and all(0.5 < e.accuracy <= 1.0 + 1e-6 and e.latency_ms > 0 for e in evals)
    assert all(e.arch.layers <= 4 and e.arch.heads <= 4 for e in evals)
    assert best is None or best.latency_ms <= limit  # timing decides feasibility: none may fit on a busy machine


def check_int8_static(ns: dict[str, Any], out: str) -> None:
    assert score(ns, ns["run"]) >= 0.97 and ns["run"].kernels["QLinearConv"] == 3
    assert Path("runs/q/model.safetensors").is_file() and score(ns, ns["w4"]) >= 0.95


def check_qat_mixed_ternary(ns: dict[str, Any], out: str) -> None:
    from slimkit.quantize import MixedRecord, TrainedQuantRecord

    last = ns["last_record"]
    assert last(ns["q"], TrainedQuantRecord).training.score >= 0.97
    assert set(last(ns["m"], MixedRecord).bits.values()) <= {4, 8, 16}
    assert len(ns["curve"]) == 3 and score(ns, ns["t"]) >= 0.8


def check_smoothquant(ns: dict[str, Any], out: str) -> None:
    assert ns["with_smoothing"] > ns["without"] + 5  # 29.0 -> 37.4 dB on this model


def check_score(minimum: float) -> Callable[[dict[str, Any], str], None]:
    def check(ns: dict[str, Any], out: str) -> None:
        assert score(ns, ns["q"]) >= minimum

    return check


def check_runtime(ns: dict[str, Any], out: str) -> None:
    assert out.startswith("onnxruntime") and score(ns, ns["run"]) >= 0.97
    assert type(ns["run"]).__name__ == "OrtModel"  # load_deployed read the saved backend


def write_onnx_file(tmp: Path) -> None:
    """What ``slimkit quantize --task digits --config int8-static --out runs/q`` keeps: runs/q/model.onnx."""
    import slimkit as sk
    from slimkit.quantize import Int8
    from slimkit.runtime import build
    from slimkit.runtime.onnx_file import keep_onnx

    task = sk.zoo.load("digits")
    q = sk.apply(task.model, Int8(activations="static"), task)
    keep_onnx(build(q, "onnxruntime", task.example, threads=1), tmp / "runs/q")


def check_onnx_file(ns: dict[str, Any], out: str) -> None:
    assert ns["logits"].shape == (1, 10) and ns["np"].isfinite(ns["logits"]).all()


def check_search(ns: dict[str, Any], out: str) -> None:
    best = ns["result"].best
    assert best is not None and best.measured.size_mb <= 0.05 and best.measured.drop <= 0.02
    assert Path("runs/digits/best").is_dir() and ns["result"].pareto


def check_constraints(ns: dict[str, Any], out: str) -> None:
    assert ns["c"] == pytest.approx([-0.1, 0.4, -0.01])  # the numbers the page states


def check_own_task(ns: dict[str, Any], out: str) -> None:
    assert 0.0 <= ns["task"].evaluate()["score"] <= 1.0 and len(ns["task"].train) == 8


def check_finetune(ns: dict[str, Any], out: str) -> None:
    r = ns["r"]
    assert r.best_score >= 0.97 and r.resumed_from is None and any(Path("runs/ft").iterdir())


#: What each block computes, checked (every block that runs has a row).
CHECKS: dict[Key, Callable[[dict[str, Any], str], None]] = {
    ("docs/architecture-techniques.md", 0): check_fuse_and_exits,
    ("docs/architecture-techniques.md", 1): check_encoder_exits,
    ("docs/architecture.md", 0): check_own_technique,
    ("docs/distill.md", 0): check_distill,
    ("docs/distill.md", 1): check_encoder_students,
    ("docs/factorize.md", 0): check_factorize,
    ("docs/io.md", 0): check_io,
    ("docs/measure.md", 0): check_profile,
    ("docs/measure.md", 1): check_sensitivity,
    ("docs/nas.md", 0): check_encoder_nas,
    ("docs/prune.md", 0): check_channels,
    ("docs/prune.md", 1): check_magnitude,
    ("docs/prune.md", 2): check_nm,
    ("docs/quantize.md", 0): check_int8_static,
    ("docs/quantize.md", 1): check_qat_mixed_ternary,
    ("docs/quantize.md", 2): check_smoothquant,
    ("docs/quantize.md", 3): check_score(0.97),
    ("docs/quantize.md", 4): check_score(0.97),
    ("docs/quantize.md", 5): check_score(0.95),
    ("docs/runtime.md", 0): check_runtime,
    ("docs/runtime.md", 1): check_onnx_file,
    ("docs/search.md", 0): check_search,
    ("docs/search.md", 1): check_constraints,
    ("docs/tasks.md", 0): check_own_task,
    ("docs/train.md", 0): check_finetune,
}

#: Files a block reads that a command writes (the block shows what a program without slimkit does with them).
SETUP: dict[Key, Callable[[Path], None]] = {("docs/runtime.md", 1): write_onnx_file}

RUN = [pytest.param(key, marks=[pytest.mark.slow] if key in SLOW else [], id=f"{key[0]}:{key[1]}")
       for key in BLOCKS if key not in COMPILE_ONLY]


def test_the_docs_have_python_blocks_and_few_only_compile():
    assert len(BLOCKS) >= 25 and len(COMPILE_ONLY) <= 4
    assert set(COMPILE_ONLY) <= set(BLOCKS) and set(SLOW) <= set(BLOCKS), "a listed block is gone: update the lists"
    assert set(CHECKS) == set(BLOCKS) - set(COMPILE_ONLY), "every block that runs has a check, and only those"


@pytest.mark.parametrize("key", list(COMPILE_ONLY), ids=[f"{p}:{i}" for p, i in COMPILE_ONLY])
def test_compile_only_block_compiles(key: Key):
    compile(BLOCKS[key], f"{key[0]} block {key[1]}", "exec")


@pytest.fixture
def restore_registry():
    """A block may register a technique of its own (architecture.md): it must not outlive the block."""
    from slimkit.core.registry import all_techniques, remove_technique

    before = {t.name for t in all_techniques()}
    yield
    for tech in all_techniques():
        if tech.name not in before:
            remove_technique(tech.name)


@pytest.mark.parametrize("key", RUN)
def test_docs_python_block_runs(key: Key, tmp_path, monkeypatch, capsys, one_thread, restore_registry):
    monkeypatch.chdir(tmp_path)
    if key in SETUP:
        SETUP[key](tmp_path)
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    exec(compile(BLOCKS[key], f"{key[0]} block {key[1]}", "exec", dont_inherit=True), namespace)
    CHECKS[key](namespace, capsys.readouterr().out)
