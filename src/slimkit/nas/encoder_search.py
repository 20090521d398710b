"""Scoring encoder NAS members: cosine to the original on held-out text, latency measured, and a
fitted latency model that says how far measurements can be skipped.

The proxy is the mean cosine between the member's and the original's sentence embeddings: it
needs no labels, costs one forward pass over a few batches, and is what distillation later
optimises, so ranking members by it before distilling ranks them by their starting point.
The searchers of :mod:`slimkit.nas.arch_search` (TPE / NSGA-II and evolution) drive this evaluator as
they drive the CNN ones.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core.errors import SlimkitError
from slimkit.core.task import Task
from slimkit.distill import Distill, distill
from slimkit.measure.latency_table import time_calls
from slimkit.nas.arch_search import Evaluation
from slimkit.nas.encoder import EncoderArch, Ranking, rank, subnet

Inputs = Sequence[tuple[torch.Tensor, ...]]


def mean_cosine(model: nn.Module, reference: Sequence[torch.Tensor], inputs: Inputs) -> float:
    """Mean per-sentence cosine between ``model``'s outputs and the ``reference`` outputs."""
    with torch.inference_mode():
        sims = [F.cosine_similarity(model(*x).float(), ref.float(), dim=-1) for x, ref in zip(inputs, reference)]
    return float(torch.cat(sims).mean())


class EncoderEvaluator:
    """``evaluator(arch, source)`` -> :class:`Evaluation` with ``accuracy`` = cosine proxy (each arch once)."""

    def __init__(self, model: nn.Module, val: Inputs, timing_input: tuple[torch.Tensor, ...], *,
                 rank_inputs: Inputs = (), threads: int | None = None) -> None:
        if not val:
            raise SlimkitError("encoder NAS needs validation inputs for its cosine proxy",
                               "pass a few batches of held-out text (the task's calib batches)")
        self.model, self.val, self.timing_input, self.threads = model.eval(), list(val), timing_input, threads
        self.ranking: Ranking = rank(model, rank_inputs)
        with torch.inference_mode():
            self.reference = [model(*x) for x in self.val]
        self.cache: dict[EncoderArch, Evaluation] = {}
        self.predictor: LatencyModel | None = None
        self.reference_ms = self._times({"reference": self.model}, rounds=7)["reference"]

    def _times(self, models: dict[str, nn.Module], rounds: int) -> dict[str, float]:

        x = self.timing_input
        return time_calls({k: (lambda m=m: m(*x)) for k, m in models.items()}, self.threads, rounds, 0.1)

    def latency(self, member: nn.Module) -> float:
        """ms at the serving shape, timed in rounds interleaved with the original and scaled by the
        original's own median: a busy moment on a shared machine slows both and cancels out."""
        times = self._times({"reference": self.model, "candidate": member}, rounds=3)
        return self.reference_ms * times["candidate"] / times["reference"]

    def __call__(self, arch: EncoderArch, source: str = "") -> Evaluation:
        if arch not in self.cache:
            member = subnet(self.model, arch, self.ranking)
            cos = mean_cosine(member, self.reference, self.val)
            lat = self.latency(member)
            predicted = self.predictor.predict(arch) if self.predictor is not None else None
            self.cache[arch] = Evaluation(arch, cos, lat, predicted, source)  # type: ignore[arg-type]
        return self.cache[arch]


@dataclasses.dataclass
class LatencyModel:
    """``ms = c0 + layers * (c1 + c2 * heads + c3 * ffn)``, least squares on measured members.

    The form follows the cost: each kept block pays a fixed part (LayerNorms, residuals, the
    hidden-width projections' overhead), a part linear in its heads (q/k/v, attention, output
    projection) and a part linear in its FFN width; outside the blocks (embeddings) is constant.
    """

    coef: tuple[float, float, float, float]

    @staticmethod
    def features(arch: EncoderArch) -> list[float]:
        return [1.0, float(arch.layers), float(arch.layers * arch.heads), float(arch.layers * arch.ffn)]

    @classmethod
    def fit(cls, evals: Sequence[Evaluation]) -> "LatencyModel":
        if len(evals) < 4:
            raise SlimkitError(f"the latency model needs at least 4 measured members, got {len(evals)}",
                               "measure more members before fitting")
        x = torch.tensor([cls.features(e.arch) for e in evals], dtype=torch.float64)  # (n, 4)
        y = torch.tensor([e.latency_ms for e in evals], dtype=torch.float64)  # (n,)
        # Relative error is what matters: weight each row by 1/y so small members count as much as big ones.
        w = 1.0 / y
        coef = torch.linalg.lstsq(x * w[:, None], y * w).solution
        return cls(tuple(float(c) for c in coef))  # type: ignore[arg-type]

    def predict(self, arch: EncoderArch) -> float:
        return float(sum(c * f for c, f in zip(self.coef, self.features(arch))))


def held_out_error(evals: Sequence[Evaluation]) -> dict[str, float]:
    """Leave-one-out mean and max relative error of :class:`LatencyModel` on measured members."""
    errors = []
    for i, e in enumerate(evals):
        fitted = LatencyModel.fit([o for j, o in enumerate(evals) if j != i])
        errors.append(abs(fitted.predict(e.arch) - e.latency_ms) / e.latency_ms)
    return {"mean_rel_error": sum(errors) / len(errors), "max_rel_error": max(errors), "members": len(errors)}


def rerank(evaluator: EncoderEvaluator, task: Task, candidates: Sequence[EncoderArch], *, steps: int = 40,
           lr: float = 1e-4, threads: int | None = None) -> list[tuple[EncoderArch, float]]:
    """Candidates re-scored by their cosine proxy after ``steps`` of distillation from the original, best first.

    The untrained slice's cosine says where a member starts, not how far distillation takes it:
    on MiniLM a thin 6-layer member and a wide 3-layer one start equal and end 0.02 apart in score.
    A short distillation of a few finalists (one per depth, say) ranks them by where they head.
    """

    scored = []
    for arch in candidates:
        member = subnet(evaluator.model, arch, evaluator.ranking)
        distill(member, task, Distill(steps=steps, lr=lr), progress=False, threads=threads)
        scored.append((arch, mean_cosine(member, evaluator.reference, evaluator.val)))
    return sorted(scored, key=lambda s: -s[1])


def best_per_depth(evals: Sequence[Evaluation], max_latency_ms: float) -> list[EncoderArch]:
    """The best feasible member (by the untrained proxy) of every layer count: finalists for :func:`rerank`."""
    best: dict[int, Evaluation] = {}
    for e in evals:
        arch = e.arch
        if e.latency_ms <= max_latency_ms and (arch.layers not in best or e.accuracy > best[arch.layers].accuracy):  # type: ignore[attr-defined]
            best[arch.layers] = e  # type: ignore[attr-defined]
    return [best[k].arch for k in sorted(best)]  # type: ignore[misc]
