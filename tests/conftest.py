import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GOLDEN = os.path.join(ROOT, "tests", "golden")
OUTPUT_DIR_BEFORE = pytest.StashKey[set]()

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


def _default_output_dir():
    folder = os.path.join(ROOT, "output_dir")
    return folder, set(os.listdir(folder)) if os.path.isdir(folder) else set()


@pytest.fixture(autouse=True)
def nothing_written_to_the_default_output_dir():
    """The scripts write to ./output_dir unless told otherwise: a test passes its own folders, so that the
    suite leaves the checkout as it found it. Checked per test in one process; with pytest-xdist, where
    tests run side by side, once at the end (pytest_sessionfinish)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    folder, before = _default_output_dir()
    yield
    new = _default_output_dir()[1] - before
    assert not new, f"the test wrote to {folder}: {sorted(new)}"


def pytest_sessionstart(session):
    session.config.stash[OUTPUT_DIR_BEFORE] = _default_output_dir()[1]


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    folder, after = _default_output_dir()
    new = after - session.config.stash[OUTPUT_DIR_BEFORE]
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_line(f"error: tests wrote to {folder}: {sorted(new)} (run without -n to find which)", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
