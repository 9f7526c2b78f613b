"""Runs a training script as __main__, stopped (as by SIGTERM, on every rank) after an iteration:

    stop_worker.py EPOCH STEP SCRIPT [flags...]

the stop is asked for in iteration STEP of epoch EPOCH (a loss hook), so the run saves its position after it.
"""
import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from util import nonfinite  # noqa: E402
from util.preempt import STOP  # noqa: E402

epoch, step, script = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]


def stop_there(loss, e, s):
    if (e, s) == (epoch, step):
        STOP.receive(signal.SIGTERM)
    return loss


nonfinite.LOSS_HOOKS.append(stop_there)
sys.argv = [script] + sys.argv[4:]
runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
