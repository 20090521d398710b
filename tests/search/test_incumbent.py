"""The incumbent a search saves as it goes: only a better-ranked trial replaces it, another study's never
counts, and the end copies it byte for byte or says why it cannot."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import slimkit as sk
from slimkit.search.evaluate import TrialMeasurement
from slimkit.search.incumbent import Incumbent, Saved
from slimkit.search.pareto import TrialRecord
from tests.models import mlp

RUN = "run-a"


def _offer(keeper: Incumbent, number: int, drop: float, mb: float = 1.0, fits: bool = True) -> bool:
    """Hold trial ``number``'s model (weights filled with its number) and tell it finished."""
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(number))
    measured = TrialMeasurement(size_mb=mb, latency_ms=1.0, score=0.9 - drop, drop=drop, backend="torch")
    keeper.hold(number, model, None, TrialRecord(number, [], measured, [0.0 if fits else 1.0]))
    return keeper.after_trial(SimpleNamespace(number=number, state=SimpleNamespace(name="COMPLETE")))


# (trial, drop, MB, fits, saved): ranks by drop, then MB, then the earlier trial
OFFERS = [(0, 0.02, 1.0, True, True),     # the first feasible trial
          (1, 0.03, 0.5, True, False),    # smaller but a larger drop: not better
          (2, 0.01, 1.0, False, False),   # best drop but infeasible: never kept
          (3, 0.02, 0.8, True, True),     # same drop, smaller
          (4, 0.02, 0.8, True, False),    # a tie goes to the earlier trial
          (5, 0.00, 2.0, True, True)]     # better drop wins whatever its size


def test_only_a_better_trial_replaces_the_incumbent_and_the_copy_is_byte_identical(tmp_path):
    keeper = Incumbent(tmp_path / "incumbent", RUN, "tiny")
    assert [_offer(keeper, n, d, mb, fits) for n, d, mb, fits, _ in OFFERS] == [s for *_, s in OFFERS]
    assert keeper.saves == 3 and keeper.stored()["trial"] == 5 and keeper.mine.number == 5
    saved = keeper.copy_to(tmp_path / "best")
    assert isinstance(saved, Saved) and saved.number == 5
    inc, best = (sk.io.read_meta(tmp_path / d) for d in ("incumbent", "best"))
    assert best == inc and best["extra"]["trial"] == 5
    weights = [(tmp_path / d / sk.io.WEIGHTS).read_bytes() for d in ("incumbent", "best")]
    assert weights[0] == weights[1]
    assert all(torch.equal(p, torch.full_like(p, 5.0)) for p in saved.model.parameters())


def test_another_studys_incumbent_never_counts(tmp_path):
    assert _offer(Incumbent(tmp_path / "incumbent", "earlier-run", "tiny"), 0, 0.0)
    keeper = Incumbent(tmp_path / "incumbent", RUN, "tiny")
    assert keeper.stored() is None
    assert "another search" in keeper.copy_to(tmp_path / "best") and not (tmp_path / "best").exists()
    assert _offer(keeper, 7, 0.05) and keeper.stored()["trial"] == 7  # worse than the stale one, still saved


@pytest.mark.parametrize("damage,said", [
    (lambda inc: (inc / sk.io.WEIGHTS).write_bytes(b"\0" * 64), "cannot be used"),
    (lambda inc: (inc / sk.io.META).write_text("{"), "cannot be used"),
    (lambda inc: inc.unlink(), "no candidate was saved"),
])
def test_a_missing_or_damaged_incumbent_is_refused_with_the_reason(tmp_path, damage, said):
    keeper = Incumbent(tmp_path / "incumbent", RUN, "tiny")
    assert _offer(keeper, 0, 0.01)
    damage(tmp_path / "incumbent")
    why = keeper.copy_to(tmp_path / "best")
    assert isinstance(why, str) and said in why
