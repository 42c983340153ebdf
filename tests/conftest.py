"""Shared test settings.

Tests run tiny models, where two intra-op threads only add synchronisation cost (and on a loaded
machine OpenMP spin-waiting makes them many times slower). One thread keeps the suite fast and
its timing stable; subprocesses inherit the same setting through OMP_NUM_THREADS.

Tests marked ``fashion_mnist`` read the real Fashion-MNIST IDX files of the Debian package
dataset-fashion-mnist; where they are absent those tests are skipped, with the reason, instead of
failing (tests/_fashion_mnist.py).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# the fashion_mnist marker's hooks (tests/_fashion_mnist.py)
from _fashion_mnist import pytest_collection_modifyitems, pytest_configure  # noqa: E402, F401


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Image folder indexes (and anything else cached) go to a folder of this session, not to the
    user's ~/.cache; subprocesses inherit it. Tests that need their own set SIMCLRV2_CACHE again."""
    before = os.environ.get("SIMCLRV2_CACHE")
    os.environ["SIMCLRV2_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if before is None:
        os.environ.pop("SIMCLRV2_CACHE", None)
    else:
        os.environ["SIMCLRV2_CACHE"] = before
