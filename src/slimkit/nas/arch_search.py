"""Hardware-aware search: the task's metric under a latency limit that is *measured* for every candidate.

Candidates are scored by an evaluator (a trained supernet's slice with re-estimated BatchNorm,
:class:`SupernetEvaluator`, or a short training from scratch, :class:`TrainEvaluator`) on a
validation split carved from the training data, never on the test split that reports the result.
Latency is timed on the built model at the serving batch; given a ``reference`` model (the one
being replaced) each candidate is timed in interleaved rounds with it and its latency reported
as ``reference_ms x candidate / reference``, so a busy moment on a shared machine slows both
alike instead of deciding feasibility. Two searchers share the evaluator and
its cache: Optuna (TPE with the latency limit as a constraint, or NSGA-II for the
accuracy/latency front) and a small (mu + lambda) evolution seeded with the best feasible ones.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.core.progress import progress_bar
from slimkit.core.task import accuracy
from slimkit.measure import measure_latency
from slimkit.measure.latency_table import time_calls
from slimkit.nas.cnn import CNNArch, CNNSpace, build
from slimkit.nas.predictor import LatencyPredictor
from slimkit.nas.supernet import SuperCNN, recalibrate_bn

Batches = Sequence[tuple[tuple[torch.Tensor, ...], torch.Tensor]]


@dataclasses.dataclass
class Evaluation:
    arch: CNNArch
    accuracy: float        # on the validation split
    latency_ms: float      # measured p50 at the serving batch
    predicted_ms: float | None = None
    source: str = ""       # which searcher proposed it first

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch.to_dict(), "accuracy": self.accuracy, "latency_ms": self.latency_ms,
                "predicted_ms": self.predicted_ms, "source": self.source}


class _Evaluator:
    """Caching base: ``evaluator(arch, source)`` -> :class:`Evaluation` (each architecture once)."""

    def __init__(self, val: Batches, batch: int, threads: int | None, table: LatencyPredictor | None,
                 reference: nn.Module | None = None, rounds: int = 3) -> None:
        self.val, self.batch, self.threads, self.table = val, batch, threads, table
        self.cache: dict[CNNArch, Evaluation] = {}
        x = val[0][0][0]  # (B, C, H, W)
        reps = -(-batch // x.shape[0])
        self.timing_input = x.repeat(reps, 1, 1, 1)[:batch]  # (batch, C, H, W) real images
        self.reference, self.rounds = reference, rounds
        self.reference_ms: float | None = None
        if reference is not None:
            self.reference_ms = self._times({"reference": reference.eval()}, rounds=7)["reference"]

    def _times(self, models: dict[str, nn.Module], rounds: int) -> dict[str, float]:

        x = self.timing_input
        return time_calls({k: (lambda m=m: m(x)) for k, m in models.items()}, self.threads, rounds, 0.1)

    def latency(self, model: nn.Module) -> float:
        """Measured ms at the serving batch (relative to the reference when there is one)."""
        if self.reference is None or self.reference_ms is None:

            return measure_latency(model, (self.timing_input,), threads=self.threads, min_time_s=0.2).p50_ms
        times = self._times({"reference": self.reference, "candidate": model}, self.rounds)
        return self.reference_ms * times["candidate"] / times["reference"]

    def model(self, arch: CNNArch) -> nn.Module:
        raise NotImplementedError

    def __call__(self, arch: CNNArch, source: str = "") -> Evaluation:
        if arch not in self.cache:
            model = self.model(arch).eval()
            with torch.inference_mode():
                acc = accuracy(model, self.val)
            lat = self.latency(model)
            predicted = self.table.predict(arch) if self.table is not None else None
            self.cache[arch] = Evaluation(arch, acc, lat, predicted, source)
        return self.cache[arch]


class SupernetEvaluator(_Evaluator):
    """A member = the supernet's slice with BatchNorm statistics re-estimated on ``calib`` inputs."""

    def __init__(self, supernet: SuperCNN, calib: Sequence[torch.Tensor], val: Batches, *, batch: int,
                 threads: int | None = None, table: LatencyPredictor | None = None, reference: nn.Module | None = None,
                 rounds: int = 3) -> None:
        super().__init__(val, batch, threads, table, reference, rounds)
        self.supernet, self.calib = supernet, calib

    def model(self, arch: CNNArch) -> nn.Module:
        return recalibrate_bn(self.supernet.extract(arch), self.calib)


class TrainEvaluator(_Evaluator):
    """A member = the architecture trained from scratch for ``steps`` by ``train(model)``."""

    def __init__(self, train: Callable[[nn.Module], None], val: Batches, *, batch: int, threads: int | None = None,
                 table: LatencyPredictor | None = None, seed: int = 0, reference: nn.Module | None = None) -> None:
        super().__init__(val, batch, threads, table, reference)
        self.train, self.seed = train, seed

    def model(self, arch: CNNArch) -> nn.Module:
        torch.manual_seed(self.seed)
        model = build(arch)
        self.train(model)
        return model


def optuna_search(space: CNNSpace, evaluate: _Evaluator, max_latency_ms: float, trials: int, *,
                  sampler: str = "tpe", seed: int = 0, progress: bool = True) -> list[Evaluation]:
    """TPE: maximise accuracy with ``latency - max_latency_ms <= 0`` as a constraint; NSGA-II: the
    (accuracy, latency) front under the same constraint. Returns every evaluation in trial order."""
    import optuna  # optional (optuna, extra 'search'): imported when used

    logging.getLogger("optuna").setLevel(logging.WARNING)
    constraint = lambda t: t.user_attrs["constraint"]  # noqa: E731
    if sampler not in ("tpe", "nsga2"):
        raise SlimkitError(f"unknown NAS sampler {sampler!r}", "use 'tpe' or 'nsga2'")
    with warnings.catch_warnings():  # optuna >= 5 deprecates constraints_func; older releases lack its successor
        warnings.simplefilter("ignore", FutureWarning)
        if sampler == "tpe":
            chosen = optuna.samplers.TPESampler(seed=seed, constraints_func=constraint, n_startup_trials=min(8, trials))
            study = optuna.create_study(direction="maximize", sampler=chosen)
        else:
            chosen = optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraint,
                                                   population_size=min(10, trials))
            study = optuna.create_study(directions=["maximize", "minimize"], sampler=chosen)
    out: list[Evaluation] = []

    def objective(trial: Any) -> Any:
        result = evaluate(space.suggest(trial), f"optuna-{sampler}")
        out.append(result)
        trial.set_user_attr("constraint", [result.latency_ms - max_latency_ms])
        return result.accuracy if sampler == "tpe" else (result.accuracy, result.latency_ms)

    with progress_bar(progress) as bar:
        bar_id = bar.add_task(f"NAS ({sampler})", total=trials, info="") if bar else None
        for _ in range(trials):
            study.optimize(objective, n_trials=1)
            if bar:
                best = best_feasible(out, max_latency_ms)
                bar.update(bar_id, advance=1, info=f"best {best.accuracy:.4f}" if best else "none feasible yet")
    return out


def evolve(space: CNNSpace, evaluate: _Evaluator, max_latency_ms: float, *, generations: int, population: int = 8,
           children: int = 8, seed: int = 0, start: Sequence[Evaluation] = (), progress: bool = True) -> list[Evaluation]:
    """(mu + lambda) evolution: keep the ``population`` fittest, mutate them into ``children`` per generation.

    Fitness is accuracy for feasible members; infeasible ones rank below every feasible one, by overshoot.
    """
    rng = random.Random(seed)
    pool = list(start) or [evaluate(space.sample(rng), "evolution") for _ in range(population)]
    out: list[Evaluation] = []
    with progress_bar(progress) as bar:
        bar_id = bar.add_task("NAS (evolution)", total=generations, info="") if bar else None
        for _ in range(generations):
            parents = sorted(pool, key=lambda e: _fitness(e, max_latency_ms), reverse=True)[:population]
            for _ in range(children):
                child = space.mutate(rng.choice(parents).arch, rng)
                result = evaluate(child, "evolution")
                out.append(result)
                pool.append(result)
            if bar:
                best = best_feasible(pool, max_latency_ms)
                bar.update(bar_id, advance=1, info=f"best {best.accuracy:.4f}" if best else "none feasible yet")
    return out


def _fitness(e: Evaluation, max_latency_ms: float) -> float:
    over = e.latency_ms / max_latency_ms - 1.0
    return e.accuracy if over <= 0 else -over


def best_feasible(evals: Sequence[Evaluation], max_latency_ms: float) -> Evaluation | None:
    """Most accurate evaluation within the latency limit (ties: the faster)."""
    ok = [e for e in evals if e.latency_ms <= max_latency_ms]
    return max(ok, key=lambda e: (e.accuracy, -e.latency_ms)) if ok else None
