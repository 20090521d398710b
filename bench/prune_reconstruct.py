"""Reconstruction after channel pruning, bounded in time: a 0.49 M-parameter pitch CNN on 2 cores.

The model has the shape of the small pitch trackers users bring (six convs with 512- and 64-tap
kernels over 1,024 audio samples, BatchNorm, max-pooling, a 360-way dense head), once with
(k, 1) Conv2d kernels and once with Conv1d. It is pruned to 0.5 of its MACs; the least-squares
refit runs on 8 calibration batches of 32 frames (sine tones with noise) and is scored on 4 other
batches by the relative error of the logits against the unpruned model.

Compared in one process: slimkit's bounded reconstruction (rows subsampled to a few per unknown,
big Gram products in float32, ridge trials in float32) against the same least squares on every row
in float64 with the wider ridge grid (the unbounded form). Writes bench/results/prune_reconstruct.json.

    .venv/bin/python bench/prune_reconstruct.py [--threads 2] [--repeats 3] [--no-peer]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write  # noqa: E402

import slimkit as sk  # noqa: E402
import slimkit.prune.channels as channels  # noqa: E402
import slimkit.prune.reconstruct as rc  # noqa: E402
from slimkit.core.record import last_record  # noqa: E402
from slimkit.core.task import Task  # noqa: E402
from slimkit.measure.flops import count_flops  # noqa: E402

logging.getLogger("slimkit").setLevel(logging.ERROR)
SAMPLES = 1024


def pitch_cnn(conv1d: bool) -> nn.Module:
    """Six conv blocks (conv, ReLU, BatchNorm, max-pool by 2) and a dense head: 486,552 parameters."""
    torch.manual_seed(0)
    widths, kernels, strides = [128, 16, 16, 16, 32, 64], [512, 64, 64, 64, 64, 64], [4, 1, 1, 1, 1, 1]
    layers: list[nn.Module] = []
    cin = 1
    for width, k, s in zip(widths, kernels, strides):
        pad = ((k - 1) // 2, k // 2)
        if conv1d:
            layers += [nn.ConstantPad1d(pad, 0.0), nn.Conv1d(cin, width, k, s), nn.ReLU(), nn.BatchNorm1d(width),
                       nn.MaxPool1d(2)]
        else:
            layers += [nn.ZeroPad2d((0, 0) + pad), nn.Conv2d(cin, width, (k, 1), (s, 1)), nn.ReLU(),
                       nn.BatchNorm2d(width), nn.MaxPool2d((2, 1))]
        cin = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 4, 360)).eval()  # logits: (B, 360)


def frames(seed: int, conv1d: bool, batch: int = 32) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(SAMPLES) / 16000.0
    f0 = 80 + 900 * torch.rand(batch, 1, generator=g)
    x = torch.sin(2 * torch.pi * f0 * t) + 0.1 * torch.randn(batch, SAMPLES, generator=g)  # (B, 1024)
    return (x[:, None, :] if conv1d else x[:, None, :, None],)  # (B, 1, 1024) or (B, 1, 1024, 1)


def rel_error(model: nn.Module, reference: nn.Module, batches: list[tuple]) -> float:
    with torch.no_grad():
        errs = [float((model(*b) - reference(*b)).norm() / reference(*b).norm()) for b in batches]
    return statistics.mean(errs)


def unbounded() -> dict[str, Any]:
    """Module settings for the unbounded fit: every row, float64 throughout, the wider ridge grid."""
    return {"ROWS_PER_UNKNOWN": 10 ** 9, "SINGLE_PRECISION_FROM": 10 ** 9,
            "RIDGES": (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)}


def timed_refit(original: nn.Module, pruned: nn.Module, kept: dict, calib: list, settings: dict[str, Any],
                repeats: int) -> tuple[float, nn.Module]:
    saved = {k: getattr(rc, k) for k in settings}
    try:
        for k, v in settings.items():
            setattr(rc, k, v)
        times, out = [], pruned
        for _ in range(repeats):
            out = copy.deepcopy(pruned)
            start = time.perf_counter()
            rc.reconstruct(original, out, kept, calib)
            times.append(time.perf_counter() - start)
        return statistics.median(times), out
    finally:
        for k, v in saved.items():
            setattr(rc, k, v)


def run(conv1d: bool, repeats: int, peer: bool = True) -> dict[str, Any]:
    model = pitch_cnn(conv1d)
    calib = [frames(i, conv1d) for i in range(8)]
    test = [frames(100 + i, conv1d) for i in range(4)]
    task = Task(name="pitch", model=model, example=calib[0], metric=lambda run, data: {"score": 0.0}, eval=test,
                calib=calib)
    captured: dict[str, Any] = {}
    real = channels.reconstruct

    def capture(original: nn.Module, pruned: nn.Module, kept: dict, batches: list) -> tuple[dict, dict]:
        captured.update(original=copy.deepcopy(original), pruned=copy.deepcopy(pruned), kept=kept)
        return {}, {}

    channels.reconstruct = capture
    try:
        start = time.perf_counter()
        pruned = sk.apply(model, sk.prune.Channels(macs_ratio=0.5, reconstruct=True), task)
        prune_s = time.perf_counter() - start
    finally:
        channels.reconstruct = real
    before, after = last_record(pruned).macs
    bounded_s, bounded = timed_refit(captured["original"], captured["pruned"], captured["kept"], calib, {}, repeats)
    plain = rel_error(captured["pruned"], model, test)
    result = {"params": sum(p.numel() for p in model.parameters()), "macs_ratio_asked": 0.5,
              "macs_ratio_reached": after / before, "prune_s": prune_s, "reconstruct_s": {"slimkit": bounded_s},
              "heldout_logit_rel_error": {"no_reconstruction": plain, "slimkit": rel_error(bounded, model, test)}}
    if peer:  # the unbounded fit takes minutes: --no-peer leaves it out
        full_s, full = timed_refit(captured["original"], captured["pruned"], captured["kept"], calib, unbounded(), 1)
        result["reconstruct_s"].update(unbounded=full_s, speedup=full_s / bounded_s)
        result["heldout_logit_rel_error"]["unbounded"] = rel_error(full, model, test)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true", help="leave out the unbounded fit (minutes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"environment": environment(args.threads), "conv2d_k1": run(False, args.repeats, not args.no_peer),
              "conv1d": run(True, args.repeats, not args.no_peer)}
    path = write("prune_reconstruct", result)
    print(path)
    for name in ("conv2d_k1", "conv1d"):
        r = result[name]
        print(name, f"prune {r['prune_s']:.1f}s reconstruct {r['reconstruct_s']} MACs {r['macs_ratio_reached']:.3f} "
              f"err {r['heldout_logit_rel_error']}")


if __name__ == "__main__":
    main()
