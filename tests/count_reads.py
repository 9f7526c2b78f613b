"""Runs a training script as __main__ and prints a line for each checkpoint file the process reads:

    count_reads.py SCRIPT [flags...]
"""
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from util import checkpoint  # noqa: E402

read = checkpoint.load_checkpoint


def counted(path):
    sys.stdout.write(f"checkpoint read by rank {os.environ.get('PADDLE_TRAINER_ID', '0')}: {path}\n")  # every rank
    sys.stdout.flush()
    return read(path)


checkpoint.load_checkpoint = counted
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
