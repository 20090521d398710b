"""allocation='macs' / 'latency': channels are removed where they cost the most MACs (or ms) per importance lost."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.core.errors import SlimkitError
from slimkit.core.record import last_record
from slimkit.graph import dependency
from slimkit.measure.flops import count_flops
from slimkit.measure.latency_table import LatencyTable, LeafCost
from slimkit.prune import Channels
from slimkit.prune.channels import MACS_TOLERANCE
from slimkit.prune.channels_allocation import allocate
from slimkit.train import finetune
from tests.prune.hf_tiny import FAMILIES, tiny


def _task(example: tuple) -> types.SimpleNamespace:
    return types.SimpleNamespace(example=example)


def _widths(model: nn.Module) -> list[int]:
    return [p.shape[0] for p in model.parameters() if p.dim() > 1]


def test_mlp_prunes_the_expensive_group_more() -> None:
    # fc1 (16->64) and fc2 (64->64) share group A (fc1's outputs), fc2 and fc3 (64->4) group B:
    # a channel of A costs 16 + 64 MACs, one of B 64 + 4, so A gives up more channels
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    example = (torch.randn(2, 16),)
    base = count_flops(model, example).macs
    pruned = sk.apply(model, Channels(macs_ratio=0.5, round_to=None, allocation="macs"), _task(example))
    a, b = pruned[0].out_features, pruned[2].out_features
    macs = count_flops(pruned, example).macs
    assert abs(macs / base - 0.5) <= MACS_TOLERANCE
    assert a < b and min(a, b) >= 16  # no group below a quarter of its channels
    assert pruned(*example).shape == (2, 4)


def test_mnist_keeps_the_cheap_hidden_layer_and_recovers(mnist_task: sk.Task, one_thread: None) -> None:
    base = count_flops(mnist_task.model, mnist_task.example).macs
    pruned = sk.apply(mnist_task.model, Channels(macs_ratio=0.5, round_to=None, allocation="macs"), mnist_task)
    macs = count_flops(pruned, mnist_task.example).macs / base
    widths = _widths(pruned)  # conv1, conv2, conv3, fc1, fc2
    assert 0.48 <= macs <= 0.5
    assert widths[3] == 128 and widths[4] == 10  # 128 hidden units cost 4% of the MACs: kept
    assert min(w / full for w, full in zip(widths, (16, 32, 64, 128, 10))) >= 0.25
    uniform = sk.apply(mnist_task.model, Channels(macs_ratio=0.5, round_to=None), mnist_task)
    assert _widths(uniform)[3] < 128  # the uniform ratio pays for MACs with hidden units too
    assert mnist_task.evaluate(pruned)["score"] >= 0.5
    finetune(pruned, mnist_task, steps=60, progress=False, seed=0)
    assert mnist_task.evaluate(pruned)["score"] >= 0.97


def test_depthwise_conv_follows_its_group() -> None:
    # conv (3->32) -> depthwise (32, groups=32) -> pointwise (32->64) -> pool -> fc: the depthwise conv
    # shares its in/out channels with the first conv's group and is pruned along with it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    example = (torch.randn(2, 3, 16, 16),)
    base = count_flops(model, example).macs
    pruned = sk.apply(model, Channels(macs_ratio=0.6, round_to=None, allocation="macs"), _task(example))
    assert abs(count_flops(pruned, example).macs / base - 0.6) <= MACS_TOLERANCE
    assert pruned[3].groups == pruned[3].in_channels == pruned[3].out_channels == pruned[0].out_channels < 32
    assert pruned(*example).shape == (2, 10)


@pytest.mark.parametrize("kwargs, message", [
    ({"allocation": "flops"}, "unknown allocation"), ({"allocation": "macs", "scope": "global"}, "conflicts"),
    ({"allocation": "latency", "scope": "global"}, "conflicts"), ({"latency_batch": 0}, "positive batch")])
def test_invalid_allocations_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(SlimkitError, match=message):
        Channels(**kwargs)


def test_attention_heads_are_refused_with_a_way_out() -> None:
    model, example = tiny("bert")
    with pytest.raises(SlimkitError, match="does not allocate attention heads"):
        sk.apply(model, Channels(macs_ratio=0.7, allocation="macs"), _task(example))


def _chain() -> nn.Sequential:
    # group A: conv0's outputs (BN, relu, conv3's inputs); group B: conv3's outputs (conv5's inputs);
    # group C: conv5's outputs (the classifier's inputs); the classifier is the output layer
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def _ratios(model: nn.Module, example: tuple, table: LatencyTable | None) -> dict[nn.Module, float]:
    tp = dependency.torch_pruning()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example[0])
    groups = list(graph.get_all_groups(ignored_layers=[model[8]], root_module_types=[nn.Conv2d, nn.Linear]))
    leaf_macs = {model.get_submodule(n): m for n, m in count_flops(model, example).by_leaf.items()}
    return allocate(groups, tp.importance.GroupMagnitudeImportance(p=2), graph, leaf_macs, 0.5, None,
                    table, dependency.module_names(model))


def test_latency_table_moves_the_budget_to_the_slow_group() -> None:
    # a table where every conv costs its MACs (1 ms per MMAC) but the relu behind group A is slow
    # (a stand-in for a stem's pooling on large maps): by ms, A's channels are the ones to remove
    model, example = _chain(), (torch.randn(1, 3, 16, 16),)
    grid = (0.25, 0.5, 0.75, 1.0)
    macs = {n: m / 1e6 for n, m in count_flops(model, example).by_leaf.items()}

    def bilinear(ms: float) -> LeafCost:
        return LeafCost(grid, tuple(tuple(ms * i * o for o in grid) for i in grid))

    def by_output(ms: float) -> LeafCost:
        return LeafCost(grid, (tuple(ms * o for o in grid),))

    table = LatencyTable({"0": bilinear(macs["0"]), "3": bilinear(macs["3"]), "5": bilinear(macs["5"]),
                          "2": by_output(20.0 * macs["3"])}, feeds={"2": "1"}, batch=1, threads=1)
    by_macs, by_ms = _ratios(model, example, None), _ratios(model, example, table)
    conv_a, conv_b = model[0], model[3]
    assert by_ms[conv_a] > by_macs.get(conv_a, 0.0) + 0.2  # group A gives up far more channels by ms
    assert by_ms[conv_a] >= 0.7  # ... down to (nearly) its quarter-width floor
    assert by_ms.get(conv_b, 0.0) < by_macs[conv_b]  # and group B keeps more for the same MACs


def test_latency_allocation_end_to_end_on_measured_times(one_thread: None) -> None:
    # three max-pools on group A's 64x64 maps cost far more time than their zero MACs suggest;
    # measured on this machine, the allocation must see it and thin group A first
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(7, 1, 3), nn.MaxPool2d(7, 1, 3),
                          nn.MaxPool2d(7, 1, 3), nn.Conv2d(32, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    example = (torch.randn(1, 3, 64, 64),)
    base = count_flops(model, example).macs
    by_macs = sk.apply(model, Channels(macs_ratio=0.6, round_to=None, allocation="macs"), _task(example))
    by_ms = sk.apply(model, Channels(macs_ratio=0.6, round_to=None, allocation="latency", latency_batch=2),
                     _task(example))
    for pruned in (by_macs, by_ms):
        assert abs(count_flops(pruned, example).macs / base - 0.6) <= MACS_TOLERANCE
        assert pruned(*example).shape == (1, 10)
    assert by_ms[0].out_channels < by_macs[0].out_channels
    table = last_record(by_ms).latency_table
    assert table["batch"] == 2 and table["full_ms"]["2"] > 5 * table["full_ms"]["5"]  # the pools are the cost


def test_a_table_that_sees_no_time_saved_still_reaches_the_budget() -> None:
    # timing noise on tiny layers can rate a narrower layer no faster: such chunks are taken last, by MACs
    model, example = _chain(), (torch.randn(1, 3, 16, 16),)
    grid = (0.25, 0.5, 0.75, 1.0)
    flat = LeafCost(grid, tuple(tuple(1.0 for _ in grid) for _ in grid))
    table = LatencyTable({"0": flat, "3": flat, "5": flat}, feeds={}, batch=1, threads=1)
    ratios = _ratios(model, example, table)
    by_leaf = {n: float(m) for n, m in count_flops(model, example).by_leaf.items()}
    kept = {g: 1.0 - ratios.get(model[i], 0.0) - 0.5 / 32 * (model[i] in ratios) for g, i in (("a", 0), ("b", 3), ("c", 5))}
    modelled = (by_leaf["0"] * kept["a"] + by_leaf["3"] * kept["a"] * kept["b"] + by_leaf["5"] * kept["b"] * kept["c"]
                + by_leaf["8"] * kept["c"])
    assert ratios and modelled <= 0.5 * sum(by_leaf.values()) + 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_latency_allocation_prunes_every_family(family: str, one_thread: None) -> None:
    model, example = tiny(family)
    example = example if isinstance(example, tuple) else (example,)
    base = count_flops(model, example).macs
    pruned = sk.apply(model, Channels(macs_ratio=0.7, round_to=None, allocation="latency", heads=False),
                      _task(example))
    assert abs(count_flops(pruned, example).macs / base - 0.7) <= MACS_TOLERANCE
    with torch.no_grad():
        assert pruned(*example).logits.shape == model(*example).logits.shape
    table = last_record(pruned).latency_table
    assert table["full_ms"] and not table["untimed"]  # every width-dependent layer was rebuilt and timed
