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
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment, write  # noqa: E402
from slimkit.architecture.encoder_exit import (_logistic_head, encoder_classifier, exit_features,  # noqa: E402
                                               attach_encoder_exits)
from slimkit.architecture.routing import choose_thresholds, confidence  # noqa: E402
from slimkit.measure.latency import interleaved_samples  # noqa: E402
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
    ap.add_argument("--after", default="1,3", help="exit after these encoder layers (0-based)")
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
    after = [int(a) for a in args.after.split(",")]
    every = attach_encoder_exits(clf, (ids[:4], mask[:4]), list(range(5)))  # per-layer features, for the record
    layer_features = exit_features(every, [(ids, mask)])
    del every
    ee = attach_encoder_exits(clf, (ids[:4], mask[:4]), after)
    features = [layer_features[a] for a in after] + [layer_features[-1]]  # E x (200, 384)
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    layer_acc = [float(cross_val_score(LogisticRegression(C=1.0, max_iter=2000), f.double().numpy(), labels,
                                       cv=StratifiedKFold(5)).mean()) for f in layer_features]
    lengths = mask.sum(1)
    repeats = []
    for r in range(args.repeats):
        splitter = StratifiedKFold(5) if r == 0 else StratifiedKFold(5, shuffle=True, random_state=r)
        repeats.append(_cross_validate(ee, clf, features, labels, ids, mask, lengths, splitter, args, timed=r == 0))
        print(f"repeat {r}: full {repeats[-1]['full_accuracy']:.3f} routed {repeats[-1]['routed_accuracy']:.3f} "
              f"exits {repeats[-1]['exit_fraction']}", flush=True)
    first = repeats[0]
    full_acc = float(np.mean([r["full_accuracy"] for r in repeats]))
    routed_acc = float(np.mean([r["routed_accuracy"] for r in repeats]))
    result = {
        "model": "all-MiniLM-L6-v2 + logistic-regression polarity head (the minilm task's polarity metric)",
        "data": "gensim pang_lee_polarity.cor, 200 sentences; outer StratifiedKFold(5) (repeat 0: the task's "
                "unshuffled folds, then shuffled), thresholds from 5-fold out-of-fold predictions inside each train fold",
        "exits_after_layers": after, "max_drop": args.max_drop,
        "layer_cv_accuracy": {f"after_layer_{i}": round(a, 4) for i, a in enumerate(layer_acc)},
        "full_accuracy": full_acc, "routed_accuracy": routed_acc, "drop_pt": round(100 * (full_acc - routed_acc), 2),
        "drop_pt_per_repeat": [round(100 * (r["full_accuracy"] - r["routed_accuracy"]), 2) for r in repeats],
        "exit_fraction": np.mean([r["exit_fraction"] for r in repeats], 0).round(4).tolist(),
        "batch1": first.get("batch1"), "batch40": first.get("batch40"), "timed_repeat": 0,
        "repeats": repeats, "runtime": "torch eager", "rounds": args.rounds,
        "load": {"loadavg_1m_start": load_start, "loadavg_1m_end": os.getloadavg()[0], "threads": args.threads,
                 "contended": max(load_start, os.getloadavg()[0]) > (os.cpu_count() or 1) - args.threads + 0.5},
        "seconds": round(time.time() - started, 1), "environment": environment(args.threads),
    }
    print(f"accuracy full {full_acc:.4f} routed {routed_acc:.4f} (drop {result['drop_pt']} pt over {args.repeats} "
          f"cross-validations); exits {result['exit_fraction']}")
    if not args.accuracy_only:
        path = write("encoder_exit", result)
        print(f"batch 1 {result['batch1']['speedup']:.2f}x, batch 40 {result['batch40']['speedup']:.2f}x -> {path}")


def _cross_validate(ee: Any, clf: Any, features: list[torch.Tensor], labels: np.ndarray, ids: torch.Tensor,
                    mask: torch.Tensor, lengths: torch.Tensor, splitter: Any, args: argparse.Namespace,
                    timed: bool) -> dict[str, Any]:
    """One outer cross-validation: every sentence tested once by the fold that did not train on it."""
    full_pred = np.zeros(len(labels), dtype=np.int64)
    routed_pred = np.zeros(len(labels), dtype=np.int64)
    exits = np.zeros(len(labels), dtype=np.int64)
    folds, single_ms, batch_ms = [], {"full": 0.0, "routed": 0.0}, {"full": 0.0, "routed": 0.0}
    for k, (train, test) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        heads = _fold_heads(features, labels, train)
        conf, correct = _oof(features, labels, train)
        thresholds = choose_thresholds(conf, correct, args.max_drop)
        _load_fold(ee, clf, heads, thresholds)
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
            exits[test] = fold_exits
            batched = ee(*batch)  # the same sentences routed inside one padded batch
            same = int((batched.argmax(-1) == torch.cat(routed).argmax(-1)).sum())
        fold = {"fold": k, "thresholds": thresholds, "full_accuracy": float((full_pred[test] == labels[test]).mean()),
                "routed_accuracy": float((routed_pred[test] == labels[test]).mean()),
                "exit_fraction": np.bincount(exits[test], minlength=len(features)).tolist(),
                "batch_equals_single": f"{same}/{len(test)}"}
        folds.append(fold)
        if not timed or args.accuracy_only:
            continue
        with torch.inference_mode():
            times = interleaved_samples({
                "full_single": lambda: [clf(*s) for s in singles], "routed_single": lambda: [ee(*s) for s in singles],
                "full_batch": lambda: clf(*batch), "routed_batch": lambda: ee(*batch)},
                rounds=args.rounds, min_time_s=0.2)
        med = {name: statistics.median(v) for name, v in times.items()}
        for key in ("full", "routed"):
            single_ms[key] += med[f"{key}_single"]
            batch_ms[key] += med[f"{key}_batch"]
        fold["ms"] = {name: round(v, 3) for name, v in med.items()}
        print(f"fold {k}: thresholds {[round(t, 3) for t in thresholds]} full {fold['full_accuracy']:.3f} "
              f"routed {fold['routed_accuracy']:.3f} exits {fold['exit_fraction']} ms {fold['ms']}", flush=True)
    n = len(labels)
    out: dict[str, Any] = {"full_accuracy": float((full_pred == labels).mean()),
                           "routed_accuracy": float((routed_pred == labels).mean()),
                           "exit_fraction": (np.bincount(exits, minlength=len(features)) / n).round(4).tolist(),
                           "folds": folds}
    if timed and not args.accuracy_only:
        out["batch1"] = {"full_mean_ms": single_ms["full"] / n, "routed_mean_ms": single_ms["routed"] / n,
                         "speedup": single_ms["full"] / single_ms["routed"]}
        out["batch40"] = {"full_mean_ms": batch_ms["full"] / len(folds), "routed_mean_ms": batch_ms["routed"] / len(folds),
                          "speedup": batch_ms["full"] / batch_ms["routed"]}
    return out


if __name__ == "__main__":
    main()
