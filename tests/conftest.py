"""Fixtures shared by the test modules. Plain builders live in ``builders.py``, reference formulas and checks in
``reference.py``; test modules import those by name and never import each other."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from builders import TinyNet, torch_threads

_THREADS_BEFORE: list[int] = []


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread for the whole run, set here once rather than by whichever test happens to run first: the
    tests make many tiny forwards, where threads only contend (several times slower on a busy 2-core machine); results
    do not depend on it (`reference.f32_tol` covers thread counts)."""
    _THREADS_BEFORE.append(torch.get_num_threads())
    torch.set_num_threads(1)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Give the process its thread count back."""
    if _THREADS_BEFORE:
        torch.set_num_threads(_THREADS_BEFORE.pop())


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test (many tiny forwards: threads only contend), the previous count after it."""
    with torch_threads(1):
        yield
