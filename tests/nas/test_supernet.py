"""The weight-sharing supernet: members are exact slices, run the same as standalone models, and learn."""

from __future__ import annotations

import dataclasses
import random

import torch
import torch.nn as nn

from slimkit.core.task import accuracy
from slimkit.nas import CNNArch, CNNSpace, SuperCNN, recalibrate_bn, train_supernet


def _space(mnist_task) -> CNNSpace:
    return CNNSpace.from_model(mnist_task.model, mnist_task.example)


def test_member_weights_are_slices_and_outputs_match(mnist_task):
    space = _space(mnist_task)
    torch.manual_seed(0)
    supernet = SuperCNN(space)
    x = mnist_task.eval[0][0][0][:32]
    rng = random.Random(3)
    for arch in [space.smallest(), space.largest(), *(space.sample(rng) for _ in range(4))]:
        member = supernet.extract(arch)
        convs = [m for m in member if isinstance(m, nn.Conv2d)]
        i = 0
        for s, (w, d, k) in enumerate(zip(arch.widths, arch.depths, arch.kernels)):
            for layer in supernet.stages[s][:d]:
                big = layer["conv"].weight  # (Wmax, Cmax, 5, 5)
                off = (big.shape[-1] - k) // 2
                assert torch.equal(convs[i].weight, big[:w, :convs[i].in_channels, off:off + k, off:off + k])
                assert torch.equal(convs[i].bias, layer["conv"].bias[:w])
                i += 1
        fc1 = [m for m in member if isinstance(m, nn.Linear)][0]
        assert torch.equal(fc1.weight, supernet.fc1.weight[:arch.hidden, :arch.flat])
        with torch.no_grad():  # batch statistics on both sides
            assert (member.train()(x) - supernet(x, arch)).abs().max().item() <= 1e-5


def test_recalibrated_bn_holds_the_average_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    xs = [torch.randn(8, 1, 6, 6) * (i + 1) for i in range(3)]
    recalibrate_bn(model, xs)
    with torch.no_grad():
        means = torch.stack([model[0](x).mean((0, 2, 3)) for x in xs]).mean(0)
    assert (model[1].running_mean - means).abs().max().item() <= 1e-5
    assert not model.training


def test_supernet_training_teaches_small_members(mnist_task, one_thread):
    space = dataclasses.replace(_space(mnist_task), depths=(1,), kernels=(3,))
    torch.manual_seed(0)
    supernet = SuperCNN(space)
    task = dataclasses.replace(mnist_task, train=mnist_task.train[:-10])
    result = train_supernet(supernet, task, steps=80, teacher=mnist_task.model, progress=False)
    assert sum(result.losses[-10:]) < 0.5 * sum(result.losses[:10])
    member = recalibrate_bn(supernet.extract(space.smallest()), [b[0][0] for b in mnist_task.train[:4]])
    with torch.inference_mode():
        assert accuracy(member, mnist_task.train[-10:]) >= 0.7  # 80 steps; random guessing is 0.1
    assert isinstance(space.smallest(), CNNArch)
    assert all(p.requires_grad for p in mnist_task.model.parameters())  # the teacher is lent, not frozen for good
