"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images) and a small CNN.

The fast task for tests: trains in seconds, test accuracy >= 97%.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimkit.core.registry import builder
from slimkit.core.task import Task
from slimkit.zoo._vision import image_task

SEED = 0
SPLITS = {"train": 1437, "calibration (subset of train)": 256, "test": 360}
METRIC = "top-1 accuracy on the test split"
TEST_PER_CLASS = 36  # 360 test images, 20% of the set
TRAIN = {"epochs": 30, "lr": 3e-3, "batch_size": 64, "weight_decay": 1e-4, "seed": SEED, "shift": 1}


@builder("digits_cnn")
def build_model(width: int = 16, classes: int = 10) -> nn.Module:
    """Conv-BN-ReLU x3 and a two-layer head on (B, 1, 8, 8) inputs."""
    w = width
    model = nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),          # (B, w, 8, 8)
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),  # (B, 2w, 8, 8)
        nn.MaxPool2d(2),                                                       # (B, 2w, 4, 4)
        nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
        nn.MaxPool2d(2),                                                       # (B, 4w, 2, 2)
        nn.Flatten(), nn.Linear(16 * w, 64), nn.ReLU(), nn.Linear(64, classes),
    )
    model.slimkit_builder = ("digits_cnn", {"width": width, "classes": classes})
    return model


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Images (1797, 1, 8, 8) scaled to [0, 1] and labels (1797,)."""
    from sklearn.datasets import load_digits  # optional (sklearn, extra 'zoo'): imported when used

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target, dtype=torch.long)


def make_task(progress: bool = False) -> Task:
    x, y = load_data()
    return image_task("digits", x, y, build_model, TRAIN, test_per_class=TEST_PER_CLASS, seed=SEED, calib_size=256,
                      description="scikit-learn digits: 1,797 8x8 grey images of 10 digits; stratified 1,437 train / 360 test", progress=progress)
