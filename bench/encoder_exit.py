"""Early exit on a MiniLM-based polarity classifier: mean latency ratio at <= 0.5 pt accuracy drop.

The classifier is the real all-MiniLM-L6-v2 encoder (mean pooling, L2-normalised) with a
logistic-regression head: exactly how the minilm task scores polarity (gensim's 200 Pang-Lee
movie-review sentences, ``StratifiedKFold(5)`` without shuffling, ``C=1``), so the full model's
accuracy is the task's 0.730. Exits after encoder layers ``--after`` (0-based) get their own
logistic-regression heads on the frozen encoder's pooled features.

Protocol, per outer fold (160 train / 40 test sentences, nothing of the test fold seen):
  1. fit the final head and every exit head on the 160 train sentences;
  2. calibrate thresholds on out-of-fold predictions of the 160 (inner 5-fold: heads refitted on
     128, predicting 32), keeping the routed accuracy within ``--max-drop`` of the final head's;
  3. run the 40 test sentences through the routed model (real per-sample routing) and the full
     classifier. Accuracy is over all 200 sentences, each tested once.
Latency: every test sentence alone (batch 1, no padding) and each fold's 40 as one padded batch,
routed vs the full HF classifier, interleaved rounds, medians; torch eager, ``--threads``.

    .venv/bin/python bench/encoder_exit.py            # -> bench/results/encoder_exit.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment, write  # noqa: E402
from slimkit.architecture.encoder_exit import (_logistic_head, encoder_classifier, exit_features,  # noqa: E402
                                               attach_encoder_exits)
from slimkit.architecture.routing import choose_exit_set, choose_thresholds, confidence  # noqa: E402
from slimkit.measure.latency import interleaved_samples, median_call_ms  # noqa: E402
from slimkit.zoo import minilm  # noqa: E402


def _fold_heads(features: list[torch.Tensor], labels: np.ndarray, idx: np.ndarray) -> list[torch.nn.Linear]:
    return [_logistic_head(f[idx].double().numpy(), labels[idx], 1.0) for f in features]


def _oof(features: list[torch.Tensor], labels: np.ndarray, train: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-fold (E-1, N) confidences and (E, N) correctness of every exit over ``train``."""
    from sklearn.model_selection import StratifiedKFold

    conf = torch.zeros(len(features) - 1, len(train))
    correct = torch.zeros(len(features), len(train), dtype=torch.bool)
    for fit, hold in StratifiedKFold(5).split(train, labels[train]):
        heads = _fold_heads(features, labels, train[fit])
        with torch.no_grad():
            for e, (head, f) in enumerate(zip(heads, features)):
                logits = head(f[train[hold]])  # (n, 2)
                if e < len(features) - 1:
                    conf[e, hold] = confidence(logits)
                correct[e, hold] = torch.from_numpy(logits.argmax(-1).numpy() == labels[train[hold]])
    return conf, correct


def _load_fold(ee: Any, clf: Any, heads: list[torch.nn.Linear], thresholds: list[float]) -> None:
    with torch.no_grad():
        for head, fitted in zip(ee.heads, heads[:-1]):
            head.linear.load_state_dict(fitted.state_dict())
        ee.blocks[-1][1].linear.load_state_dict(heads[-1].state_dict())
        clf.head.load_state_dict(heads[-1].state_dict())
    ee.set_thresholds(thresholds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--after", default="2",
                    help="exit after these encoder layers (0-based; default: half depth), or 'auto': chosen per "
                         "fold on its train data")
    ap.add_argument("--alternatives", default="1,3;auto:2;auto:1",
                    help="placements also cross-validated, accuracy only ('auto:K': auto with at most K exits)")
    ap.add_argument("--max-exits", type=int, default=2, help="with --after auto: at most this many exits")
    ap.add_argument("--max-drop", type=float, default=0.005)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--accuracy-only", action="store_true", help="no timing, nothing written (choosing exits)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="outer cross-validations: the task's unshuffled folds, then shuffled ones (accuracy only)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    started = time.time()
    from sklearn.model_selection import StratifiedKFold

    encoder = minilm.build_minilm()
    data = minilm.build_eval()
    rows, labels = data.polarity
    texts = [data.texts[i] for i in rows]
    ids, mask = minilm.tokenize(texts, minilm.EVAL_MAX_LENGTH)  # (200, T)
    with torch.inference_mode():
        emb = encoder(ids, mask)
    clf = encoder_classifier(encoder, emb.numpy(), labels)
    every = attach_encoder_exits(clf, (ids[:4], mask[:4]), list(range(5)))  # exit candidates after layers 0..4
    layer_features = exit_features(every, [(ids, mask)])  # 6 x (200, 384), the last the classifier's own
    del every
    after = None if args.after == "auto" else [int(a) for a in args.after.split(",")]
    models: dict[tuple[int, ...], Any] = {}  # staged model per exit placement, sharing nothing with clf

    def staged(positions: list[int]) -> Any:
        if tuple(positions) not in models:
            models[tuple(positions)] = attach_encoder_exits(clf, (ids[:4], mask[:4]), positions)
        return models[tuple(positions)]
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    layer_acc = [float(cross_val_score(LogisticRegression(C=1.0, max_iter=2000), f.double().numpy(), labels,
                                       cv=StratifiedKFold(5)).mean()) for f in layer_features]
    lengths = mask.sum(1)
    if not args.accuracy_only:  # every sentence length seen once before any timing (kernel set-up per shape)
        with torch.inference_mode():
            for i in range(len(labels)):
                clf(ids[i:i + 1, :int(lengths[i])], mask[i:i + 1, :int(lengths[i])])
    def cross_validations(placement: list[int] | None, max_exits: int, timed: bool) -> list[dict[str, Any]]:
        out = []
        for r in range(args.repeats):
            splitter = StratifiedKFold(5) if r == 0 else StratifiedKFold(5, shuffle=True, random_state=r)
            out.append(_cross_validate(staged, placement, max_exits, clf, layer_features, labels, ids, mask, lengths,
                                       splitter, args, timed=timed and r == 0))
            print(f"repeat {r}: full {out[-1]['full_accuracy']:.3f} routed {out[-1]['routed_accuracy']:.3f} "
                  f"layers run {out[-1]['mean_layers_run']:.2f}", flush=True)
        return out

    def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
        full, routed = (float(np.mean([r[k] for r in runs])) for k in ("full_accuracy", "routed_accuracy"))
        return {"full_accuracy": full, "routed_accuracy": routed, "drop_pt": round(100 * (full - routed), 2),
                "mean_layers_run": float(np.mean([r["mean_layers_run"] for r in runs]))}

    alternatives = {}
    for alt in filter(None, args.alternatives.split(";")):
        placement = None if alt.startswith("auto") else [int(a) for a in alt.split(",")]
        print(f"alternative {alt}", flush=True)
        alternatives[alt] = summary(cross_validations(placement, int(alt.split(":")[1]) if ":" in alt else 2, False))
    previous = Path(__file__).parent / "results" / "encoder_exit.json"
    if not alternatives and previous.is_file():  # deterministic (no timing): keep the last computed ones
        alternatives = json.loads(previous.read_text()).get("alternatives_accuracy_only", {})
    repeats = cross_validations(after, args.max_exits, True)
    first = repeats[0]
    full_acc = float(np.mean([r["full_accuracy"] for r in repeats]))
    routed_acc = float(np.mean([r["routed_accuracy"] for r in repeats]))
    result = {
        "model": "all-MiniLM-L6-v2 + logistic-regression polarity head (the minilm task's polarity metric)",
        "data": "gensim pang_lee_polarity.cor, 200 sentences; outer StratifiedKFold(5) (repeat 0: the task's "
                "unshuffled folds, then shuffled), thresholds from 5-fold out-of-fold predictions inside each train fold",
        "exits_after_layers": after or f"chosen per outer fold on its train data (at most {args.max_exits} exits, "
                                       "cost = layers run, candidates after layers 0-4)",
        "max_drop": args.max_drop,
        "layer_cv_accuracy": {f"after_layer_{i}": round(a, 4) for i, a in enumerate(layer_acc)},
        "full_accuracy": full_acc, "routed_accuracy": routed_acc, "drop_pt": round(100 * (full_acc - routed_acc), 2),
        "drop_pt_per_repeat": [round(100 * (r["full_accuracy"] - r["routed_accuracy"]), 2) for r in repeats],
        "exit_layer_fraction": np.mean([r["exit_layer_fraction"] for r in repeats], 0).round(4).tolist(),
        "mean_layers_run": float(np.mean([r["mean_layers_run"] for r in repeats])),
        "batch1": first.get("batch1"), "batch40": first.get("batch40"), "timed_repeat": 0,
        "alternatives_accuracy_only": alternatives,
        "repeats": repeats, "runtime": "torch eager", "rounds": args.rounds,
        "load": {"loadavg_1m_start": load_start, "loadavg_1m_end": os.getloadavg()[0], "threads": args.threads,
                 "contended": max(load_start, os.getloadavg()[0]) > (os.cpu_count() or 1) - args.threads + 0.5},
        "seconds": round(time.time() - started, 1), "environment": environment(args.threads),
    }
    print(f"accuracy full {full_acc:.4f} routed {routed_acc:.4f} (drop {result['drop_pt']} pt over {args.repeats} "
          f"cross-validations); leaves after layer 1..6: {result['exit_layer_fraction']}")
    if not args.accuracy_only:
        path = write("encoder_exit", result)
        print(f"batch 1 {result['batch1']['speedup']:.2f}x, batch 40 {result['batch40']['speedup']:.2f}x -> {path}")


def _cross_validate(staged: Any, after: list[int] | None, max_exits: int, clf: Any, layer_features: list[torch.Tensor],
                    labels: np.ndarray, ids: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, splitter: Any,
                    args: argparse.Namespace, timed: bool) -> dict[str, Any]:
    """One outer cross-validation: every sentence tested once by the fold that did not train on it."""
    full_pred = np.zeros(len(labels), dtype=np.int64)
    routed_pred = np.zeros(len(labels), dtype=np.int64)
    exit_layer = np.zeros(len(labels), dtype=np.int64)  # layers each sentence ran (1..6)
    folds, single_ms, batch_ms = [], {"full": 0.0, "routed": 0.0}, {"full": 0.0, "routed": 0.0}
    per_sentence: dict[str, list[float]] = {"full": [], "routed": []}  # ms of each sentence alone, for p95
    for k, (train, test) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        if after is None:  # placement and thresholds from out-of-fold predictions on the train fold only
            conf, correct = _oof(layer_features, labels, train)
            positions, thresholds, _ = choose_exit_set(conf, correct, list(range(1, 7)), args.max_drop,
                                                       max_exits=max_exits)
        else:
            positions = after
            conf, correct = _oof([layer_features[a] for a in after] + [layer_features[-1]], labels, train)
            thresholds = choose_thresholds(conf, correct, args.max_drop)
        if not positions:  # no exit pays on this fold: the classifier itself
            positions, thresholds = [0], [1.0]
        features = [layer_features[a] for a in positions] + [layer_features[-1]]
        ee = staged(positions)
        _load_fold(ee, clf, _fold_heads(features, labels, train), thresholds)
        depth = positions + [5]  # the layer (0-based) each exit follows
        test_t = torch.from_numpy(test)
        width = int(lengths[test_t].max())
        batch = (ids[test_t, :width], mask[test_t, :width])  # (40, T) padded to the fold's longest
        singles = [(ids[i:i + 1, :int(lengths[i])], mask[i:i + 1, :int(lengths[i])]) for i in test]
        with torch.inference_mode():
            full_pred[test] = clf(*batch).argmax(-1).numpy()
            routed, fold_exits = [], []
            for s in singles:  # one sentence at a time: where each one leaves
                routed.append(ee(*s))
                fold_exits.append(int(ee.last_exits[0]))
            routed_pred[test] = torch.cat(routed).argmax(-1).numpy()
            exit_layer[test] = [depth[e] + 1 for e in fold_exits]
            batched = ee(*batch)  # the same sentences routed inside one padded batch
            same = int((batched.argmax(-1) == torch.cat(routed).argmax(-1)).sum())
        fold = {"fold": k, "exits_after_layers": positions, "thresholds": thresholds, "full_accuracy": float((full_pred[test] == labels[test]).mean()),
                "routed_accuracy": float((routed_pred[test] == labels[test]).mean()),
                "leave_after_layer": np.bincount(exit_layer[test], minlength=7)[1:].tolist(),
                "batch_equals_single": f"{same}/{len(test)}"}
        folds.append(fold)
        if not timed or args.accuracy_only:
            continue
        with torch.inference_mode():
            times = interleaved_samples({
                "full_single": lambda: [clf(*s) for s in singles], "routed_single": lambda: [ee(*s) for s in singles],
                "full_batch": lambda: clf(*batch), "routed_batch": lambda: ee(*batch)},
                rounds=args.rounds, min_time_s=0.2)
            for s in singles:  # each sentence: median of 3 calls, full and routed alternating
                per_sentence["full"].append(median_call_ms(lambda: clf(*s), 3))
                per_sentence["routed"].append(median_call_ms(lambda: ee(*s), 3))
        med = {name: statistics.median(v) for name, v in times.items()}
        for key in ("full", "routed"):
            single_ms[key] += med[f"{key}_single"]
            batch_ms[key] += med[f"{key}_batch"]
        fold["ms"] = {name: round(v, 3) for name, v in med.items()}
        print(f"fold {k}: exits after {positions} thresholds {[round(t, 3) for t in thresholds]} full "
              f"{fold['full_accuracy']:.3f} routed {fold['routed_accuracy']:.3f} leave {fold['leave_after_layer']} "
              f"ms {fold['ms']}", flush=True)
    n = len(labels)
    out: dict[str, Any] = {"full_accuracy": float((full_pred == labels).mean()),
                           "routed_accuracy": float((routed_pred == labels).mean()),
                           "exit_layer_fraction": (np.bincount(exit_layer, minlength=7)[1:] / n).round(4).tolist(),
                           "mean_layers_run": float(exit_layer.mean()),
                           "folds": folds}
    if timed and not args.accuracy_only:
        out["batch1"] = {"full_mean_ms": single_ms["full"] / n, "routed_mean_ms": single_ms["routed"] / n,
                         "speedup": single_ms["full"] / single_ms["routed"],
                         **{f"{k}_p95_ms": float(np.percentile(v, 95)) for k, v in per_sentence.items()},
                         "p95_ratio": float(np.percentile(per_sentence["full"], 95) / np.percentile(per_sentence["routed"], 95))}
        out["batch40"] = {"full_mean_ms": batch_ms["full"] / len(folds), "routed_mean_ms": batch_ms["routed"] / len(folds),
                          "speedup": batch_ms["full"] / batch_ms["routed"]}
    return out


if __name__ == "__main__":
    main()
