"""Run a training script (argv: script, its flags) with the blocking host calls counted inside its
train_one_epoch: device->host reads (Tensor.item/numpy/tolist/__float__/__int__/__bool__/__index__/cpu) and
host->device uploads (paddle.to_tensor, paddle.assign of host data), per step (a step begins where its
seed is set). Prints one JSON line: {"before_first_step": N, "steps": [N, ...], "where": {file:line: N}}."""
import collections
import json
import os
import runpy
import sys
import threading
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import paddle  # noqa: E402

import engine_finetune  # noqa: E402
import engine_pretrain  # noqa: E402
import util.misc as misc  # noqa: E402

counts = {"active": False, "inside": False, "steps": [], "before": 0, "where": collections.Counter()}


def counted(fn, uploads_host_data_only=False):
    def wrapper(*args, **kwargs):
        if (counts["active"] and not counts["inside"] and threading.current_thread() is threading.main_thread()
                and not (uploads_host_data_only and isinstance(args[0], paddle.Tensor))):
            frame = traceback.extract_stack()[-2]
            counts["where"][f"{os.path.relpath(frame.filename)}:{frame.lineno}"] += 1
            if counts["steps"]:
                counts["steps"][-1] += 1
            else:
                counts["before"] += 1
        counts["inside"], outer = True, counts["inside"]
        try:
            return fn(*args, **kwargs)
        finally:
            counts["inside"] = outer
    return wrapper


for name in ("item", "numpy", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu"):
    setattr(paddle.Tensor, name, counted(getattr(paddle.Tensor, name)))
for module in (paddle, paddle.tensor, paddle.tensor.creation):
    module.to_tensor = counted(module.to_tensor)
for module in (paddle, paddle.tensor.creation):
    module.assign = counted(module.assign, uploads_host_data_only=True)

seed_everything = misc.seed_everything


def seed_and_count(*args):
    if counts["active"]:
        counts["steps"].append(0)
    seed_everything(*args)


misc.seed_everything = seed_and_count


def instrumented(train_one_epoch):
    def wrapper(*args, **kwargs):
        counts["active"] = True
        try:
            return train_one_epoch(*args, **kwargs)
        finally:
            counts["active"] = False
    return wrapper


engine_finetune.train_one_epoch = instrumented(engine_finetune.train_one_epoch)
engine_pretrain.train_one_epoch = instrumented(engine_pretrain.train_one_epoch)
script, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    sys.__stdout__.write(json.dumps({"before_first_step": counts["before"], "steps": counts["steps"],
                                     "where": counts["where"]}) + "\n")
