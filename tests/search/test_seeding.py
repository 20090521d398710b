"""The first trials are informed guesses from the target's ratios to the original."""

from __future__ import annotations

import pytest

import slimkit as sk
from slimkit.core.registry import searchable as techniques
from slimkit.search.evaluate import TrialMeasurement
from slimkit.search.optimize import context_for
from slimkit.search.seeding import initial_guesses

BASE = TrialMeasurement(size_mb=1.0, latency_ms=10.0, score=0.9, params=250_000)
TECHS = ["channels", "finetune", "int8", "weight_only"]


def _guesses(digits_task, **limits: float) -> list[dict]:
    ctx = context_for(digits_task, sk.Target(max_drop=0.01, **limits), BASE, {})
    return initial_guesses(ctx, techniques(TECHS))


def test_a_quarter_of_the_bytes_starts_with_int8(digits_task):
    first = _guesses(digits_task, max_size_mb=0.5)[0]
    assert first["stage.quantize"] == "int8" and first["stage.prune"] == "none"


def test_just_under_int8_prunes_a_little_then_int8_and_skips_slow_int4(digits_task):
    guesses = _guesses(digits_task, max_size_mb=0.25, max_latency_ms=6.0)
    assert all(g["stage.quantize"] != "weight_only" for g in guesses)   # int4 weight-only is not faster on CPU
    pruned = [g for g in guesses if g["stage.prune"] == "channels"]
    assert pruned and pruned[0]["stage.quantize"] == "int8" and pruned[0]["stage.recover"] == "finetune"
    assert 0.1 <= pruned[0]["channels.amount"] <= 0.15                   # keep ~0.83 of the params


def test_a_twentieth_of_the_bytes_prunes_width_then_int4(digits_task):
    guesses = _guesses(digits_task, max_size_mb=0.05)
    assert [g["stage.quantize"] for g in guesses] == ["weight_only", "weight_only"]
    amounts = [g["channels.amount"] for g in guesses]
    # keep 0.05 / 0.2 * 0.8 = 0.2 of the params -> 0.55 of the width off; the second guess prunes more
    assert amounts[0] == pytest.approx(0.55) and amounts[1] > amounts[0]
    assert all(g["weight_only.method"] == "gptq" for g in guesses)  # digits has calibration data


def test_int4_offers_gptq_only_where_the_task_can_calibrate(digits_task):
    import dataclasses

    import optuna

    from slimkit.quantize import WeightOnly

    def config(task, method):
        ctx = context_for(task, sk.Target(max_drop=0.01, max_size_mb=0.05), BASE, {})
        trial = optuna.trial.FixedTrial({"weight_only.bits": 4, "weight_only.group_size": 32,
                                         "weight_only.method": method})
        return WeightOnly.suggest(trial, ctx)

    assert config(digits_task, "gptq").method == "gptq" and config(digits_task, "rtn").method == "rtn"
    assert config(dataclasses.replace(digits_task, calib=None), "gptq").method == "rtn"  # not asked without data
    with_mixed = initial_guesses(context_for(digits_task, sk.Target(max_size_mb=0.05, max_drop=0.01), BASE, {}),
                                 techniques([*TECHS, "mixed"]))
    assert [g["stage.quantize"] for g in with_mixed] == ["mixed", "mixed"]   # int4 for the convolutions too


def test_single_technique_search_gets_single_technique_guesses(digits_task):
    def guesses(size_mb: float) -> list[dict]:
        ctx = context_for(digits_task, sk.Target(max_size_mb=size_mb, max_drop=0.01), BASE, {}, max_techniques=1)
        return initial_guesses(ctx, techniques(TECHS))

    assert [g["stage.quantize"] for g in guesses(0.5)] == ["int8", "weight_only"]
    assert guesses(0.05) == []          # every informed guess there combines pruning with int4


def test_a_model_with_an_embedding_table_tries_4bit_tables_first(minilm_task):
    base = TrialMeasurement(size_mb=90.9, latency_ms=100.0, score=0.8, params=22_700_000)
    ctx = context_for(minilm_task, sk.Target(max_size_mb=0.25 * 90.9, max_latency_ms=60.0, max_drop=0.02), base, {})
    first = initial_guesses(ctx, techniques(TECHS))[0]
    assert first["stage.quantize"] == "int8" and first["int8.embedding_bits"] == 4 and first["stage.prune"] == "none"


def test_bytes_and_latency_both_bound_prune_more_and_run_int8_first(digits_task):
    guesses = _guesses(digits_task, max_size_mb=0.1, max_latency_ms=10.0)
    first = guesses[0]
    assert first["stage.quantize"] == "int8" and first["int8.activations"] == "static"
    # keep 0.1 / 0.27 * 0.8 = 0.30 of the params -> 0.45 of the width off
    assert first["channels.amount"] == pytest.approx(0.45)
    assert [g["stage.quantize"] for g in guesses[1:]] == ["weight_only", "weight_only"]


@pytest.mark.parametrize("latency_ms", [8.0, 13.0, 15.5])  # the original's latency re-measured: 0.8x-1.55x
def test_a_latency_limit_near_the_original_runs_int8_first_either_side_of_noise(digits_task, latency_ms):
    assert _guesses(digits_task, max_size_mb=0.1, max_latency_ms=latency_ms)[0]["int8.activations"] == "static"
    loose = _guesses(digits_task, max_size_mb=0.1, max_latency_ms=20.0)[0]   # 2x: int4 may be slow enough
    assert loose["stage.quantize"] == "weight_only"
