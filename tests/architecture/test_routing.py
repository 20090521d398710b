"""Threshold calibration on planted data: the drop holds, and the threshold lands where it was planted."""

from __future__ import annotations

import pytest
import torch

from slimkit import SlimkitError
from slimkit.architecture import choose_exit_set, choose_thresholds, simulate


def planted(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exit 0 is always right above confidence 0.6 and right half the time below; exit 1 is always right."""
    gen = torch.Generator().manual_seed(seed)
    conf = torch.rand(1, n, generator=gen)  # (E-1, N)
    lucky = torch.rand(n, generator=gen) < 0.5
    correct = torch.stack([(conf[0] > 0.6) | lucky, torch.ones(n, dtype=torch.bool)])  # (E, N)
    return conf, correct


@pytest.mark.parametrize("max_drop", [0.0, 0.01, 0.05])
def test_calibrated_threshold_meets_the_drop_and_exits_as_many_as_allowed(max_drop):
    conf, correct = planted(4000, seed=0)
    (t,) = choose_thresholds(conf, correct, max_drop)
    exits, acc = simulate(conf, correct, [t])
    assert 1.0 - acc <= max_drop + 1e-9
    # Below 0.6 half the exits are wrong: each 0.01 of threshold costs ~0.005 accuracy.
    assert 0.6 - 2 * max_drop - 0.02 <= t <= 0.6 + 0.01
    assert (exits == 0).float().mean().item() >= 0.4 - 0.02
    # The same threshold on fresh samples of the planted distribution keeps the drop within sampling noise.
    conf2, correct2 = planted(4000, seed=1)
    assert 1.0 - simulate(conf2, correct2, [t])[1] <= max_drop + 0.01


def test_threshold_extremes():
    conf, correct = planted(500, seed=2)
    exits, acc = simulate(conf, correct, [1.0])
    assert (exits == 1).all() and acc == 1.0
    exits, _ = simulate(conf, correct, [0.0])
    assert (exits == 0).all()


def test_two_exits_in_order_and_negative_drop_refused():
    conf = torch.tensor([[0.9, 0.2, 0.2, 0.95], [0.1, 0.9, 0.3, 0.99]])  # (2 early exits, 4 samples)
    correct = torch.tensor([[True, False, False, True], [False, True, False, True], [True, True, True, True]])
    ts = choose_thresholds(conf, correct, 0.0)
    exits, acc = simulate(conf, correct, ts)
    assert acc == 1.0 and exits.tolist() == [0, 1, 2, 0]
    with pytest.raises(SlimkitError, match="negative"):
        choose_thresholds(conf, correct, -0.1)


def test_costs_move_the_budget_to_the_cheaper_routing():
    """Below its sure range exit 0 is right 10 % of the time, exit 1 70 %: the greedy order (exit 0 first)
    spends the whole drop at exit 0, where it buys few early exits; the costed search spends it at exit 1."""
    gen = torch.Generator().manual_seed(3)
    n = 2000
    conf = torch.rand(2, n, generator=gen)  # (E-1, N)
    luck = torch.rand(2, n, generator=gen)
    correct = torch.stack([(conf[0] > 0.8) | (luck[0] < 0.1), (conf[1] > 0.5) | (luck[1] < 0.7),
                           torch.ones(n, dtype=torch.bool)])
    costs = [1.0, 1.2, 3.0]  # exit 1 costs barely more than exit 0; the last exit is expensive
    greedy = choose_thresholds(conf, correct, 0.02, grid=50)
    costed = choose_thresholds(conf, correct, 0.02, grid=50, costs=costs)
    cost = torch.tensor(costs)
    mean = {name: float(cost[simulate(conf, correct, t)[0]].mean()) for name, t in (("greedy", greedy), ("costed", costed))}
    for t in (greedy, costed):
        assert 1.0 - simulate(conf, correct, t)[1] <= 0.02 + 1e-9
    assert mean["costed"] <= mean["greedy"] - 0.05
    with pytest.raises(SlimkitError, match="costs"):
        choose_thresholds(conf, correct, 0.02, grid=50, costs=[1.0, 2.0])


def test_exit_placement_picks_the_cheap_candidate_that_is_right_and_none_when_none_is():
    """Candidates after layers 1, 2, 3 of 4: only the one after layer 2 is trustworthy (right above 0.6)."""
    gen = torch.Generator().manual_seed(3)
    n = 1000
    conf = torch.rand(3, n, generator=gen)  # (C, N)
    coin = torch.rand(3, n, generator=gen) < 0.5
    correct = torch.cat([coin[:1], ((conf[1] > 0.6) | coin[1])[None], coin[2:], torch.ones(1, n, dtype=torch.bool)])
    positions, thresholds, cost = choose_exit_set(conf, correct, [1, 2, 3, 4], max_drop=0.0)
    assert positions == [1]
    assert thresholds[0] == pytest.approx(0.6, abs=0.01)
    assert cost == pytest.approx(0.4 * 2 + 0.6 * 4, abs=0.1)  # 40% leave after layer 2, the rest run all 4
    useless = torch.cat([coin, torch.ones(1, n, dtype=torch.bool)])  # every candidate a coin flip
    assert choose_exit_set(conf, useless, [1, 2, 3, 4], max_drop=0.0) == ([], [], 4.0)
    with pytest.raises(SlimkitError, match="correctness rows and costs"):
        choose_exit_set(conf, useless, [1, 2, 4], max_drop=0.0)
