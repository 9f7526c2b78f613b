"""Runs a training script as __main__ under paddle.distributed.launch, recording per rank what it did.

    dist_worker.py REPORT_DIR SCRIPT [flags...]

Writes REPORT_DIR/rank{r}.json (world size, dataset indices read per epoch, files opened for writing, a
digest of the final parameters) and REPORT_DIR/rank{r}.npz (the final state_dict, buffers included).
With RANK_CWD=DIR set, rank r runs in DIR/rank{r}, as if each rank had its own node-local disk.
"""
import builtins
import hashlib
import json
import os
import runpy
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import util.datasets  # noqa: E402
import util.run_state  # noqa: E402
from util.dist import get_rank, get_world_size  # noqa: E402

report_dir, script = os.path.abspath(sys.argv[1]), sys.argv[2]
if os.environ.get("RANK_CWD"):
    cwd = os.path.join(os.environ["RANK_CWD"], f"rank{os.environ['PADDLE_TRAINER_ID']}")
    os.makedirs(cwd, exist_ok=True)
    os.chdir(cwd)
sys.argv = [script] + sys.argv[3:]
seen, writes, models = {}, [], []
real_open, real_getitem = builtins.open, util.datasets.ImageFolder.__getitem__


def spy_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+"):
        writes.append(os.fspath(file))
    return real_open(file, mode, *args, **kwargs)


def spy_getitem(self, key):
    epoch, index = key
    seen.setdefault(str(epoch), []).append(int(index))
    return real_getitem(self, key)


builtins.open = spy_open
util.datasets.ImageFolder.__getitem__ = spy_getitem
real_save = util.run_state.save


def spy_save(flags, tag, model_without_ddp, *rest, **kwargs):
    models.append(model_without_ddp)
    return real_save(flags, tag, model_without_ddp, *rest, **kwargs)


util.run_state.save = spy_save
runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
builtins.open = real_open
state = {name: value.numpy() for name, value in models[-1].state_dict().items()}
digest = hashlib.sha256()
for name, value in state.items():
    digest.update(name.encode() + value.tobytes())
np.savez(os.path.join(report_dir, f"rank{get_rank()}.npz"), **state)
with open(os.path.join(report_dir, f"rank{get_rank()}.json"), "w") as f:
    json.dump({"world_size": get_world_size(), "seen": seen, "writes": writes, "params": digest.hexdigest()}, f)
