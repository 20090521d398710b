"""One sign for a candidate's metric against the baseline, in the report and on the console.

``metric change = candidate - baseline`` in the metric's own units: + means the number went up.
Whether up is better depends on the metric (accuracy up, perplexity down), so every place that
shows the number says which way is better beside it.
"""

from __future__ import annotations

#: The column and console word for ``candidate - baseline``.
METRIC_CHANGE = "metric change"


def metric_change(score: float, baseline: float) -> float:
    """``score - baseline`` (the sign is the metric's, not "better" or "worse")."""
    return score - baseline


def change_text(change: float) -> str:
    """``-0.0030``: always signed, four decimals, as the console prints it."""
    return f"{change:+.4f}"


def sign_note(metric: str, higher_is_better: bool) -> str:
    """The sentence under a table with a ``metric change`` column."""
    better, loss, drop = ("higher", "negative", "-0.003") if higher_is_better else ("lower", "positive", "+0.003")
    return (f"{METRIC_CHANGE}: the candidate's {metric} minus the baseline's (+ = it went up, - = it went down). "
            f"{better.capitalize()} {metric} is better, so a {loss} change is a loss: a target's max drop of 0.003 "
            f"allows a change as bad as {drop}.")
