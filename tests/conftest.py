import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GOLDEN = os.path.join(ROOT, "tests", "golden")

from util.cpu import configure_cpu  # noqa: E402

configure_cpu()


def golden(name):
    return os.path.join(GOLDEN, name)


@pytest.fixture(scope="session")
def mae_io():
    return np.load(golden("mae_tiny_io.npz"))


@pytest.fixture(scope="session")
def vit_io():
    return np.load(golden("vit_tiny_io.npz"))


@pytest.fixture(autouse=True)
def nothing_written_to_the_default_output_dir():
    """The scripts write to ./output_dir unless told otherwise: a test passes its own folders, so that the
    suite leaves the checkout as it found it."""
    folder = os.path.join(ROOT, "output_dir")
    before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    yield
    after = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    assert after <= before, f"the test wrote to {folder}: {sorted(after - before)}"
