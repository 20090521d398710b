"""Shared fixtures: real tasks are built once per test session (the zoo caches trained weights)."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: a second torch thread per worker would only oversubscribe them.
    torch.set_num_threads(1)
    # ... and so would the processes a test starts (a script, a CLI command, torchrun ranks) if they took both.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first (stable order otherwise): with one worker per core, a minutes-long test taken last
    would leave the other core idle at the end of the run."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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


from slimkit.measure.closeness import sqnr_db  # noqa: E402,F401  (tests import it from here)
