"""Tiny models with hand-computable MACs, shared by the measure tests."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallCNN(nn.Module):
    """MNIST-sized CNN: conv 1->16 (28x28), pool, conv 16->32 (14x14), conv 32->64 (14x14), pool, fc -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2)  # used twice
        self.fc = nn.Linear(64 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))  # (B, 16, 14, 14)
        x = F.relu(self.conv2(x))  # (B, 32, 14, 14)
        x = self.pool(F.relu(self.conv3(x)))  # (B, 64, 7, 7)
        return self.fc(x.flatten(1))  # (B, 10)

    @staticmethod
    def hand_macs(batch: int) -> dict[str, int]:
        return {
            "conv1": batch * 16 * 28 * 28 * 1 * 9,
            "conv2": batch * 32 * 14 * 14 * 16 * 9,
            "conv3": batch * 64 * 14 * 14 * 32 * 9,
            "fc": batch * 64 * 7 * 7 * 10,
        }


class Attention(nn.Module):
    """Token ids -> embedding -> one attention head group via F.scaled_dot_product_attention (HF-style call)."""

    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids)  # (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, h, T, d)
        mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()  # (B, 1, 1, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, T, d)
        return self.out(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
