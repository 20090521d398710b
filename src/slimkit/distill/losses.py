"""Distillation losses as small functions of (student, teacher) tensors.

- ``logit_kd``: Hinton et al. (2015): KL(softmax(t/τ) || softmax(s/τ)) · τ². The τ² keeps the
  gradient's size independent of τ (soft-target gradients scale as 1/τ²), so the weight against
  the hard-label loss means the same at every temperature.
- ``embedding_kd``: for encoders without logits: 1 − cosine between student and teacher outputs.
- ``feature_kd``: FitNets (Romero et al., 2015): MSE between a projected student feature and the
  teacher's, divided by the teacher feature's mean square so layers of any scale weigh alike.
- ``relational_kd``: the Gram form of relational KD (Park et al., 2019; Tung & Mori, 2019): match
  the batch's (B, B) cosine-similarity matrices, which needs no projection between widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logit_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """τ²·KL(p_teacher || p_student) at temperature τ, averaged over the batch. Logits (B, classes)."""
    log_p_s = F.log_softmax(student / temperature, dim=-1)            # (B, K)
    log_p_t = F.log_softmax(teacher.detach() / temperature, dim=-1)   # (B, K)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * temperature ** 2


def embedding_kd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean (1 − cosine) between student and teacher embeddings (B, D)."""
    return (1.0 - F.cosine_similarity(student.flatten(1), teacher.detach().flatten(1), dim=-1)).mean()


def feature_kd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE(student, teacher) / mean(teacher²): a scale-free FitNets hint loss (same shapes)."""
    t = teacher.detach()
    return F.mse_loss(student, t) / t.pow(2).mean().clamp(min=1e-12)


def gram(features: torch.Tensor) -> torch.Tensor:
    """(B, B) cosine similarities between the batch's samples (each flattened to a vector)."""
    f = F.normalize(features.flatten(1), dim=-1)  # (B, D)
    return f @ f.T


def relational_kd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the student's and teacher's (B, B) similarity matrices."""
    return (gram(student) - gram(teacher.detach())).pow(2).mean()
