"""Search over supernet members with measured latency: TPE and evolution respect the limit, share one cache."""

from __future__ import annotations

import dataclasses

import torch

from slimkit.nas import CNNSpace, LatencyPredictor, SuperCNN, SupernetEvaluator, best_feasible, evolve, optuna_search


def test_searchers_find_feasible_members_under_a_measured_limit(mnist_task, one_thread):
    space = dataclasses.replace(CNNSpace.from_model(mnist_task.model, mnist_task.example), depths=(1,),
                                kernels=(3, 5), hiddens=(32, 64))
    torch.manual_seed(0)
    supernet = SuperCNN(space)
    val = mnist_task.train[-2:]
    evaluate = SupernetEvaluator(supernet, [b[0][0] for b in mnist_task.train[:2]], val, batch=32,
                                 table=LatencyPredictor(batch=32))
    small = evaluate(space.smallest())
    big = evaluate(space.largest())
    assert small.latency_ms > 0 and big.latency_ms > 0  # measured, not assumed (which is faster: a benchmark)
    limit = (small.latency_ms + big.latency_ms) / 2
    tpe = optuna_search(space, evaluate, limit, trials=6, progress=False)
    evo = evolve(space, evaluate, limit, generations=2, population=4, children=3, progress=False, start=tpe)
    assert len(tpe) == 6 and len(evo) == 6
    everything = [small, big, *tpe, *evo]
    best = best_feasible(everything, limit)
    assert best is not None and best.latency_ms <= limit
    assert best.accuracy == max(e.accuracy for e in everything if e.latency_ms <= limit)
    assert all(space.contains(e.arch) and e.predicted_ms > 0 for e in everything)
    assert len(evaluate.cache) <= len(everything)  # each architecture evaluated once


def test_latency_relative_to_a_reference_is_timed_interleaved(mnist_task, one_thread):
    space = CNNSpace.from_model(mnist_task.model, mnist_task.example)
    torch.manual_seed(0)
    evaluate = SupernetEvaluator(SuperCNN(space), [mnist_task.train[0][0][0]], mnist_task.train[-1:], batch=64,
                                 reference=mnist_task.model, rounds=2)
    assert evaluate.reference_ms > 0
    base = evaluate(space.base)  # the reference's own architecture: about the reference's time
    small = evaluate(space.smallest())
    assert base.latency_ms > 0 and small.latency_ms > 0 and base.arch != small.arch
    assert len(evaluate.cache) == 2  # each member timed once, against the reference (ratios: bench/arch.py)
