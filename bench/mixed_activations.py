"""Mixed precision with int8 x int8 layers vs weight-only: same bits per layer, same bytes, speed and quality.

``Mixed(activations="dynamic")`` quantizes the inputs of the 8-bit layers per batch (fbgemm / oneDNN
integer kernels) beside weight-only int4 layers; ``"none"`` keeps every layer weight-only. Both use
one cost measurement, so the solver picks identical widths and only the 8-bit kernels differ.

    .venv/bin/python bench/mixed_activations.py [--threads 2] [--tasks mnist,minilm]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import environment, model_latencies, write  # noqa: E402
from slimkit.core.record import last_record  # noqa: E402

#: Budget between uniform int4 and int8 bytes, where the solver mixes widths (per task).
BUDGET = {"mnist": 0.22, "minilm": 0.2}


def part(name: str, threads: int) -> dict[str, Any]:
    import slimkit as sk
    from slimkit.quantize.mixed import Mixed, measure_costs

    task = sk.zoo.load(name)
    model = task.model.eval()
    costs = measure_costs(model, Mixed(budget_ratio=BUDGET[name]), task)
    models: dict[str, torch.nn.Module] = {"fp32": model}
    rows: dict[str, Any] = {"fp32": task.evaluate(model)}
    for act in ("none", "dynamic"):
        q = sk.apply(model, Mixed(budget_ratio=BUDGET[name], measured=costs, activations=act), task)
        models[f"mixed {act}"] = q
        rows[f"mixed {act}"] = {**task.evaluate(q), "bits": last_record(q).bits,
                                "weight_bytes": last_record(q).weight_bytes}
    x = task.example if name == "minilm" else (torch.cat([b[0][0] for b in task.eval])[:256],)
    la = os.getloadavg()[0]
    times = model_latencies(models, tuple(x), baseline="fp32", threads=threads, rounds=7)
    for k in rows:
        rows[k]["latency_ms"], rows[k]["speedup_vs_fp32"] = times[k]["median_ms"], round(times[k]["speedup"], 3)
    rows["dynamic_vs_weight_only"] = round(times["mixed none"]["median_ms"] / times["mixed dynamic"]["median_ms"], 3)
    return {"budget_ratio": BUDGET[name], "shape": [list(t.shape) for t in x], "rows": rows,
            "load": {"loadavg_1m": round(la, 2), "contended": la > 0.5 * (os.cpu_count() or 1)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default="mnist,minilm")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    payload: dict[str, Any] = {"environment": environment(args.threads)}
    for name in args.tasks.split(","):
        payload[name] = part(name, args.threads)
        print(name, {k: (v.get("score"), v.get("speedup_vs_fp32")) if isinstance(v, dict) else v
                     for k, v in payload[name]["rows"].items()})
    print(write("mixed_activations", payload))


if __name__ == "__main__":
    main()
