"""Each finished trial's console line: the signed metric change, as the summary and the report print it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from slimkit.search.trial_progress import trial_line


def frozen(score: float | None, drop: float | None, constraints: list[float]) -> SimpleNamespace:
    measured = {"size_mb": 0.0335, "latency_ms": 0.216, "score": score, "drop": drop}
    return SimpleNamespace(number=4, user_attrs={"recipe": [{"type": "prune.Channels"}, {"type": "quantize.Int8"}],
                                                 "measured": measured, "constraints": constraints})


@pytest.mark.parametrize("score,drop,baseline,constraints,expected", [
    (0.987, 0.003, 0.990, [-1.0], "#4 Channels + Int8: 0.0335 MB, 0.216 ms, metric change -0.0030 [green]fits[/]"),
    (0.35, 0.05, 0.30, [0.5], "#4 Channels + Int8: 0.0335 MB, 0.216 ms, metric change +0.0500 [yellow]misses[/]"),
    (0.987, 0.003, None, [-1.0], "#4 Channels + Int8: 0.0335 MB, 0.216 ms, drop +0.0030 [green]fits[/]"),
])
def test_the_trial_line_carries_the_signed_metric_change(score, drop, baseline, constraints, expected):
    assert trial_line(frozen(score, drop, constraints), baseline) == expected
