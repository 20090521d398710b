"""Where a search's time goes on a 1-20 M-parameter model a user brings, and whether --time-budget holds.

An 11.2 M-parameter ResNet-18-shaped image classifier (HF ``ResNetForImageClassification``, random
seeded weights, 64x64 inputs), written with ``save_pretrained`` and handed to ``slimkit optimize
--model DIR`` with default settings, no labels (agreement with the original is the metric), a size
limit and ``--time-budget``. Recorded: the whole command's seconds against the budget, each trial's
seconds (median, slowest) and the report's split of them (technique steps, build, latency, metric).

With ``--model minilm`` the same command runs on the MiniLM package's directory (a real pre-trained
22.7 M-parameter sentence encoder, cosine to the original as the metric) with the issue's target,
``--max-size-mb 5 --max-drop 0.01``; results go to ``search_time_minilm.json``.

    .venv/bin/python bench/search_time.py [--threads 2] [--budget 300] [--trials 30] [--model resnet18|minilm]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write  # noqa: E402

from slimkit.cli import app  # noqa: E402

logging.getLogger("slimkit").setLevel(logging.ERROR)


def resnet18_dir(root: Path) -> tuple[Path, int]:
    import transformers

    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                                       layer_type="basic", num_labels=10, image_size=64)
    model = transformers.ResNetForImageClassification(config)
    path = root / "resnet18"
    model.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=300.0)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--model", choices=["resnet18", "minilm"], default="resnet18")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "minilm":
            from slimkit.zoo.minilm import model_path

            directory, limits = model_path(), ["--max-size-mb", "5", "--max-drop", "0.01"]
            params = 22_713_216
        else:
            (directory, params), limits = resnet18_dir(Path(tmp)), ["--max-size-mb", "12", "--max-drop", "0.05"]
        out = Path(tmp) / "run"
        start = time.perf_counter()
        result = CliRunner().invoke(app, ["optimize", "--model", str(directory), *limits, "--threads", str(args.threads),
                                          "--trials", str(args.trials), "--time-budget", str(args.budget),
                                          "--out", str(out)])
        seconds = time.perf_counter() - start
        if result.exit_code != 0:
            raise SystemExit(result.output)
        search = json.loads((out / "result.json").read_text())
    trials = search["trials"]
    trial_s = [t["measured"]["seconds"] for t in trials]
    phases: dict[str, list[float]] = {}
    for t in trials:
        for phase, s in (t["measured"].get("timings") or {}).items():
            phases.setdefault(phase, []).append(s)
    data = {
        "environment": environment(args.threads),
        "model": {"name": "HF ResNet-18 shape (random weights), 64x64 inputs" if args.model == "resnet18"
                  else "all-MiniLM-L6-v2 package directory (pre-trained)", "params": params, "target": limits},
        "budget_s": args.budget, "command_s": seconds, "within_budget": seconds <= args.budget,
        "trials": len(trials), "trial_s": {"median": statistics.median(trial_s), "max": max(trial_s)},
        "search_phases_s": search.get("phases", {}),
        "inside_trials_s": {k: {"total": sum(v), "median": statistics.median(v)} for k, v in phases.items()},
        "best": None if search["best"] is None else {"pipeline": [s["type"] for s in search["best"]["recipe"]],
                                                      **{k: search["best"]["measured"][k]
                                                         for k in ("size_mb", "latency_ms", "drop", "backend")}},
        "baseline": {k: search["baseline"][k] for k in ("size_mb", "latency_ms")},
        "hints": search.get("hints", []),
    }
    write("search_time" if args.model == "resnet18" else "search_time_minilm", data)
    print(json.dumps({k: data[k] for k in ("command_s", "budget_s", "trials", "trial_s", "search_phases_s")}, indent=1))


if __name__ == "__main__":
    main()
