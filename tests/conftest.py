"""Shared test settings.

Tests run tiny models, where two intra-op threads only add synchronisation cost (and on a loaded
machine OpenMP spin-waiting makes them many times slower). One thread keeps the suite fast and
its timing stable; subprocesses inherit the same setting through OMP_NUM_THREADS.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
