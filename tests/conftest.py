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


def _test_devices() -> list[str]:
    """The devices device-parametrized tests run on: ``TELESCOPE_TEST_DEVICES`` (comma
    separated, e.g. ``cpu,cuda``; ``bench/gpu_check.py`` sets it), else ``cpu``."""
    wanted = [d.strip() for d in os.environ.get("TELESCOPE_TEST_DEVICES", "cpu").split(",")]
    return [d for d in wanted if d]


def pytest_generate_tests(metafunc):
    """A test that takes a ``device`` argument runs once per device of the session; a device
    that is asked for but missing fails (so a GPU check cannot pass by skipping)."""
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", _test_devices())
