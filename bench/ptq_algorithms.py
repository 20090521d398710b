"""PTQ algorithms side by side: SmoothQuant, AWQ (+GPTQ), AdaRound, cross-layer equalization + bias
correction, each against plain rounding and against a peer's implementation where one installs here.

Parts (``--parts``, default all; a partial run keeps the other parts of the previous JSON):

* ``minilm_sq``: MiniLM W8A8 static on ONNX Runtime, slimkit SmoothQuant (alphas, "auto") x calibration,
  vs ONNX Runtime's ``quantize_static`` (with and without its SmoothQuant option, which needs
  neural-compressor 2.x), ``quantize_dynamic``, torch.ao and torchao int8. Cosine to fp32 on the task's
  evaluation sentences; latency at batch 32x128 (interleaved medians; speedup over fp32 torch).
* ``minilm_int4``: MiniLM int4 g128 weight-only, rtn / gptq / awq / awq+gptq at equal bytes, vs torchao's AWQ.
* ``mnist``: the zoo CNN, int4 per output channel on every layer (convs too): AdaRound vs round-to-nearest.
* ``dwcnn``: a MobileNet-style depthwise-separable CNN trained here on the mnist task's data (ReLU6, and the
  same net with ReLU, which CLE can equalize), per-tensor static int8 with and without CLE + bias correction.

Each algorithm's per-layer SQNR before / after (``slimkit.quantize.layer_errors_before_after``) is stored too.

Peers are imported from ``$SLIMKIT_PEERS`` (default /tmp/slimkit_peers), appended to ``sys.path`` so they
never shadow the venv's own packages (torch stays the venv's)::

    pip install --no-deps --target /tmp/slimkit_peers torchao==0.18.0 neural-compressor==2.6 schema \\
        py-cpuinfo prettytable deprecated wcwidth psutil "setuptools<80" opencv-python-headless six pycocotools

    .venv/bin/python bench/ptq_algorithms.py [--threads 2] [--parts minilm_sq minilm_int4 mnist dwcnn] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, interleaved_medians, previous_parts, write  # noqa: E402
from quant_cpu import ort_session  # noqa: E402

import slimkit as sk  # noqa: E402
from slimkit.core.task import Task  # noqa: E402
from slimkit.io import artifact_bytes  # noqa: E402
from slimkit.quantize import (BiasCorrection, CrossLayerEqualization, Int8, SmoothQuant, WeightOnly,  # noqa: E402
                              layer_errors)
from slimkit.quantize.layer_error import layer_errors_before_after  # noqa: E402
from slimkit.runtime import build  # noqa: E402
from slimkit.runtime.onnx_export import export_onnx  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("slimkit").setLevel(logging.ERROR)
PEERS_DIR = os.environ.get("SLIMKIT_PEERS", "/tmp/slimkit_peers")
if Path(PEERS_DIR).is_dir():
    sys.path.append(PEERS_DIR)
ROOT = Path(__file__).resolve().parent.parent
NAME = "ptq_algorithms"
PARTS = ("minilm_sq", "minilm_int4", "mnist", "dwcnn")
GOALS = {"minilm_static_cosine": 0.99, "minilm_static_speedup_b32x128": 2.0, "minilm_static_vs_best_peer_cos099": 1.1,
         "minilm_int4_cosine": 0.98, "mnist_int4_adaround_drop_pt": 0.5}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a peer that does not import has no version here
        return None


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _rows(errors: list) -> list[dict[str, Any]]:
    return [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in e.to_dict().items()} for e in errors]


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean SQNR before / after over the layers compared, and how many improved."""
    both = [r for r in rows if r.get("sqnr_before_db") is not None]
    if not both:
        return {}
    mean = lambda key: round(sum(r[key] for r in both) / len(both), 2)  # noqa: E731
    return {"layers": len(both), "mean_sqnr_before_db": mean("sqnr_before_db"), "mean_sqnr_after_db": mean("sqnr_db"),
            "improved": sum(r["sqnr_db"] > r["sqnr_before_db"] for r in both)}


# ----------------------------------------------------------------------------------------------- MiniLM static
def _ort_static_peers(task: Task, work: Path, threads: int) -> dict[str, tuple[Callable[..., Any], int]]:
    """ONNX Runtime quantize_static variants: MatMul-only (the layers slimkit quantizes), per channel,
    asymmetric uint8 activations, with and without its SmoothQuant (neural-compressor 2.x)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    fp32 = work / "fp32.onnx"
    if not fp32.exists():
        export_onnx(task.model, task.example, fp32)
    names = [i.name for i in onnx.load(str(fp32)).graph.input]

    width = max(int(b[0].shape[1]) for b in task.calib)

    def padded(batch: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """(B, T) ids and mask zero-padded to the longest calibration batch: neural-compressor's SmoothQuant
        stacks activations across batches and refuses different lengths (the mask hides the padding)."""
        return [nn.functional.pad(t, (0, width - t.shape[1])) for t in batch]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(task.calib)

        def get_next(self) -> dict | None:
            batch = next(self.it, None)
            return None if batch is None else {n: t.numpy() for n, t in zip(names, padded(batch))}

    variants = {
        "onnxruntime quantize_static MatMul u8 per-channel minmax": {},
        "onnxruntime quantize_static MatMul u8 per-channel SmoothQuant 0.5": {"sq": 0.5},
    }
    out: dict[str, tuple[Callable[..., Any], int]] = {}
    for i, (label, v) in enumerate(variants.items()):
        path = work / f"ort_static_{i}.onnx"
        extra: dict[str, Any] = {}
        if "sq" in v:
            extra.update({"SmoothQuant": True, "SmoothQuantAlpha": v["sq"], "SmoothQuantFolding": True})
        kwargs: dict[str, Any] = {} if v.get("defaults") else {
            "op_types_to_quantize": ["MatMul"], "per_channel": True, "activation_type": QuantType.QUInt8,
            "weight_type": QuantType.QInt8, "quant_format": QuantFormat.QDQ}
        if "calibrate_method" in v:
            kwargs["calibrate_method"] = v["calibrate_method"]
        try:
            quantize_static(str(fp32), str(path), Reader(), extra_options=extra, **kwargs)
            out[label] = (ort_session(path, threads), path.stat().st_size)
        except Exception as exc:  # noqa: BLE001 - a peer failing is a result
            PEER_FAILURES[label] = _failure(exc)
            _log(f"  {label} failed: {PEER_FAILURES[label]}")
    return out


PEER_FAILURES: dict[str, str] = {}
#: Results so far of the part running, written out if the run is stopped (SIGTERM) before it ends.
PARTIAL: dict[str, Any] = {}


def _ort_dynamic_peer(task: Task, work: Path, threads: int) -> dict[str, tuple[Callable[..., Any], int]]:
    """ONNX Runtime quantize_dynamic (the fastest peer in quant_cpu.json). torch.ao quantize_dynamic (cosine
    0.919) and quantize_static with its defaults (0.319) are in quant_cpu.json, far below 0.99: not rerun."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = export_onnx(task.model, task.example, work / "fp32.onnx")
    quantize_dynamic(str(fp32), str(work / "ort_dyn.onnx"), weight_type=QuantType.QInt8)
    return {"onnxruntime quantize_dynamic": (ort_session(work / "ort_dyn.onnx", threads),
                                             (work / "ort_dyn.onnx").stat().st_size)}


def _torchao_int8_peers(task: Task) -> dict[str, tuple[Callable[..., Any], int]]:
    """torchao's SmoothQuant (prototype) over its int8 dynamic activations x int8 weights, on torch."""
    out: dict[str, tuple[Callable[..., Any], int]] = {}
    label = "torchao SmoothQuant 0.5 + int8 dynamic (torch)"
    try:
        from torchao.prototype.smoothquant import SmoothQuantConfig
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        m = copy.deepcopy(task.model).eval()
        base = Int8DynamicActivationInt8WeightConfig()
        quantize_(m, SmoothQuantConfig(base_config=base, step="prepare", alpha=0.5))
        with torch.inference_mode():
            for batch in task.calib:
                m(*batch)
        quantize_(m, SmoothQuantConfig(base_config=base, step="convert", alpha=0.5))
        out[label] = (m, 0)
    except Exception as exc:  # noqa: BLE001
        PEER_FAILURES[label] = _failure(exc)
    return out


def minilm_sq(threads: int, rounds: int) -> dict[str, Any]:
    task = sk.zoo.load("minilm")
    work = Path(tempfile.mkdtemp(prefix="bench-ptq-minilm-"))
    static = dict(activations="static", symmetric=False, backend="onnxruntime")
    configs: dict[str, list] = {}
    configs["slimkit static mse asym (no SmoothQuant)"] = [Int8(calibration="mse", **static)]
    for alpha, cal in (("auto", "mse"),):
        configs[f"slimkit SmoothQuant {alpha} + static {cal} asym"] = [SmoothQuant(alpha=alpha),
                                                                      Int8(calibration=cal, **static)]
    contenders: dict[str, dict[str, Any]] = {"fp32 torch": {"run": task.model.eval(), "kind": "baseline"}}
    models: dict[str, nn.Module] = {}
    for name, steps in configs.items():
        _log(f"minilm: {name}")
        t0 = time.perf_counter()
        q = sk.apply(task.model, steps, task)
        seconds = time.perf_counter() - t0
        models[name] = q
        contenders[name] = {"run": build(q, "onnxruntime", task.example, threads=threads), "kind": "slimkit",
                            "config": [s.to_dict() for s in steps], "apply_s": round(seconds, 1),
                            "bytes": artifact_bytes(sk.save(q, work / f"sk_{len(models)}", recipe=[s.to_dict() for s in steps]))}
    _log("minilm: peers")
    for label, (run, nbytes) in {**_ort_dynamic_peer(task, work, threads), **_ort_static_peers(task, work, threads),
                                 **_torchao_int8_peers(task)}.items():
        contenders[label] = {"run": run, "kind": "peer", "bytes": nbytes}
    contenders["fp32 torch"]["metric"] = {"cosine_to_fp32": 1.0, "note": "the reference (not evaluated again)"}
    for name, c in contenders.items():
        if "metric" in c:
            continue
        _log(f"minilm: evaluate {name}")
        c["metric"] = task.evaluate(c["run"])
        PARTIAL["minilm_sq"] = {n: {k: v for k, v in x.items() if k != "run"} for n, x in contenders.items()}
        _log(f"   cos {c['metric'].get('cosine_to_fp32', float('nan')):.4f} score {c['metric']['score']:.4f}")
    example = tuple(torch.cat([x] * (32 // x.shape[0]), 0) for x in task.example)  # (32, 128)
    _log("minilm: latency at 32x128")
    torch.set_num_threads(threads)
    with torch.inference_mode():
        times = interleaved_medians({n: (lambda r=c["run"]: r(*example)) for n, c in contenders.items()}, rounds=rounds)
    base = times["fp32 torch"]["median_ms"]
    rows = {}
    for name, c in contenders.items():
        rows[name] = {k: v for k, v in c.items() if k != "run"}
        rows[name].update({"latency_ms": times[name], "speedup_b32x128": base / times[name]["median_ms"],
                           "cosine_to_fp32": c["metric"].get("cosine_to_fp32")})
    rows["fp32 torch"]["metric"]["score"] = None
    ours = [n for n in rows if rows[n]["kind"] == "slimkit" and "no SmoothQuant" not in n]
    ok = [n for n in ours if (rows[n]["cosine_to_fp32"] or 0) >= GOALS["minilm_static_cosine"]]
    best = (max(ok, key=lambda n: rows[n]["speedup_b32x128"]) if ok
            else max(ours, key=lambda n: rows[n]["cosine_to_fp32"] or 0))
    peers_ok = [n for n in rows if rows[n]["kind"] == "peer"
                and (rows[n]["cosine_to_fp32"] or 0) >= GOALS["minilm_static_cosine"]]
    best_peer = max(peers_ok, key=lambda n: rows[n]["speedup_b32x128"]) if peers_ok else None
    # per-layer SQNR of the chosen SmoothQuant config before (same Int8 without SmoothQuant) / after
    sq_steps = configs[best]
    plain = next((models[n] for n, st in configs.items() if st == sq_steps[1:]), None)  # the same Int8 step alone
    plain = plain if plain is not None else sk.apply(task.model, sq_steps[1:], task)
    smoothed = sk.apply(task.model, sq_steps[:1], task)
    per_layer = _rows(layer_errors_before_after(task.model, plain, models[best], task.calib,
                                                algorithm=f"SmoothQuant({sq_steps[0].alpha})", float_improved=smoothed))
    return {
        "environment": environment(threads), "shape_b32x128": [list(x.shape) for x in example],
        "contenders": rows, "peer_failures": dict(PEER_FAILURES),
        "smoothquant_static_ort": {"config": best, "cosine_to_fp32": rows[best]["cosine_to_fp32"],
                                   "speedup_b32x128": rows[best]["speedup_b32x128"],
                                   "score": rows[best]["metric"]["score"],
                                   "score_without_smoothquant": rows["slimkit static mse asym (no SmoothQuant)"]["metric"]["score"]},
        "best_peer_cos099": ({"config": best_peer, "cosine_to_fp32": rows[best_peer]["cosine_to_fp32"],
                              "speedup_b32x128": rows[best_peer]["speedup_b32x128"]} if best_peer else
                             {"config": None, "speedup_b32x128": None,
                              "note": "no peer configuration reached cosine 0.99 to fp32"}),
        "per_layer_sqnr": {"algorithm": best, "summary": _summary(per_layer), "layers": per_layer},
    }


# ----------------------------------------------------------------------------------------------- MiniLM int4
def _torchao_awq(task: Task, group: int) -> tuple[Any, str | None]:
    """torchao's AWQ (prototype) over int4 weight-only, group ``group``, on the CPU; (model, failure)."""
    try:
        from torchao.prototype.awq import AWQConfig
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        m = copy.deepcopy(task.model).eval()
        base = Int4WeightOnlyConfig(group_size=group, int4_packing_format="opaque")
        quantize_(m, AWQConfig(base, step="prepare"), filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear))
        with torch.inference_mode():
            for batch in task.calib:
                m(*batch)
        quantize_(m, AWQConfig(base, step="convert"), filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear))
        return m, None
    except Exception as exc:  # noqa: BLE001
        return None, _failure(exc)


def minilm_int4(threads: int, group: int = 128) -> dict[str, Any]:
    from slimkit.quantize.awq import scale_and_fold

    task = sk.zoo.load("minilm")
    work = Path(tempfile.mkdtemp(prefix="bench-ptq-int4-"))
    rows: dict[str, Any] = {}
    models = {}
    for method in ("rtn", "gptq", "awq", "awq+gptq"):
        _log(f"minilm int4 g{group}: {method}")
        cfg = WeightOnly(bits=4, group_size=group, method=method)
        t0 = time.perf_counter()
        q = sk.apply(task.model, cfg, task)
        seconds = time.perf_counter() - t0
        models[method] = q
        metric = task.evaluate(build(q, "torch", task.example, threads=threads))
        rows[method] = {"config": cfg.to_dict(), "apply_s": round(seconds, 1), "metric": metric,
                        "cosine_to_fp32": metric.get("cosine_to_fp32"),
                        "bytes": artifact_bytes(sk.save(q, work / method, recipe=[cfg.to_dict()]))}
        _log(f"   cos {metric.get('cosine_to_fp32'):.4f} ({seconds:.0f} s)")
        PARTIAL["minilm_int4"] = rows
    # the parts of AWQ one at a time: scales only (no clipping, as before clip_weights), clipping only
    linears = [n for n, m in task.model.named_modules() if isinstance(m, nn.Linear)]
    scaled = copy.deepcopy(task.model).eval()
    scale_and_fold(scaled, linears, task, group, gptq=False)
    ablations = {"awq scales only (no clipping)": (scaled, "rtn")}
    for label, (start, method) in ablations.items():
        _log(f"minilm int4 g{group}: {label}")
        cfg = WeightOnly(bits=4, group_size=group, method=method)
        q = sk.apply(start, cfg, task)
        metric = task.evaluate(build(q, "torch", task.example, threads=threads))
        rows[label] = {"config": cfg.to_dict(), "metric": metric, "cosine_to_fp32": metric.get("cosine_to_fp32")}
        _log(f"   cos {metric.get('cosine_to_fp32'):.4f}")
    _log("minilm int4: torchao AWQ")
    ao, why = _torchao_awq(task, group)
    if ao is not None:
        try:
            metric = task.evaluate(ao)
            rows["torchao awq"] = {"metric": metric, "cosine_to_fp32": metric.get("cosine_to_fp32")}
        except Exception as exc:  # noqa: BLE001
            why = _failure(exc)
    if why:
        rows["torchao awq"] = {"failed": why}
    # per-layer SQNR, awq (against the scaled float model) vs rtn
    per_layer = {}
    for after, before in (("awq", "rtn"), ("awq+gptq", "gptq")):
        r = _rows(layer_errors_before_after(task.model, models[before], models[after], task.calib,
                                            algorithm=after, float_improved=scaled if after == "awq" else None))
        per_layer[f"{after}_vs_{before}"] = {"summary": _summary(r), "layers": r}
    per_layer["awq+gptq_vs_gptq"]["note"] = ("the awq+gptq rows compare against the unscaled float layers: "
                                             "for the layers AWQ rescaled the numbers mix scaling and rounding")
    return {"environment": environment(threads), "group_size": group, **rows, "per_layer_sqnr": per_layer}


# ----------------------------------------------------------------------------------------------- CNNs
def adaround_committed() -> str | None:
    """Why AdaRound cannot be benchmarked yet (None when its module is committed and imports)."""
    log = subprocess.run(["git", "log", "--oneline", "-1", "--", "src/slimkit/quantize/adaround.py"], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()
    if not log:
        return "src/slimkit/quantize/adaround.py is not committed yet"
    try:
        from slimkit.quantize.adaround import AdaRound  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"AdaRound does not import: {_failure(exc)}"
    return None


def _accuracy(task: Task, model: nn.Module) -> float:
    return float(task.evaluate(model)["score"])


def mnist(threads: int) -> dict[str, Any]:
    task = sk.zoo.load("mnist")
    fp32 = _accuracy(task, task.model.eval())
    out: dict[str, Any] = {"environment": environment(threads), "fp32_accuracy": fp32}
    res: dict[str, Any] = {}
    why = adaround_committed()
    if why:
        res["adaround"] = {"accuracy_drop_pt": "pending", "reason": why}
    else:
        from slimkit.quantize.adaround import AdaRound

        rtn = sk.apply(task.model, AdaRound(bits=4, group_size=0, iterations=0), task)
        res["rtn"] = {"accuracy": _accuracy(task, rtn), "config": AdaRound(bits=4, group_size=0, iterations=0).to_dict()}
        cfg = AdaRound(bits=4, group_size=0)
        t0 = time.perf_counter()
        ada = sk.apply(task.model, cfg, task)
        res["adaround"] = {"accuracy": _accuracy(task, ada), "config": cfg.to_dict(),
                           "apply_s": round(time.perf_counter() - t0, 1)}
        per_layer = _rows(layer_errors_before_after(task.model, rtn, ada, task.calib, algorithm="AdaRound"))
        res["per_layer_sqnr"] = {"summary": _summary(per_layer), "layers": per_layer}
    for k in ("rtn", "adaround"):
        if isinstance(res.get(k, {}).get("accuracy"), float):
            res[k]["accuracy_drop_pt"] = round(100 * (fp32 - res[k]["accuracy"]), 2)
    out["int4_per_channel_all"] = res
    return out


class DWBlock(nn.Module):
    """MobileNet block: depthwise 3x3 + BN + act, pointwise 1x1 + BN + act."""

    def __init__(self, cin: int, cout: int, stride: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.dw = nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), act())
        self.pw = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), act())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


def dw_cnn(act: type[nn.Module]) -> nn.Module:
    """(B, 1, 28, 28) -> (B, 10): stem conv, four depthwise-separable blocks, pooled linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), act(),   # (B, 16, 28, 28)
        DWBlock(16, 32, 2, act), DWBlock(32, 32, 1, act),                 # (B, 32, 14, 14)
        DWBlock(32, 64, 2, act), DWBlock(64, 64, 1, act),                 # (B, 64, 7, 7)
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def train_dw(task: Task, act: type[nn.Module], epochs: int = 4) -> nn.Module:
    """A few epochs of Adam on the mnist task's training batches (seeded, batches shuffled per epoch)."""
    torch.manual_seed(0)
    model = dw_cnn(act)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for i in torch.randperm(len(task.train), generator=gen).tolist():
            xs, y = task.train[i]  # ((B, 1, 28, 28),), (B,)
            opt.zero_grad()
            nn.functional.cross_entropy(model(*xs), y).backward()
            opt.step()
    return model.eval()


def dwcnn(threads: int) -> dict[str, Any]:
    base = sk.zoo.load("mnist")
    out: dict[str, Any] = {"environment": environment(threads)}
    int8 = Int8(activations="static", granularity="per_tensor", calibration="minmax", backend="torch")
    acts = {"relu6": nn.ReLU6, "relu": nn.ReLU}
    epochs = int(os.environ.get("DWCNN_EPOCHS", "4"))  # fewer on a machine too busy to train 4 in time
    out["epochs"] = epochs
    for act in (acts[a] for a in os.environ.get("DWCNN_ACTS", "relu6,relu").split(",")):
        _log(f"dwcnn: train ({act.__name__}, {epochs} epochs)")
        t0 = time.perf_counter()
        model = train_dw(base, act, epochs)
        task = Task(name=f"dwcnn_{act.__name__.lower()}", model=model, example=base.example, metric=base.metric,
                    eval=base.eval, calib=base.calib, train=base.train)
        fp32 = _accuracy(task, model)
        res: dict[str, Any] = {"fp32_accuracy": fp32, "train_s": round(time.perf_counter() - t0, 1),
                               "int8": int8.to_dict()}
        variants = {"plain": [int8], "cle": [CrossLayerEqualization(), int8], "bc": [int8, BiasCorrection()],
                    "cle_bc": [CrossLayerEqualization(), int8, BiasCorrection()]}
        quantized = {}
        for name, steps in variants.items():
            q = sk.apply(model, steps, task)
            quantized[name] = q
            acc = _accuracy(task, q)
            res[name] = {"accuracy": acc, "accuracy_drop_pt": round(100 * (fp32 - acc), 2),
                         "skipped": {r.technique: dict(r.skipped) for r in sk.core.record.records_of(q)
                                     if r.skipped and "Equalization" in r.technique}}
            _log(f"   {name:7s} acc {acc:.4f} (drop {res[name]['accuracy_drop_pt']} pt)")
            PARTIAL["dwcnn"] = {**out, ("int8_per_tensor" if act is nn.ReLU6 else "int8_per_tensor_relu"): res}
        cle_float = sk.apply(model, [CrossLayerEqualization()], task)
        r = _rows(layer_errors_before_after(model, quantized["plain"], quantized["cle_bc"], task.calib,
                                            algorithm="CrossLayerEqualization + BiasCorrection",
                                            float_improved=cle_float))
        res["per_layer_sqnr"] = {"summary": _summary(r), "layers": r}
        key = "int8_per_tensor" if act is nn.ReLU6 else "int8_per_tensor_relu"
        out[key] = res
    out["note"] = ("int8_per_tensor: the ReLU6 network asked for (CLE leaves ReLU6 pairs alone: rescaling moves "
                   "the clip at 6); int8_per_tensor_relu: the same network trained with ReLU, which CLE equalizes")
    return out


# ----------------------------------------------------------------------------------------------- main
def goals(payload: dict[str, Any]) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    m = payload.get("minilm", {})
    sq = m.get("smoothquant_static_ort", {})
    if sq:
        checks["minilm_static_cosine"] = (sq["cosine_to_fp32"], sq["cosine_to_fp32"] >= GOALS["minilm_static_cosine"])
        checks["minilm_static_speedup_b32x128"] = (sq["speedup_b32x128"],
                                                   sq["speedup_b32x128"] >= GOALS["minilm_static_speedup_b32x128"])
        peer = m.get("best_peer_cos099", {}).get("speedup_b32x128")
        ratio = sq["speedup_b32x128"] / peer if peer else None
        checks["minilm_static_vs_best_peer_cos099"] = (ratio, None if ratio is None else
                                                       ratio >= GOALS["minilm_static_vs_best_peer_cos099"])
    i4 = m.get("int4_g128", {})
    for method in ("awq", "awq_gptq"):
        cos = i4.get(method, {}).get("cosine_to_fp32")
        if cos is not None:
            checks[f"minilm_int4_{method}_cosine"] = (cos, cos >= GOALS["minilm_int4_cosine"])
    drop = payload.get("mnist", {}).get("int4_per_channel_all", {}).get("adaround", {}).get("accuracy_drop_pt")
    if isinstance(drop, float):
        checks["mnist_int4_adaround_drop_pt"] = (drop, drop <= GOALS["mnist_int4_adaround_drop_pt"])
    return {k: {"measured": v, "goal": GOALS.get(k, GOALS["minilm_int4_cosine"]), "met": met}
            for k, (v, met) in checks.items()}


def merge(parts_dir: Path) -> dict[str, Any]:
    """Parts run as separate processes (``--part-out``) joined into one payload."""
    import json

    payload: dict[str, Any] = {}
    for f in sorted(parts_dir.glob("*.json")):
        part = json.loads(f.read_text())
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(payload.get(key), dict):
                payload[key].update(value)
            else:
                payload[key] = value
    return payload


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--part-out", type=Path, help="write this run's parts to DIR/<parts>.json (run parts in parallel)")
    ap.add_argument("--merge", type=Path, help="join DIR/*.json from --part-out runs into the results file")
    ap.add_argument("--jobs", type=Path, help="with --merge: the MiniLM section from DIR/job_*.json (--job runs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    payload: dict[str, Any] = {"benchmark": NAME, "environment": environment(args.threads),
                               "peers": {"torchao": _version("torchao"), "neural_compressor": _version("neural_compressor"),
                                         "aimet_torch": None},
                               "peers_not_installed": {
                                   "aimet-torch": "2.42.0 installs with --no-deps but imports bokeh/holoviews/torchvision/"
                                                  "cvxpy (torchvision must match torch 2.13): not installed here"}}
    if args.merge:
        payload = {**payload, **merge(args.merge)}
        if args.jobs:
            minilm = minilm_from_jobs(args.jobs)
            payload["minilm"] = {**minilm, "int4_g128": {**payload.get("minilm", {}).get("int4_g128", {}),
                                                         **minilm.get("int4_g128", {})}}
        payload["environment"] = environment(args.threads)
        payload["goals"] = goals(payload)
        _log(f"wrote {write(NAME, payload)}")
    else:
        if not args.part_out:
            payload.update(previous_parts(NAME, ("minilm", "mnist", "dwcnn")))
        payload.setdefault("minilm", {})
        steps: dict[str, Callable[[], None]] = {
            "minilm_sq": lambda: payload["minilm"].update(minilm_sq(args.threads, args.rounds)),
            "minilm_int4": lambda: payload["minilm"].update(
                {"int4_g128": {k.replace("+", "_"): v for k, v in minilm_int4(args.threads).items()}}),
            "mnist": lambda: payload.update({"mnist": mnist(args.threads)}),
            "dwcnn": lambda: payload.update({"dwcnn": dwcnn(args.threads)}),
        }
        for part in args.parts:
            _log(f"== {part}")
            try:
                steps[part]()
            except KeyboardInterrupt:  # stopped (SIGTERM): keep what was measured
                payload.setdefault("interrupted", {})[part] = PARTIAL.get(part, {})
            except Exception:  # noqa: BLE001 - one part failing must not lose the others
                payload.setdefault("failures", {})[part] = traceback.format_exc()[-2000:]
                traceback.print_exc()
            payload["goals"] = goals(payload)
            if args.part_out:
                import json

                args.part_out.mkdir(parents=True, exist_ok=True)
                out = args.part_out / f"{'+'.join(args.parts)}.json"
                out.write_text(json.dumps({k: v for k, v in payload.items() if v != {}}, indent=2, default=str))
                _log(f"wrote {out}")
            else:
                _log(f"wrote {write(NAME, payload)}")
    for k, v in payload["goals"].items():
        print(f"goal {k:40s} measured {v['measured']}  goal {v['goal']}  {'met' if v['met'] else 'NOT met'}")




def minilm_from_jobs(out: Path) -> dict[str, Any]:
    """The ``minilm`` section of the results from ``--job`` outputs (the same keys as ``minilm_sq`` / ``minilm_int4``)."""
    import json

    jobs = {f.stem[4:]: json.loads(f.read_text()) for f in out.glob("job_*.json")}
    lat = jobs.get("latency", {})
    speed = lat.get("speedup_b32x128", {})
    labels = {"static": "slimkit static mse asym (no SmoothQuant)", "sq": "slimkit SmoothQuant auto + static mse asym"}
    rows: dict[str, Any] = {"fp32 torch": {"kind": "baseline", "cosine_to_fp32": 1.0, "speedup_b32x128": 1.0,
                                           "latency_ms": lat.get("latency_ms", {}).get("fp32 torch")}}
    for job in ("static", "sq", "ort_dynamic", "ort_static", "ort_sq"):
        if job in jobs and "metric" in jobs[job]:
            j = jobs[job]
            label = labels.get(job, j.get("label", job))
            rows[label] = {"kind": "slimkit" if job in labels else "peer", "config": j.get("config"),
                           "apply_s": j.get("apply_s"), "bytes": j.get("bytes"), "metric": j["metric"],
                           "cosine_to_fp32": j["cosine_to_fp32"], "speedup_b32x128": speed.get(label),
                           "latency_ms": lat.get("latency_ms", {}).get(label)}
    failures = {k: v for j in jobs.values() for k, v in j.get("failures", {}).items()}
    sec: dict[str, Any] = {"contenders": rows, "peer_failures": failures, "shape_b32x128": lat.get("shape_b32x128"),
                           "how": "one process per contender (bench/ptq_algorithms.py --job ...), then one process "
                                  "timing every saved artifact interleaved (--job latency)"}
    sq = rows.get(labels["sq"])
    if sq:
        sec["smoothquant_static_ort"] = {"config": labels["sq"], "cosine_to_fp32": sq["cosine_to_fp32"],
                                         "speedup_b32x128": sq["speedup_b32x128"], "score": sq["metric"]["score"],
                                         "score_without_smoothquant": rows.get(labels["static"], {}).get("metric", {}).get("score")}
    ok = [n for n, r in rows.items() if r["kind"] == "peer" and (r["cosine_to_fp32"] or 0) >= GOALS["minilm_static_cosine"]
          and r.get("speedup_b32x128")]
    best = max(ok, key=lambda n: rows[n]["speedup_b32x128"]) if ok else None
    sec["best_peer_cos099"] = ({"config": best, "cosine_to_fp32": rows[best]["cosine_to_fp32"],
                                "speedup_b32x128": rows[best]["speedup_b32x128"]} if best else
                               {"config": None, "speedup_b32x128": None,
                                "note": "no peer configuration measured here reached cosine 0.99 to fp32"})
    if "per_layer_sqnr" in lat:
        sec["per_layer_sqnr"] = lat["per_layer_sqnr"]
    int4 = {}
    for method in ("rtn", "gptq", "awq", "awq+gptq", "awq_noclip"):
        j = jobs.get(f"int4_{method}")
        if j and "metric" in j:
            key = {"awq+gptq": "awq_gptq", "awq_noclip": "awq scales only (no clipping)"}.get(method, method)
            int4[key] = {k: j[k] for k in ("config", "apply_s", "bytes", "metric", "cosine_to_fp32") if k in j}
    if int4:
        sec["int4_g128"] = {"group_size": 128, **int4}
    return sec


# ----------------------------------------------------------------------------------------------- parallel jobs
# On a machine where every process gets a small share of the cores, the MiniLM part runs fastest as
# separate processes: one per contender (quantize, save, evaluate), then one that loads every
# artifact and times them interleaved (``--job latency``), so the speedups still come from one process.
JOBS = ("static", "sq", "ort_dynamic", "ort_static", "ort_sq", "int4_rtn", "int4_gptq", "int4_awq",
        "int4_awq+gptq", "int4_awq_noclip", "latency")


def run_job(job: str, threads: int, rounds: int, out: Path) -> dict[str, Any]:
    import json

    task = sk.zoo.load("minilm")
    out.mkdir(parents=True, exist_ok=True)
    static = Int8(calibration="mse", activations="static", symmetric=False, backend="onnxruntime")
    res: dict[str, Any] = {"job": job}
    if job in ("static", "sq"):
        t0 = time.perf_counter()
        smoothed = task.model
        if job == "sq":
            smoothed = sk.apply(task.model, SmoothQuant(alpha="auto"), task)
            sk.save(smoothed, out / "art_smoothed")
        q = sk.apply(smoothed, static, task)
        res["apply_s"] = round(time.perf_counter() - t0, 1)
        res["config"] = ([SmoothQuant(alpha="auto").to_dict()] if job == "sq" else []) + [static.to_dict()]
        res["bytes"] = artifact_bytes(sk.save(q, out / f"art_{job}"))
        res["metric"] = task.evaluate(build(q, "onnxruntime", task.example, threads=threads))
    elif job in ("ort_dynamic", "ort_static", "ort_sq"):
        work = out / f"work_{job}"
        work.mkdir(exist_ok=True)
        if job == "ort_dynamic":
            peer = _ort_dynamic_peer(task, work, threads)
        else:
            peer = _ort_static_peers(task, work, threads)
            want = "SmoothQuant" if job == "ort_sq" else "minmax"
            peer = {k: v for k, v in peer.items() if want in k}
        res["failures"] = dict(PEER_FAILURES)
        for label, (run, nbytes) in peer.items():
            res["label"], res["bytes"] = label, nbytes
            res["metric"] = task.evaluate(run)
    elif job.startswith("int4_"):
        from slimkit.quantize.awq import scale_and_fold

        method = job[5:]
        start = task.model
        if method == "awq_noclip":  # AWQ's scales alone, rounded to nearest (AWQ before clip_weights)
            start = copy.deepcopy(task.model).eval()
            linears = [n for n, m in task.model.named_modules() if isinstance(m, nn.Linear)]
            scale_and_fold(start, linears, task, 128, gptq=False)
            sk.save(start, out / "art_awq_scaled")
            method = "rtn"
        cfg = WeightOnly(bits=4, group_size=128, method=method)
        t0 = time.perf_counter()
        q = sk.apply(start, cfg, task)
        res["apply_s"] = round(time.perf_counter() - t0, 1)
        res["config"] = cfg.to_dict()
        res["bytes"] = artifact_bytes(sk.save(q, out / f"art_{job}"))
        res["metric"] = task.evaluate(build(q, "torch", task.example, threads=threads))
    elif job == "latency":
        res.update(_latency_job(task, threads, rounds, out))
    if "metric" in res:
        res["cosine_to_fp32"] = res["metric"].get("cosine_to_fp32")
    (out / f"job_{job}.json").write_text(json.dumps(res, indent=2, default=str))
    return res


def _latency_job(task: Task, threads: int, rounds: int, out: Path) -> dict[str, Any]:
    """Every saved MiniLM static contender and ORT peer file, timed interleaved at 32x128 in this process;
    the SmoothQuant per-layer SQNR before / after from the saved artifacts."""
    import json

    runs: dict[str, Callable[..., Any]] = {"fp32 torch": task.model.eval()}
    loaded = {}
    for job, label in (("static", "slimkit static mse asym (no SmoothQuant)"),
                       ("sq", "slimkit SmoothQuant auto + static mse asym")):
        if (out / f"art_{job}").exists():
            loaded[job] = sk.load(out / f"art_{job}")
            runs[label] = build(loaded[job], "onnxruntime", task.example, threads=threads)
    for job in ("ort_dynamic", "ort_static", "ort_sq"):
        f = out / f"job_{job}.json"
        if f.exists() and "label" in (info := json.loads(f.read_text())):
            onnx = sorted((out / f"work_{job}").glob("ort_*.onnx"))[-1]
            runs[info["label"]] = ort_session(onnx, threads)
    example = tuple(torch.cat([x] * (32 // x.shape[0]), 0) for x in task.example)  # (32, 128)
    torch.set_num_threads(threads)
    with torch.inference_mode():
        times = interleaved_medians({n: (lambda r=r: r(*example)) for n, r in runs.items()}, rounds=rounds)
    base = times["fp32 torch"]["median_ms"]
    res: dict[str, Any] = {"shape_b32x128": [list(x.shape) for x in example],
                           "latency_ms": times, "speedup_b32x128": {n: base / t["median_ms"] for n, t in times.items()}}
    if {"static", "sq"} <= set(loaded) and (out / "art_smoothed").exists():
        smoothed = sk.load(out / "art_smoothed")
        rows = _rows(layer_errors_before_after(task.model, loaded["static"], loaded["sq"], task.calib,
                                               algorithm="SmoothQuant(auto)", float_improved=smoothed))
        res["per_layer_sqnr"] = {"algorithm": "slimkit SmoothQuant auto + static mse asym", "summary": _summary(rows),
                                 "layers": rows}
    return res


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--job":  # --job NAME DIR
        run_job(sys.argv[2], 2, 5, Path(sys.argv[3]))
    else:
        main()
