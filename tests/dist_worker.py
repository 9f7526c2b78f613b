"""Runs main_pretrain.py as __main__ under paddle.distributed.launch, recording per rank what it did.

    dist_worker.py REPORT_DIR main_pretrain.py [flags...]

Writes REPORT_DIR/rank{r}.json: world size, dataset indices read per epoch, files opened for writing, and a
digest of the final parameters.
"""
import builtins
import hashlib
import json
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import util.datasets  # noqa: E402
import util.misc as misc  # noqa: E402

report_dir, script = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
seen, writes, models = {}, [], []
real_open, real_getitem = builtins.open, util.datasets.ImageFolder.__getitem__
real_seed = misc.seed_everything


def spy_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+"):
        writes.append(os.fspath(file))
    return real_open(file, mode, *args, **kwargs)


def spy_getitem(self, index):
    seen.setdefault(str(spy_seed.epoch), []).append(int(index))
    return real_getitem(self, index)


def spy_seed(seed, epoch=0):
    spy_seed.epoch = epoch
    return real_seed(seed, epoch)


spy_seed.epoch = 0
builtins.open = spy_open
util.datasets.ImageFolder.__getitem__ = spy_getitem
misc.seed_everything = spy_seed
real_save = misc.save_model


def spy_save(args, epoch, model_without_ddp, *rest, **kwargs):
    models.append(model_without_ddp)
    return real_save(args, epoch, model_without_ddp, *rest, **kwargs)


misc.save_model = spy_save
runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
builtins.open = real_open
digest = hashlib.sha256()
for name, value in models[-1].state_dict().items():
    digest.update(name.encode() + value.numpy().tobytes())
with open(os.path.join(report_dir, f"rank{misc.get_rank()}.json"), "w") as f:
    json.dump({"world_size": misc.get_world_size(), "seen": seen, "writes": writes, "params": digest.hexdigest()}, f)
