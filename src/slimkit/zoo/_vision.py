"""Shared pieces of the image-classification tasks: splitting, training-or-cache, the Task."""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit import io
from slimkit.core.cache import cache_dir, fingerprint
from slimkit.core.errors import SlimkitError
from slimkit.core.task import Task, accuracy
from slimkit.train import fit

Batches = list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]


def stratified_split(labels: torch.Tensor, test_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, test) with exactly ``test_per_class`` test samples of every class."""
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    tr, te = torch.cat(train), torch.cat(test)
    return tr[torch.randperm(tr.numel(), generator=gen)], te.sort().values


def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> Batches:
    return [((x[i:i + size],), y[i:i + size]) for i in range(0, x.shape[0], size)]


def random_shift(pixels: int) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """Augmentation: translate each image by up to ``pixels`` in x and y (zero fill)."""

    def shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:  # x: (B, 1, H, W)
        b, _, h, w = x.shape
        padded = F.pad(x, (pixels, pixels, pixels, pixels))
        dx = torch.randint(0, 2 * pixels + 1, (b,), generator=gen)
        dy = torch.randint(0, 2 * pixels + 1, (b,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None, :])  # (B, H)
        cols = (dx[:, None] + torch.arange(w)[None, :])  # (B, W)
        bi = torch.arange(b)[:, None, None]
        return padded[bi, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)  # (B, 1, H, W)

    return shift


def trained_model(name: str, build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor,
                  train_cfg: dict, progress: bool) -> tuple[nn.Module, dict]:
    """The model trained with ``train_cfg`` on (x, y): from the cache, or trained now and cached."""
    model = build()
    key = fingerprint(name, model.slimkit_builder, train_cfg, x.shape, float(x.sum()), y.tolist())
    path = cache_dir() / f"{name}-{key}"
    if (path / io.WEIGHTS).is_file():
        try:
            io.load_into(model, io.load_state(path), source=str(path))
            return model.eval(), io.read_meta(path)["extra"]
        except SlimkitError:
            pass  # a damaged cache entry is retrained and replaced below
    torch.manual_seed(train_cfg["seed"])
    model = build()
    cfg = dict(train_cfg)
    shift = cfg.pop("shift", 0)
    start = time.perf_counter()
    result = fit(model, x, y, augment=random_shift(shift) if shift else None, label=f"training {name}",
                 progress=progress, **cfg)
    info = {"train_seconds": round(time.perf_counter() - start, 1), "final_loss": result.losses[-1],
            "train_config": train_cfg}
    io.save(model, path, extra=info)
    return model.eval(), info


def classification_task(*, name: str, model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
                        x_test: torch.Tensor, y_test: torch.Tensor, calib_size: int, description: str,
                        batch_size: int = 256) -> Task:
    if calib_size > x_train.shape[0]:
        raise SlimkitError(f"{name}: calibration size {calib_size} exceeds {x_train.shape[0]} training images",
                           "use a smaller calibration set")
    x_cal = x_train[:calib_size]
    return Task(
        name=name, model=model, example=(x_test[:1].clone(),), metric=accuracy,
        eval=batches(x_test, y_test, batch_size), calib=[b[0] for b in batches(x_cal, y_train[:calib_size], 64)],
        train=batches(x_train, y_train, 64), higher_is_better=True, metric_name="top-1 accuracy",
        description=description, loss=F.cross_entropy,
        splits={"train": int(x_train.shape[0]), "calibration (subset of train)": calib_size,
                "test": int(x_test.shape[0])},
    )


def image_task(name: str, x: torch.Tensor, y: torch.Tensor, build: Callable[[], nn.Module], train_cfg: dict, *,
               test_per_class: int, seed: int, calib_size: int, description: str, progress: bool) -> Task:
    """Split, train (or load from the cache) and wrap an image-classification data set as a Task."""
    train_idx, test_idx = stratified_split(y, test_per_class, seed)
    model, _ = trained_model(name, build, x[train_idx], y[train_idx], train_cfg, progress)
    return classification_task(name=name, model=model, x_train=x[train_idx], y_train=y[train_idx],
                               x_test=x[test_idx], y_test=y[test_idx], calib_size=calib_size,
                               description=description)
