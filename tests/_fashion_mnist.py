"""The ``fashion_mnist`` marker: tests that read the real Fashion-MNIST skip where it is absent.

Such tests read the IDX files of the Debian package dataset-fashion-mnist from
:data:`FASHION_MNIST_DIR`. Where any of the four files is missing, the hooks below skip every test
marked ``@pytest.mark.fashion_mnist`` (or in a module with ``pytestmark = pytest.mark.fashion_mnist``)
with a reason that names the folder and the package, instead of letting it fail. ``conftest.py``
installs the hooks.
"""

from __future__ import annotations

import pytest

from simclrv2.data.builtin import FASHION_MNIST_SYSTEM_DIR

FASHION_MNIST_DIR = FASHION_MNIST_SYSTEM_DIR
FASHION_MNIST_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                       "t10k-labels-idx1-ubyte")


def fashion_mnist_installed() -> bool:
    """All four IDX files (gzipped or not) are in :data:`FASHION_MNIST_DIR`."""
    return all((FASHION_MNIST_DIR / f"{stem}.gz").is_file() or (FASHION_MNIST_DIR / stem).is_file()
               for stem in FASHION_MNIST_STEMS)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fashion_mnist: reads the real Fashion-MNIST (Debian package "
                                       "dataset-fashion-mnist); skipped where it is not installed")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if fashion_mnist_installed():
        return
    skip = pytest.mark.skip(reason=f"Fashion-MNIST IDX files not found under {FASHION_MNIST_DIR}; "
                                   "apt install dataset-fashion-mnist")
    for item in items:
        if item.get_closest_marker("fashion_mnist"):
            item.add_marker(skip)
