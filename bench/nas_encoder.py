"""Encoder NAS on the real MiniLM: layers x heads x FFN width under a measured latency limit.

(a) every member of the space (64) is scored — cosine to fp32 on held-out calibration text and
    latency measured at the task's serving shape — as ground truth for the searchers;
(b) TPE and evolution run as the optimizer would run them; where they land against (a);
(c) the fitted latency model's leave-one-out error over all measured members;
(d) re-ranking: the best feasible member of every depth, each distilled ``--rerank-steps`` steps,
    re-scored by the same cosine proxy;
(e) finalists — the best member by the untrained proxy, the re-ranked winner and the hand-made
    3-layer student (layers 1, 3, 5, all heads, full FFN) — each distilled from fp32 with the same
    steps: task score, cosine, latency (interleaved medians in one process).

    .venv/bin/python bench/nas_encoder.py [--threads 2] [--speedup 2.0] [--steps 200] [--trials 16] [--rerank-steps 40]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench._common import environment, model_latencies, write  # noqa: E402

LR = 1e-4  # the pre-trained encoder's distillation rate (as in bench/factorize_distill.py)


def load() -> dict[str, Any]:
    la = os.getloadavg()[0]
    return {"loadavg_1m": round(la, 2), "contended": la > 0.5 * (os.cpu_count() or 1)}


def main() -> None:
    import slimkit as sk
    from slimkit.distill import Distill, distill
    from slimkit.nas.encoder import EncoderArch, EncoderSpace, subnet
    from slimkit.nas.encoder_search import EncoderEvaluator, LatencyModel, best_per_depth, held_out_error, rerank
    from slimkit.nas.arch_search import best_feasible, evolve, optuna_search

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speedup", type=float, default=2.0, help="latency limit = original / speedup")
    ap.add_argument("--steps", type=int, default=200, help="distillation steps for each finalist")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--rerank-steps", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started, load_before = time.time(), load()
    task = sk.zoo.load("minilm")
    model = task.model.eval()
    space = EncoderSpace.from_model(model)
    evaluate = EncoderEvaluator(model, task.calib, task.example, rank_inputs=task.train[:8], threads=args.threads)
    limit = evaluate.reference_ms / args.speedup  # the original's median of 7 interleaved rounds

    t0 = time.time()
    searched = optuna_search(space, evaluate, limit, trials=args.trials, progress=True)  # type: ignore[arg-type]
    searched += evolve(space, evaluate, limit, generations=2, population=4, children=4, start=searched,  # type: ignore[arg-type]
                       progress=True)
    search_s = time.time() - t0
    found = best_feasible(searched, limit)
    everything = [evaluate(a, "exhaustive") for a in space.members()]
    truth = best_feasible(everything, limit)
    feasible = sorted((e for e in everything if e.latency_ms <= limit), key=lambda e: -e.accuracy)
    rank_of_found = next(i for i, e in enumerate(feasible) if found is not None and e.arch == found.arch) + 1 \
        if found is not None else None
    model_fit = LatencyModel.fit(everything)

    t0 = time.time()
    reranked = rerank(evaluate, task, best_per_depth(everything, limit), steps=args.rerank_steps, lr=LR,
                      threads=args.threads)
    rerank_s = time.time() - t0
    hand = EncoderArch(layers=3, heads=space.heads[-1], ffn=space.ffns[-1])
    finalists = {"nas (untrained proxy)": truth.arch if truth else None,
                 "nas (re-ranked)": reranked[0][0] if reranked and (truth is None or reranked[0][0] != truth.arch) else None,
                 "3-layer student": hand}
    base_scores = task.evaluate(model)
    rows: dict[str, Any] = {}
    models: dict[str, torch.nn.Module] = {"fp32": model}
    for name, arch in finalists.items():
        if arch is None:
            continue
        student = subnet(model, arch, evaluate.ranking)
        before = task.evaluate(student)
        t = time.time()
        distill(student, task, Distill(steps=args.steps, lr=LR), progress=True, threads=args.threads)
        after = task.evaluate(student)
        models[name] = student
        rows[name] = {"arch": arch.to_dict(), "params": sum(p.numel() for p in student.parameters()),
                      "proxy_cosine": evaluate(arch).accuracy, "search_latency_ms": evaluate(arch).latency_ms,
                      "score_before": before["score"], "cosine_before": before.get("cosine_to_fp32"),
                      "score_distilled": after["score"], "cosine_distilled": after.get("cosine_to_fp32"),
                      "score_drop": round(base_scores["score"] - after["score"], 4), "distill_s": round(time.time() - t, 1)}
    latency = model_latencies(models, task.example, baseline="fp32", threads=args.threads, rounds=7)
    for name in rows:
        rows[name]["latency_ms"] = latency[name]["median_ms"]
        rows[name]["speedup"] = round(latency[name]["speedup"], 3)

    payload = {
        "environment": environment(args.threads), "load_before": load_before, "load_after": load(),
        "settings": {"speedup": args.speedup, "steps": args.steps, "trials": args.trials, "lr": LR,
                     "timing_shape": [list(x.shape) for x in task.example], "proxy": "mean cosine to fp32, calib text (128 sentences)",
                     "ranking": "head/unit contribution on 8 train batches"},
        "space": {"layers": space.layers, "heads": space.heads, "ffns": space.ffns, "members": len(everything)},
        "baseline": {"score": base_scores["score"], "latency_ms_in_search": evaluate.reference_ms,
                     "latency_ms": latency["fp32"]["median_ms"], "params": sum(p.numel() for p in model.parameters())},
        "limit_ms": limit,
        "search": {"evaluations": len({e.arch for e in searched}), "seconds": round(search_s, 1),
                   "found": found.to_dict() if found else None, "exhaustive_best": truth.to_dict() if truth else None,
                   "found_rank_among_feasible": rank_of_found, "feasible_members": len(feasible)},
        "rerank": {"steps": args.rerank_steps, "seconds": round(rerank_s, 1),
                   "scored": [{"arch": a.to_dict(), "cosine_after": c, "cosine_untrained": evaluate(a).accuracy,
                               "latency_ms": evaluate(a).latency_ms} for a, c in reranked]},
        "latency_model": {"coef_ms": model_fit.coef, **held_out_error(everything)},
        "members": [e.to_dict() for e in everything],
        "finalists": rows,
        "seconds": round(time.time() - started, 1),
    }
    path = write("nas_encoder", payload)
    print(path)
    print({k: (v["score_distilled"], v["cosine_distilled"], v["speedup"]) for k, v in rows.items()},
          payload["search"]["found_rank_among_feasible"], payload["latency_model"]["mean_rel_error"])


if __name__ == "__main__":
    main()
