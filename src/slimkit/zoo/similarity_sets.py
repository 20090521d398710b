"""The four human-judged text sets the minilm task is scored on (they ship with gensim), and their scores.

WordSim-353 and SimLex-999 word pairs (Spearman of cosine vs human similarity), Lee's 50 news
documents (Pearson over their 1,225 pairs) and sentence polarity (5-fold logistic regression on
the embeddings): only the embeddings are needed, so any runtime's outputs are scored alike.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch


def word_pairs(file: Path) -> tuple[list[str], list[str], np.ndarray]:
    a, b, human = [], [], []
    for line in file.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        w1, w2, score = line.split("\t")[:3]
        a.append(w1)
        b.append(w2)
        human.append(float(score))
    return a, b, np.asarray(human)


def lines_of(file: Path, encoding: str) -> list[str]:
    return [line.strip() for line in file.read_bytes().decode(encoding).splitlines() if line.strip()]


@dataclasses.dataclass
class SimilarityEval:
    """Every eval text tokenized once, deduplicated, in length-sorted batches, plus where each set's
    items live in the ``(N, 384)`` matrix of all embeddings."""

    texts: list[str]
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (input_ids, attention_mask, row index)
    wordsim: tuple[np.ndarray, np.ndarray, np.ndarray]  # rows of word1, rows of word2, human scores
    simlex: tuple[np.ndarray, np.ndarray, np.ndarray]
    lee: tuple[np.ndarray, np.ndarray]  # rows of the 50 docs, human scores of the 1,225 upper-triangle pairs
    polarity: tuple[np.ndarray, np.ndarray]  # rows of the 200 sentences, labels (0 neg, 1 pos)
    reference: torch.Tensor | None = None  # (N, 384) fp32 embeddings of the original model

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def tokens(self) -> int:
        return int(sum(int(mask.sum()) for _, mask, _ in self.batches))


def _correlation(x: np.ndarray, y: np.ndarray, rank: bool) -> float:
    """Pearson (or Spearman, ``rank=True``) r; 0.0 when ``x`` is constant (a collapsed model's
    embeddings carry no information: score it as such rather than as an undefined NaN)."""
    if np.ptp(x) < 1e-6:  # cosines are in [-1, 1]; this is float rounding, not a ranking
        return 0.0
    if rank:
        from scipy.stats import rankdata  # heavy, imported when used (scipy)

        x, y = rankdata(x), rankdata(y)  # average ranks for ties, as scipy.stats.spearmanr
    return float(np.corrcoef(x, y)[0, 1])


def scores(emb: torch.Tensor, data: SimilarityEval) -> dict[str, float]:
    """The four set scores from ``(N, 384)`` normalised embeddings (no model needed)."""
    from sklearn.linear_model import LogisticRegression  # optional (sklearn, extra 'zoo'): imported when used
    from sklearn.model_selection import (  # optional (sklearn, extra 'zoo'): imported when used
        StratifiedKFold,
        cross_val_score,
    )

    e = emb.numpy().astype(np.float64)
    out = {}
    for key, (a, b, human) in (("wordsim353", data.wordsim), ("simlex999", data.simlex)):
        out[key] = _correlation((e[a] * e[b]).sum(1), human, rank=True)
    docs, human = data.lee
    i, j = np.triu_indices(len(docs), 1)  # the 1,225 pairs above the diagonal, row-major like ``human``
    out["lee50"] = _correlation((e[docs[i]] * e[docs[j]]).sum(1), human, rank=False)
    rows, labels = data.polarity
    acc = cross_val_score(LogisticRegression(C=1.0, max_iter=1000), e[rows], labels, cv=StratifiedKFold(5))
    out["polarity"] = float(acc.mean())
    return out
