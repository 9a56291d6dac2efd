"""Fixtures shared across the test packages."""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: N worker processes share the cores; one torch thread each keeps them from oversubscribing them
    # (two threads beside a busy process run ~10x slower, docs/performance.md, "CPU threads").
    torch.set_num_threads(1)


@pytest.fixture()
def one_thread():
    """One torch thread (robust on a shared CPU, where OpenMP oversubscription is slow); restores the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread_module():
    """``one_thread`` for a whole module: ``pytestmark = pytest.mark.usefixtures("one_thread_module")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
