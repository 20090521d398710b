"""A weight-sharing supernet over a :class:`CNNSpace` (once-for-all style).

One network holds the largest architecture's weights. A sub-network uses the first ``w``
output channels of every conv (and the matching input channels of the next layer), the first
``d`` layers of every stage, and the centre ``k x k`` of every kernel, so training the supernet
once (a random sub-network plus the largest one each step, the smaller ones distilled from the
largest) trains every member at the same time. Evaluating a member is slicing plus a BatchNorm
re-estimate on a few batches (shared weights, but every member has its own activation statistics).
"""

from __future__ import annotations

import random
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core.task import Task
from slimkit.nas.cnn import CNNArch, CNNSpace, build
from slimkit.train import finetune


class SuperCNN(nn.Module):
    """The largest member's layers; ``forward(x, arch)`` runs the slice that is ``arch``."""

    def __init__(self, space: CNNSpace) -> None:
        super().__init__()
        self.space = space
        big = space.largest()
        self.stages = nn.ModuleList()
        cin = big.in_channels
        for width, depth, k in zip(big.widths, big.depths, big.kernels):
            layers = nn.ModuleList()
            for _ in range(depth):
                layers.append(nn.ModuleDict({"conv": nn.Conv2d(cin, width, k, padding=k // 2),
                                             "bn": nn.BatchNorm2d(width, track_running_stats=False)}))
                cin = width
            self.stages.append(layers)
        self.fc1 = nn.Linear(big.flat, big.hidden)
        self.fc2 = nn.Linear(big.hidden, big.classes)

    def forward(self, x: torch.Tensor, arch: CNNArch | None = None) -> torch.Tensor:  # x: (B, C, H, W)
        arch = arch or self.space.largest()
        for stage, width, depth, k in zip(self.stages, arch.widths, arch.depths, arch.kernels):
            for layer in stage[:depth]:
                w, b = conv_slice(layer["conv"], x.shape[1], width, k)
                x = F.conv2d(x, w, b, padding=k // 2)  # (B, width, s, s)
                bn = layer["bn"]
                x = F.relu(F.batch_norm(x, None, None, bn.weight[:width], bn.bias[:width], True, 0.0, bn.eps))
            x = F.max_pool2d(x, 2)
        x = x.flatten(1)  # (B, width * side * side): channel-major, so a channel slice is a prefix
        if arch.hidden:
            x = F.relu(F.linear(x, self.fc1.weight[:arch.hidden, :x.shape[1]], self.fc1.bias[:arch.hidden]))
            return F.linear(x, self.fc2.weight[:, :arch.hidden], self.fc2.bias)
        raise ValueError("the supernet's head always has a hidden layer; use a space with hiddens > 0")

    @torch.no_grad()
    def extract(self, arch: CNNArch) -> nn.Sequential:
        """A standalone model of ``arch`` whose weights are copies of this supernet's slices."""
        model = build(arch)
        convs = [m for m in model if isinstance(m, nn.Conv2d)]
        bns = [m for m in model if isinstance(m, nn.BatchNorm2d)]
        i = 0
        for stage, width, depth, k in zip(self.stages, arch.widths, arch.depths, arch.kernels):
            for layer in stage[:depth]:
                w, b = conv_slice(layer["conv"], convs[i].in_channels, width, k)
                convs[i].weight.copy_(w)
                convs[i].bias.copy_(b)
                bns[i].weight.copy_(layer["bn"].weight[:width])
                bns[i].bias.copy_(layer["bn"].bias[:width])
                i += 1
        fc1, fc2 = [m for m in model if isinstance(m, nn.Linear)]
        fc1.weight.copy_(self.fc1.weight[:arch.hidden, :arch.flat])
        fc1.bias.copy_(self.fc1.bias[:arch.hidden])
        fc2.weight.copy_(self.fc2.weight[:, :arch.hidden])
        fc2.bias.copy_(self.fc2.bias)
        return model


def conv_slice(conv: nn.Conv2d, cin: int, cout: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First ``cout`` filters over the first ``cin`` channels, centre ``k x k`` of the kernel."""
    off = (conv.kernel_size[0] - k) // 2
    return conv.weight[:cout, :cin, off:off + k, off:off + k], conv.bias[:cout]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, inputs: Iterable[torch.Tensor]) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics as the plain average over ``inputs``."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    for x in inputs:
        model(x)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def train_supernet(supernet: SuperCNN, task: Task, *, steps: int, teacher: nn.Module | None = None, samples: int = 2,
                   lr: float = 3e-3, distill: float = 0.5, seed: int = 0, progress: bool = True) -> Any:
    """Train with :func:`slimkit.train.finetune`: each step ``samples`` members (the smallest, then
    random ones) learn the labels plus ``distill`` x KL to the teacher's output.

    The teacher defaults to the supernet's largest member (trained on the labels in the same step);
    passing the user's trained model instead is cheaper and starts every member from good targets.
    """

    rng = random.Random(seed)
    space = supernet.space
    grads = [p.requires_grad for p in teacher.parameters()] if teacher is not None else []
    if teacher is not None:
        teacher.eval().requires_grad_(False)  # restored below: the caller's model stays as it was

    def loss(model: SuperCNN, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        if teacher is None:
            target = model(x, space.largest())
            total = F.cross_entropy(target, labels)
            target = target.detach()
        else:
            with torch.no_grad():
                target = teacher(x)  # (B, classes)
            total = target.new_zeros(())
        soft = F.softmax(target, -1)
        for i in range(samples):
            out = model(x, space.smallest() if i == 0 else space.sample(rng))
            kd = F.kl_div(F.log_softmax(out, -1), soft, reduction="batchmean")
            total = total + (1 - distill) * F.cross_entropy(out, labels) + distill * kd
        return total

    try:
        return finetune(supernet, task, steps=steps, lr=lr, loss=loss, seed=seed, progress=progress,
                        label="training the supernet", warmup=0.05)
    finally:
        for p, flag in zip(teacher.parameters() if teacher is not None else [], grads):
            p.requires_grad_(flag)
