"""Test-session defaults: one torch thread (small kernels run fastest and steadiest that way on a
shared 2-core machine; set TELESCOPE_TEST_THREADS to change it) and a fixed seed per test."""

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("TELESCOPE_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_threads():
    """The CLI sets torch's thread count for the process: put it back after each test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
