"""Training memory of MiniLM distillation with and without activation recomputation (``recompute=True``).

The student is a copy of all-MiniLM-L6-v2 (``zoo.load("minilm")``), the teacher the original, the
loss ``distill.Distill``'s (embedding KD: the task has no labels); one batch of 32 real sentences (the
task's first two training batches, padded to the longer one's length). Two figures per setting:

- **activation memory** (``slimkit.train.recompute.activation_bytes``): bytes of the distinct tensors
  autograd keeps for the backward pass when the forward ends (``torch.autograd.graph.saved_tensors_hooks``;
  parameters and buffers left out; with recompute, the inputs the checkpoints keep). The peak with
  recompute adds the largest one block saves, since the backward recomputes one block at a time.
  torch's CPU allocator keeps no peak counter, so this counts what autograd holds rather than
  sampling the allocator.
- **peak RSS** (a second, coarser figure): a fresh process per setting samples ``/proc/self/statm``
  every 2 ms over one training step; reported as the peak minus the RSS just before the step.
  The C allocator reuses memory freed while loading, so this under-counts both settings alike.

Step time: full ``finetune`` steps (teacher forward, student forward + backward, AdamW) timed in
alternating rounds of one step each (after a warm-up round), median seconds per step; the ratio is
recompute over plain.

    .venv/bin/python bench/calib_memory.py [--threads 2] [--rounds 3]

Writes ``results/calib_memory.json`` (key ``recompute``; other keys in the file are kept).

**Calibration memory** (``--calibration``): peak RSS of post-training calibration that walks the
repeated blocks one at a time (``slimkit.calibrate.blockwise``): static int8 (the ``int8-static``
preset) and GPTQ int4 g32 (``WeightOnly(method="gptq")``) on MiniLM, and GPTQ int4 g128 on a generated
LLaMA-like decoder of ~1B parameters (random fp32 weights; 4 sequences of 128 tokens). Each runs in
a fresh process; the kernel's high-water mark (``VmHWM``) is reset (``/proc/self/clear_refs``) once
the model and data are loaded (after one warm-up forward) and read after the embedding tables are
quantized and again when the quantizer returns. Written as
``peak_over_model = (VmHWM - (RSS before quantizing - model bytes)) / model bytes``: the fp32 model plus
everything calibration adds at its peak, over the fp32 model (the interpreter, libraries and data are
left out). MiniLM is also measured with every layer's statistics gathered in one pass first
(``blockwise=False``, the earlier path), for comparison.

    .venv/bin/python bench/calib_memory.py --calibration [--threads 2] [--runs decoder_1b.gptq ...]

writes the keys ``minilm`` and ``decoder_1b`` (``recompute`` is kept).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, write  # noqa: E402

BATCH = 32
PAGE = os.sysconf("SC_PAGE_SIZE")


def setup() -> tuple[Any, Any, Any, tuple[torch.Tensor, torch.Tensor]]:
    """(task, student, loss, inputs): the distillation step the measurements run."""
    from slimkit import zoo
    from slimkit.distill.distiller import Distill, DistillLoss

    task = zoo.load("minilm")
    ids, mask = [], []
    for batch_ids, batch_mask in task.train:
        ids += list(batch_ids)
        mask += list(batch_mask)
        if len(ids) >= BATCH:
            break
    length = max(int(r.shape[0]) for r in ids)

    def pad(rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(r, (0, length - r.shape[0])) for r in rows[:BATCH]])

    inputs = (pad(ids), pad(mask))  # (B, T) token ids, (B, T) attention mask
    student = copy.deepcopy(task.model).train()
    loss = DistillLoss(student, task.model, task, Distill())
    return task, student, loss, inputs


def train_task(task: Any, student: Any, inputs: tuple) -> Any:
    from slimkit.core.task import Task

    return Task(name="minilm-distill", model=student, example=inputs, metric=task.metric, eval=task.eval,
                train=[inputs])


def step_seconds(task: Any, student: Any, loss: Any, inputs: tuple, rounds: int, steps: int = 1) -> dict[str, Any]:
    """Median seconds per full training step of each setting, in alternating rounds."""
    from slimkit.train import finetune

    t = train_task(task, student, inputs)
    times: dict[str, list[float]] = {"plain": [], "recompute": []}
    for r in range(rounds + 1):  # round 0 warms up
        order = ("plain", "recompute") if r % 2 == 0 else ("recompute", "plain")
        for name in order:
            start = time.perf_counter()
            finetune(student, t, steps=steps, lr=3e-5, loss=loss, progress=False, recompute=name == "recompute")
            if r:
                times[name].append((time.perf_counter() - start) / steps)
    return {name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "rounds": len(v)}
            for name, v in times.items()}


def rss_worker(mode: str, threads: int) -> None:
    """In a fresh process: peak RSS over one training step of ``mode``, printed as JSON."""
    from slimkit.train import finetune

    torch.set_num_threads(threads)
    task, student, loss, inputs = setup()
    t = train_task(task, student, inputs)

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    before, peak, running = rss(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    finetune(student, t, steps=1, lr=3e-5, loss=loss, progress=False, recompute=mode == "recompute")
    running[0] = False
    sampler.join()
    print(json.dumps({"rss_before_mb": before / 2**20, "peak_rss_mb": peak[0] / 2**20,
                      "peak_rss_growth_mb": (peak[0] - before) / 2**20,
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rss-worker", choices=("plain", "recompute"))
    parser.add_argument("--calibration", action="store_true", help="measure calibration memory (not recompute)")
    parser.add_argument("--calib-worker", choices=CALIB_RUNS)
    parser.add_argument("--runs", nargs="+", choices=CALIB_RUNS, default=list(CALIB_RUNS),
                        help="with --calibration: which runs (the others' results in the file are kept)")
    args = parser.parse_args()
    if args.rss_worker:
        return rss_worker(args.rss_worker, args.threads)
    if args.calib_worker:
        return calib_worker(args.calib_worker, args.threads)
    if args.calibration:
        return calibration_memory(args.threads, args.runs)

    from slimkit.train.recompute import activation_bytes, repeated_blocks

    torch.set_num_threads(args.threads)
    task, student, loss, inputs = setup()
    with loss.hooked():
        step = lambda: loss(student, inputs, None)  # noqa: E731
        plain = activation_bytes(student, step, recompute=False)
        recomputed = activation_bytes(student, step, recompute=True)
        times = step_seconds(task, student, loss, inputs, args.rounds)
    peak_plain = plain["saved"]
    peak_recompute = recomputed["saved"] + plain["largest_block"]
    rss = {}
    for mode in ("plain", "recompute"):
        done = subprocess.run([sys.executable, __file__, "--rss-worker", mode, "--threads", str(args.threads)],
                              capture_output=True, text=True, check=True)
        rss[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    mb = 2**20
    result = {
        "environment": environment(args.threads),
        "setup": {"model": "all-MiniLM-L6-v2 student distilled from itself (zoo minilm), embedding KD",
                  "batch": list(inputs[0].shape), "blocks_recomputed": repeated_blocks(student)},
        "method": {"activation_memory": "bytes of distinct tensors autograd saves for the backward "
                   "(saved_tensors_hooks; parameters and buffers excluded; with recompute: the checkpoints' "
                   "block inputs plus the largest block's saved bytes, recomputed one block at a time)",
                   "peak_rss": "fresh process per setting, /proc/self/statm sampled every 2 ms over 1 training "
                   "step, peak minus RSS before the step",
                   "step_time": f"full finetune steps (teacher fwd, student fwd+bwd, AdamW), {args.rounds} "
                   "alternating rounds of 1 step after a warm-up round, median s/step"},
        "activation_memory_mb": {"plain": peak_plain / mb, "recompute": peak_recompute / mb,
                                 "recompute_kept_at_forward_end": recomputed["saved"] / mb,
                                 "largest_block": plain["largest_block"] / mb},
        "activation_memory_ratio": peak_recompute / peak_plain,
        "peak_rss": rss,
        "peak_rss_growth_ratio": rss["recompute"]["peak_rss_growth_mb"] / max(rss["plain"]["peak_rss_growth_mb"], 1e-9),
        "step_time": times,
        "step_time_ratio": times["recompute"]["median_s"] / times["plain"]["median_s"],
        "goal": "activation_memory_ratio <= 0.6 at step_time_ratio <= 1.4",
    }
    result["goal_met"] = result["activation_memory_ratio"] <= 0.6 and result["step_time_ratio"] <= 1.4
    path = RESULTS / "calib_memory.json"
    payload = json.loads(path.read_text()) if path.is_file() else {}
    payload["recompute"] = result
    print(json.dumps(result, indent=2))
    print(write("calib_memory", payload))


# --- calibration memory -------------------------------------------------------------------------

CALIB_RUNS = ("minilm.ptq_static", "minilm.gptq", "minilm.ptq_static.whole", "minilm.gptq.whole", "decoder_1b.gptq")
DECODER = {"vocab": 32000, "dim": 2048, "ffn": 5504, "heads": 16, "layers": 18}  # ~1.04 B parameters
DECODER_CALIB = {"sequences": 4, "tokens": 128}


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class DecoderBlock(torch.nn.Module):
    """Pre-norm causal attention + SwiGLU MLP, LLaMA's layout (no rotary embedding: memory is the point)."""

    def __init__(self, dim: int, ffn: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = torch.nn.Linear(dim, ffn, bias=False), torch.nn.Linear(dim, ffn, bias=False)
        self.down_proj = torch.nn.Linear(ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, C/heads)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
        h = self.mlp_norm(x)
        return x + self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class Decoder(torch.nn.Module):
    def __init__(self, vocab: int, dim: int, ffn: int, heads: int, layers: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.layers = torch.nn.ModuleList(DecoderBlock(dim, ffn, heads) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # (B, T, C)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))  # (B, T, vocab)


def decoder_task() -> Any:
    """The generated decoder (random weights drawn in place: no second copy while building) and its calibration."""
    from slimkit.core.task import Task

    with torch.device("meta"):
        model = Decoder(**DECODER)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=g)
    ids = [(torch.randint(0, DECODER["vocab"], (1, DECODER_CALIB["tokens"]), generator=g),)
           for _ in range(DECODER_CALIB["sequences"])]
    return Task(name="decoder_1b", model=model.eval(), example=ids[0], metric=None, eval=[], calib=ids)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> bool:
    """Start the kernel's RSS high-water mark (VmHWM) again from the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def calib_worker(run: str, threads: int) -> None:
    """In a fresh process: peak RSS of one quantizer call over the fp32 model's bytes, printed as JSON.

    Two phases, each with its own high-water mark: the embedding tables' quantization (the quantizer's
    first step, called here first; the quantizer then finds no float table left) and the rest (calibration
    and rounding). One forward of the first calibration batch runs before, so one-time allocations of a
    first inference (thread pools, allocator arenas) are not counted."""
    from slimkit import zoo
    from slimkit.quantize import Int8, WeightOnly
    from slimkit.quantize.int8 import quantize_int8
    from slimkit.quantize.ptq import quantize_embeddings
    from slimkit.quantize.weight_only import quantize_weight_only

    torch.set_num_threads(threads)
    model_name, method = run.split(".")[:2]
    blockwise = not run.endswith(".whole")
    task = decoder_task() if model_name == "decoder_1b" else zoo.load("minilm")
    model = task.model.eval()
    with torch.inference_mode():
        model(*task.calib[0])
    model_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if method == "ptq_static":
        config = Int8(activations="static", calibration="mse", symmetric=False)
        quantize = lambda: quantize_int8(model, config, task, blockwise=blockwise)  # noqa: E731
    else:
        config = WeightOnly(bits=4, group_size=128 if model_name == "decoder_1b" else 32, method="gptq")
        quantize = lambda: quantize_weight_only(model, config, task, blockwise=blockwise)  # noqa: E731
    before = _rss_kb("VmRSS") * 1024
    baseline = before - model_bytes  # what the process holds besides the model: interpreter, libraries, data
    reset = _reset_peak()
    start = time.perf_counter()
    quantize_embeddings(model, config, {})
    tables_peak = _rss_kb("VmHWM") * 1024
    reset = _reset_peak() and reset
    calib_start = _rss_kb("VmRSS") * 1024  # after the tables; the allocator may keep their freed temporaries
    quantize()
    seconds = time.perf_counter() - start
    rest_peak = _rss_kb("VmHWM") * 1024
    print(json.dumps({
        "peak_over_model": (max(tables_peak, rest_peak) - baseline) / model_bytes,
        "embedding_tables_peak_over_model": (tables_peak - baseline) / model_bytes,
        "calibration_peak_over_model": (rest_peak - baseline) / model_bytes,
        "calibration_growth_over_model": (rest_peak - calib_start) / model_bytes,
        "model_mb": model_bytes / 2**20, "rss_before_mb": before / 2**20,
        "peak_rss_mb": max(tables_peak, rest_peak) / 2**20, "rss_after_mb": _rss_kb("VmRSS") / 1024,
        "hwm_reset": reset, "seconds": seconds}))


def calibration_memory(threads: int, runs: list[str]) -> None:
    """Each calibration run in its own process; the results merged into ``results/calib_memory.json``
    as they come (other runs' results in the file are kept)."""
    path = RESULTS / "calib_memory.json"
    payload = json.loads(path.read_text()) if path.is_file() else {}
    method = ("fresh process per run, one warm-up forward; VmHWM reset via /proc/self/clear_refs after loading "
              "and read after the embedding tables' quantization and after the rest of the quantizer; "
              "peak_over_model = (max VmHWM - (RSS before - model bytes)) / fp32 model bytes")
    params = sum(_decoder_params())
    old = {k: payload.get(k, {}) for k in ("minilm", "decoder_1b")}
    payload["minilm"] = {
        **old["minilm"], "environment": environment(threads), "method": method,
        "setup": "all-MiniLM-L6-v2 (zoo minilm), its 128 calibration sentences in 8 batches; ptq_static: "
                 "Int8(activations='static', calibration='mse', symmetric=False); gptq: WeightOnly(bits=4, "
                 "group_size=32, method='gptq'); block by block over the 6 encoder layers",
        "whole_model_pass": old["minilm"].get("whole_model_pass", {})}
    payload["decoder_1b"] = {
        **old["decoder_1b"], "environment": environment(threads), "method": method,
        "setup": {**DECODER, "parameters": params, "weights": "random fp32", **DECODER_CALIB,
                  "quantizer": "WeightOnly(bits=4, group_size=128, method='gptq'), block by block (lm_head in "
                               "the whole-model pass)"},
        "whole_model_hessians_over_model": _whole_hessian_bytes() / (4 * params)}
    goal = 1.3
    payload["calibration_goal"] = f"peak_over_model <= {goal}"
    for run in runs:
        done = subprocess.run([sys.executable, __file__, "--calib-worker", run, "--threads", str(threads)],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{run} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(run, result, flush=True)
        model, method_name = run.split(".")[:2]
        latest = json.loads(path.read_text()) if path.is_file() else {}  # another run may have written meanwhile
        section = {**payload[model], **latest.get(model, {}), "environment": payload[model]["environment"]}
        if run.endswith(".whole"):
            section["whole_model_pass"] = {**section.get("whole_model_pass", {}), method_name: result}
        else:
            section[method_name] = result
        latest[model] = section
        latest["calibration_goal"] = payload["calibration_goal"]
        measured = [latest[m][k]["peak_over_model"] for m, k in (("minilm", "ptq_static"), ("minilm", "gptq"),
                                                                  ("decoder_1b", "gptq")) if k in latest.get(m, {})]
        latest["calibration_goal_met"] = all(v <= goal for v in measured) if len(measured) == 3 else None
        write("calib_memory", latest)


def _decoder_params() -> list[int]:
    d = DECODER
    block = 4 * d["dim"] ** 2 + 3 * d["dim"] * d["ffn"] + 2 * d["dim"]
    return [2 * d["vocab"] * d["dim"], d["layers"] * block, d["dim"]]


def _whole_hessian_bytes() -> int:
    """What gathering every Linear's float64 ``X^T X`` at once would hold on the decoder (not run: ~2x its weights)."""
    d = DECODER
    return 8 * (d["layers"] * (6 * d["dim"] ** 2 + d["ffn"] ** 2) + d["dim"] ** 2)


if __name__ == "__main__":
    main()
