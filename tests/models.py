"""Tiny models of every shape slimkit meets, each with a tiny task (random data, seeded), for the table tests.

MLP, CNN (a Sequential with BatchNorm and two pools), residual CNN, depthwise-separable CNN, a
BERT-style attention encoder (``encoder.layer`` blocks with q/k/v) and a Conv1d + LSTM sequence
model. Each is registered as a builder, so artifacts of them reload with ``slimkit.load``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core.registry import builder
from slimkit.core.task import Task, accuracy

CLASSES = 4
BATCH = 8


def _built(model: nn.Module, name: str) -> nn.Module:
    _trained_like(model)
    model.slimkit_builder = (name, {})
    return model.eval()


@torch.no_grad()
def _trained_like(model: nn.Module) -> None:
    """Give every weight matrix a decaying spectrum, as trained layers have (random ones are flat, and
    nothing compresses them): the same singular vectors, singular values ``s_0 * 0.8 ** i``."""
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and w is not None and w.dim() >= 2:
            flat = w.reshape(w.shape[0], -1)                              # (out, in * k)
            u, s, vh = torch.linalg.svd(flat, full_matrices=False)
            decay = s[0] * 0.8 ** torch.arange(s.numel(), dtype=s.dtype)  # (rank,)
            w.copy_(((u * decay) @ vh).reshape(w.shape))


@builder("tiny_mlp")
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return _built(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, CLASSES)),
                  "tiny_mlp")


@builder("tiny_cnn")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return _built(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),   # (B, 16, 8, 8)
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 4, 4)
        nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, CLASSES)), "tiny_cnn")


class ResidualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)                           # (B, 16, H, W)
        x = F.relu(x + self.block(x))              # (B, 16, H, W)
        return self.head(x.mean(dim=(2, 3)))       # (B, classes)


@builder("tiny_residual")
def residual_cnn() -> nn.Module:
    torch.manual_seed(0)
    return _built(ResidualCNN(), "tiny_residual")


@builder("tiny_depthwise")
def depthwise_cnn() -> nn.Module:
    torch.manual_seed(0)
    return _built(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),  # depthwise
        nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),                        # pointwise
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, CLASSES)), "tiny_depthwise")


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, dim // heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        d = self.attention_head_size  # heads follow from the projection width, as in HF encoders
        q, k, v = (lin(x).view(B, T, -1, d).transpose(1, 2) for lin in (self.query, self.key, self.value))  # (B, h, T, d)
        y = F.scaled_dot_product_attention(q, k, v)                                                       # (B, h, T, d)
        return y.transpose(1, 2).reshape(B, T, -1)                                                        # (B, T, h*d)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.attention = SelfAttention(dim, heads)
        self.output = nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.intermediate, self.out = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.dropout = nn.Dropout(0.1)  # as trained encoders have (SimCSE's two views need it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.output(self.attention(x))))  # (B, T, C)
        return self.norm2(x + self.out(F.gelu(self.intermediate(x))))  # (B, T, C)


class Encoder(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Block(32, 4, 64) for _ in range(layers))


class TinyEncoder(nn.Module):
    """Token ids (B, T) -> embeddings -> blocks -> mean over tokens -> classifier (B, classes)."""

    def __init__(self, vocab: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(vocab, 32)
        self.encoder = Encoder(layers)
        self.classifier = nn.Linear(32, CLASSES)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)   # (B, T, C)
        for block in self.encoder.layer:
            x = block(x)
        return self.classifier(x.mean(1))  # (B, classes)


@builder("tiny_encoder")
def encoder() -> nn.Module:
    torch.manual_seed(0)
    return _built(TinyEncoder(), "tiny_encoder")


class SequenceNet(nn.Module):
    """Audio-like (B, 4, T) -> Conv1d -> LSTM -> last state -> classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 16, 3, padding=1)
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x)).transpose(1, 2)   # (B, T, 16)
        out, _ = self.lstm(x)                      # (B, T, 32)
        return self.head(out[:, -1])               # (B, classes)


@builder("tiny_sequence")
def sequence() -> nn.Module:
    torch.manual_seed(0)
    return _built(SequenceNet(), "tiny_sequence")


class MHANet(nn.Module):
    """torch's own ``nn.MultiheadAttention`` (it reads its projection weights directly, not through modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 32)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)                 # (B, T, 32)
        y, _ = self.mha(h, h, h)         # (B, T, 32)
        return self.head(y.mean(1))      # (B, classes)


@builder("tiny_mha")
def mha() -> nn.Module:
    torch.manual_seed(0)
    return _built(MHANet(), "tiny_mha")


class UNet(nn.Module):
    """A detector / segmenter shape: conv down, ConvTranspose and upsample back, a skip concat, pixel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.mid = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.fuse = nn.Conv2d(32, 16, 3, padding=1)
        self.shuffle = nn.Conv2d(16, 4 * 4, 1)
        self.head = nn.Conv2d(4, CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.down(x)                                             # (B, 16, H/2, W/2)
        u = self.up(self.mid(d))                                     # (B, 16, H, W)
        s = F.interpolate(d, scale_factor=2.0, mode="nearest")       # (B, 16, H, W)
        f = F.relu(self.fuse(torch.cat([u, s], dim=1)))              # (B, 16, H, W)
        p = F.pixel_shuffle(self.shuffle(f), 2)                      # (B, 4, 2H, 2W)
        return self.head(p).mean(dim=(2, 3))                         # (B, classes)


@builder("tiny_unet")
def unet() -> nn.Module:
    torch.manual_seed(0)
    return _built(UNet(), "tiny_unet")


#: model factory -> a function drawing one input batch from a generator.
INPUTS: dict[Callable[[], nn.Module], Callable[[torch.Generator], torch.Tensor]] = {
    mlp: lambda g: torch.randn(BATCH, 32, generator=g),
    cnn: lambda g: torch.randn(BATCH, 3, 16, 16, generator=g),
    residual_cnn: lambda g: torch.randn(BATCH, 3, 8, 8, generator=g),
    depthwise_cnn: lambda g: torch.randn(BATCH, 3, 8, 8, generator=g),
    encoder: lambda g: torch.randint(0, 64, (BATCH, 12), generator=g),
    sequence: lambda g: torch.randn(BATCH, 4, 16, generator=g),
    mha: lambda g: torch.randn(BATCH, 6, 16, generator=g),
    unet: lambda g: torch.randn(BATCH, 3, 8, 8, generator=g),
}
MODELS = tuple(INPUTS)


def tiny_task(factory: Callable[[], nn.Module], batches: int = 16) -> Task:
    """The model with seeded random inputs; labels are the model's own predictions (so accuracy starts at 1)."""
    model = factory()
    g = torch.Generator().manual_seed(1)
    xs = [INPUTS[factory](g) for _ in range(batches)]
    with torch.no_grad():
        labelled = [((x,), model(x).argmax(-1)) for x in xs]
    return Task(name=factory.__name__, model=model, example=(xs[0],), metric=accuracy, eval=labelled[:4],
                calib=[(x,) for x in xs], train=labelled, loss=F.cross_entropy)
