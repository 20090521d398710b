"""Distillation losses: zero when the student equals the teacher, exact values, gradients by finite differences."""

import math

import pytest
import torch

from slimkit.distill import embedding_kd, feature_kd, gram, logit_kd, relational_kd


def test_logit_kd_is_zero_for_identical_logits_and_positive_otherwise():
    torch.manual_seed(0)
    t = torch.randn(8, 10)
    assert float(logit_kd(t.clone(), t, 4.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(logit_kd(t + 0.5 * torch.randn(8, 10), t, 4.0)) > 1e-4


def test_logit_kd_value_is_tau_squared_kl():
    s = torch.tensor([[1.0, 2.0, 0.0]])
    t = torch.tensor([[0.0, 1.0, 3.0]])
    tau = 2.0
    p_t = torch.softmax(t / tau, -1)
    kl = float((p_t * (p_t.log() - torch.log_softmax(s / tau, -1))).sum())
    assert float(logit_kd(s, t, tau)) == pytest.approx(tau ** 2 * kl, rel=1e-6)


def test_logit_kd_gradient_matches_finite_differences():
    torch.manual_seed(0)
    s = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: logit_kd(x, t, 3.0), (s,))
    assert torch.autograd.gradcheck(lambda x: relational_kd(x, t), (s,))
    assert torch.autograd.gradcheck(lambda x: embedding_kd(x, t), (s,))


def test_soft_target_gradient_does_not_shrink_with_temperature():
    """The τ² factor: at high τ, d(loss)/d(logits) ≈ (s - t)/(K·B)-sized regardless of τ (Hinton's argument)."""
    torch.manual_seed(0)
    t = torch.randn(16, 10) * 0.1
    s = (t + 0.05 * torch.randn(16, 10)).requires_grad_(True)
    norms = []
    for tau in (4.0, 16.0):
        (g,) = torch.autograd.grad(logit_kd(s, t, tau), s)
        norms.append(float(g.norm()))
    assert norms[1] == pytest.approx(norms[0], rel=0.1)


def test_feature_and_relational_losses():
    torch.manual_seed(0)
    f = torch.randn(6, 32)
    assert float(feature_kd(f, f)) == 0.0
    assert float(feature_kd(torch.zeros_like(f), f)) == pytest.approx(1.0)  # scale-free: MSE / mean(t^2)
    assert float(relational_kd(3.0 * f, f)) == pytest.approx(0.0, abs=1e-10)  # similarities ignore scale
    g = gram(f)
    assert g.shape == (6, 6) and torch.allclose(g.diagonal(), torch.ones(6))
    assert float(relational_kd(torch.randn(6, 7), f)) > 0.01  # different widths compare directly
    assert float(embedding_kd(f, -f)) == pytest.approx(2.0)
    assert math.isclose(float(embedding_kd(f, 2 * f)), 0.0, abs_tol=1e-6)
