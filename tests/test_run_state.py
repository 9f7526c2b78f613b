"""A run's state and its checkpoints: flags that stay as parsed through training, a stop and a resume; the
checkpoints of format 1 (tests/checkpoints_v1) continued bit for bit; the format version checked."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from data import make_train_val
from helpers import run_script
from util.errors import CheckpointError
from util.weights import load_checkpoint, save_file

pytestmark = pytest.mark.slow
OLD = os.path.join(ROOT, "tests", "checkpoints_v1")
MODELS = {"pretrain": ["main_pretrain.py", "--model", "mae_vit_micro_patch4", "--norm_pix_loss"],
          "finetune": ["main_finetune.py", "--model", "vit_micro_patch4", "--nb_classes", "2", "--mixup", "0.8",
                       "--cutmix", "1.0"],
          "linprobe": ["main_linprobe.py", "--model", "vit_micro_patch4", "--nb_classes", "2"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_train_val(str(tmp_path_factory.mktemp("data")), 2, 8, 4)


def argv(run, data, out, epochs=2):
    return [*MODELS[run], "--data_path", data, "--output_dir", out, "--batch_size", "4", "--epochs", str(epochs),
            "--warmup_epochs", "1", "--num_workers", "0", "--log_dir", "", "--device", "cpu", "--input_size", "16",
            "--save_freq", "1", "--print_freq", "1"]


def continued_from(name, run, data, tmp_path, epochs=2):
    """The run `run` continued (new code) from the format-1 checkpoint `name` placed as checkpoint-last.pd."""
    out = str(tmp_path / run)
    os.makedirs(out)
    shutil.copy(os.path.join(OLD, name), os.path.join(out, "checkpoint-last.pd"))
    res = run_script(*argv(run, data, out, epochs), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


@pytest.mark.parametrize("run,name", [("finetune", "finetune_epoch0.pd"), ("linprobe", "linprobe_epoch0.pd")])
def test_a_format_1_checkpoint_continues_bit_for_bit(data, tmp_path, run, name):
    """The format-1 file and the same state written in format 2 (mapped here by hand: the classes out of
    'args') continue to the same bits: reading format 1 loses nothing. With test_exact_resume (a format-2
    continuation is the uninterrupted run) this makes the continued run the uninterrupted one on any CPU;
    weights recorded on one CPU differ on another by float32 rounding (summation order), so no recorded
    weights are compared."""
    out, res = continued_from(name, run, data, tmp_path)
    assert "With optim & sched!" in res.stdout
    old = load_checkpoint(os.path.join(OLD, name))
    assert "format" not in old
    flags = {k: v for k, v in old["args"].items() if k not in ("classes", "start_iter", "skipped")}
    twin = tmp_path / "twin"
    twin.mkdir()
    save_file({**old, "format": 2, "classes": old["args"]["classes"], "args": flags},
              str(twin / "checkpoint-last.pd"))
    assert run_script(*argv(run, data, str(twin)), timeout=300).returncode == 0
    last = load_checkpoint(os.path.join(out, "checkpoint-last.pd"))
    want = load_checkpoint(str(twin / "checkpoint-last.pd"))
    assert sorted(last["model"]) == sorted(want["model"]) == sorted(old["model"])
    for k in want["model"]:
        np.testing.assert_array_equal(last["model"][k], want["model"][k], err_msg=k)
    assert any(not np.array_equal(last["model"][k], old["model"][k]) for k in old["model"])  # it trained
    moments = {(p, a): v for p, acc in want["optimizer"]["state"].items() for a, v in acc.items()}
    assert moments and all(np.array_equal(last["optimizer"]["state"][p][a], v) for (p, a), v in moments.items())
    assert open(os.path.join(out, "log.txt")).read() == open(twin / "log.txt").read()
    assert last["format"] == 2 and last["epoch"] == 1 and last["iteration"] == 0
    assert last["classes"] == old["args"]["classes"] == ["class_0", "class_1"]
    assert last["best"]["acc1"] >= old["best"]["acc1"]
    assert not {"start_iter", "skipped", "classes"} & set(last["args"])  # the flags as given, the state beside


def test_a_format_1_checkpoint_stopped_inside_an_epoch_continues_there(data, tmp_path):
    """Pre-training masks each sample by its own noise since format 2 (util.transforms.MaskNoise), so the
    continued run is not the old one's to the bit; it continues at the stopped position with the stopped
    epoch's meters, and two continuations agree bit for bit."""
    out, res = continued_from("pretrain_stopped.pd", "pretrain", data, tmp_path)
    again, _ = continued_from("pretrain_stopped.pd", "pretrain", data, tmp_path / "again")
    assert "Continuing epoch 1 at iteration 2." in res.stdout
    assert "Epoch: [1]  [2/4]" in res.stdout and "Epoch: [1]  [1/4]" not in res.stdout
    a, b = (load_checkpoint(os.path.join(o, "checkpoint-last.pd")) for o in (out, again))
    assert a["epoch"] == 1 and all(np.array_equal(a["model"][k], b["model"][k]) for k in a["model"])
    ckpt = load_checkpoint(os.path.join(OLD, "pretrain_stopped.pd"))
    old = ckpt["meters"][0]["loss"]
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({**ckpt, "meters": None}, str(bare / "checkpoint-last.pd"))
    assert run_script(*argv("pretrain", data, str(bare)), timeout=300).returncode == 0

    def last_loss(folder):
        with open(os.path.join(folder, "log.txt")) as f:
            return json.loads(f.read().splitlines()[-1])["train_loss"]
    # the epoch's average: the stopped run's 2 iterations (its meters) and this run's 2
    assert old["count"] == 2
    assert last_loss(out) == pytest.approx((old["total"] + 2 * last_loss(str(bare))) / 4, rel=1e-6)


def test_a_format_1_checkpoint_keeps_its_rewinds(data, tmp_path):
    out, res = continued_from("pretrain_rewound.pd", "pretrain", data, tmp_path, epochs=3)
    assert "Start training for 3 epochs" in res.stdout
    last = load_checkpoint(os.path.join(out, "checkpoint-last.pd"))
    assert last["epoch"] == 2 and last["skipped"] == [[1, 1, 1]]
    with open(os.path.join(out, "log.txt")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [2]


def test_a_newer_format_is_refused_with_one_line(data, tmp_path):
    ckpt = load_checkpoint(os.path.join(OLD, "linprobe_epoch0.pd"))
    out = tmp_path / "o"
    out.mkdir()
    save_file({**ckpt, "format": 3}, str(out / "checkpoint-last.pd"))
    res = run_script(*argv("linprobe", data, str(out)), "--auto_resume", "--resume", str(out / "checkpoint-last.pd"))
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: {out / 'checkpoint-last.pd'}: checkpoint format 3 is newer than this version of the code reads "
        "(formats 1 to 2); update the code to continue this run")
    from util.checkpoint import check_training_state
    with pytest.raises(CheckpointError, match="'format' is 'two'"):
        check_training_state({**ckpt, "format": "two"}, "c")


def run_keeping_flags(run, data, out, stop_at=None):
    """The script's main in this interpreter's own process, stopped (as by SIGTERM) at iteration stop_at =
    (epoch, step) when given; checks that the parsed flags object equals a deep copy taken before."""
    code = f"""
import copy, signal, sys
sys.path.insert(0, {ROOT!r})
import {MODELS[run][0][:-3]} as script
from util import nonfinite
from util.preempt import STOP

flags = script.parse_args({argv(run, data, out)[1:]!r})
before = copy.deepcopy(flags)
nonfinite.LOSS_HOOKS.append(lambda loss, epoch, step: (STOP.receive(signal.SIGTERM) if (epoch, step) == {stop_at!r}
                                                        else None) or loss)
script.main(flags)
assert type(flags).__name__ == "Flags" and flags == before, (vars(flags), vars(before))
print("flags unchanged")
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "flags unchanged" in res.stdout
    return res


@pytest.mark.parametrize("run", ["pretrain", "finetune", "linprobe"])
def test_the_flags_stay_as_parsed_through_a_stop_and_a_resume(data, tmp_path, run):
    out = str(tmp_path / "o")
    assert "Stopped in epoch 1 after iteration 2" in run_keeping_flags(run, data, out, stop_at=(1, 1)).stdout
    assert "Continuing epoch 1 at iteration 2." in run_keeping_flags(run, data, out).stdout
    assert load_checkpoint(os.path.join(out, "checkpoint-last.pd"))["epoch"] == 1
