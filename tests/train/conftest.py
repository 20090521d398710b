"""The digits model is tiny: one thread trains it fastest and is immune to a busy machine."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _single_thread(one_thread):  # noqa: ANN001 - the shared fixture from tests/conftest.py
    yield
