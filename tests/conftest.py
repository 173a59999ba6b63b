"""Fixtures shared by the test files; the plain helpers they use are in ``helpers.py``."""

import os
import sys

import pytest

# ``from helpers import ...`` works whatever pytest's import mode and wherever it is started.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Under pytest-xdist each worker (and every process a test starts) runs torch on one thread:
# two workers with a thread per core each would oversubscribe the cores and run slower than one.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """Path of a random-init resnet18 checkpoint with two tiny partitionings and three scenes."""
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from helpers import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint") / "tiny.pt")


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> list:
    """Three small random JPEGs of different heights."""
    pytest.importorskip("PIL")
    from helpers import write_jpegs

    return write_jpegs(tmp_path_factory.mktemp("tiny_images"), 3)
