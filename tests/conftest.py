"""Shared fixtures: real tasks are built once per test session (the zoo caches trained weights)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def digits_task():
    from slimkit import zoo

    return zoo.load("digits")


@pytest.fixture(scope="session")
def mnist_task():
    from slimkit import zoo

    return zoo.load("mnist")


@pytest.fixture(scope="session")
def minilm_task():
    from slimkit import zoo

    return zoo.load("minilm")


@pytest.fixture
def one_thread():
    """Tiny training steps are faster on one thread, and immune to OpenMP stalls when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20·log10(|x| / |x − y|)."""
    noise = (reference.float() - approx.float()).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(reference.float().norm() / noise))
