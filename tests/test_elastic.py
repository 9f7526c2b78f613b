"""Elastic resume: pre-training whose result does not depend on how the effective batch is split (1 process
x 8, 1 x 4 with --accum_iter 2, 2 processes x 4 under paddle.distributed.launch), and a 2-process run stopped
inside an epoch (SIGTERM, kill -9) that continues on 1 process with --accum_iter 2."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from data import make_train_val
from helpers import descendants, run_script, state_of
from util import cpu_kernels

pytestmark = pytest.mark.slow
PRETRAIN = ["main_pretrain.py", "--model", "mae_vit_micro_patch4", "--norm_pix_loss"]
# Float32 sums in another order (over processes, micro-steps) move the weights by rounding noise, which Adam
# passes on at the size of its step for entries whose gradient is rounding noise itself: the attention key
# biases (softmax ignores a constant per query). Measured here after 36 steps: 1.5e-8 (one rounding step of
# the largest weights), the key biases 9e-6, the epochs' losses 6e-8 relative; training moved them ~1e-4.
TOL, KEY_BIAS_TOL = 1e-6, 3e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_train_val(str(tmp_path_factory.mktemp("data")), 2, 24, 4)  # 48 images: 6 steps of 8


def flags(data, out, batch_size, accum_iter=1):
    return ["--data_path", data, "--output_dir", out, "--batch_size", str(batch_size), "--accum_iter",
            str(accum_iter), "--epochs", "6", "--warmup_epochs", "1", "--num_workers", "0", "--log_dir", "",
            "--device", "cpu", "--input_size", "16", "--print_freq", "1"]


def single(data, out, batch_size, accum_iter=1, stop=None):
    worker = [os.path.join("tests", "stop_worker.py"), *map(str, stop)] if stop else []
    res = run_script(*worker, *PRETRAIN, *flags(data, out, batch_size, accum_iter), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def launched(data, out, tmp_path, stop=None):
    cpu_kernels.available()  # built once per machine: the ranks only load them
    worker = [os.path.join(ROOT, "tests", "stop_worker.py"), *map(str, stop)] if stop else []
    res = run_script("-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                     str(tmp_path / f"launch_{os.path.basename(out)}"), *worker, *PRETRAIN,
                     *flags(data, out, 4), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def contents(out):
    return {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out) if n != ".lock"}


def assert_refused(res, line):
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1] == "error: " + line, res.stderr[-2000:]


def losses(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line)["train_loss"] for line in f]


def assert_same_training(a, b):
    np.testing.assert_allclose(losses(a), losses(b), rtol=1e-5)
    wa, wb = state_of(os.path.join(a, "checkpoint-last.pd")), state_of(os.path.join(b, "checkpoint-last.pd"))
    for k in wa:
        tol = KEY_BIAS_TOL if k.endswith("attn.qkv.bias") else TOL
        assert np.abs(wa[k] - wb[k]).max() <= tol, (k, float(np.abs(wa[k] - wb[k]).max()))


def test_pretraining_does_not_depend_on_the_split(data, tmp_path):
    one, accum, two = (str(tmp_path / n) for n in ("one_x8", "one_x4_accum2", "two_x4"))
    single(data, one, 8)
    single(data, accum, 4, 2)
    launched(data, two, tmp_path)
    assert len(losses(one)) == 6  # 36 optimizer steps
    start, end = state_of(os.path.join(one, "checkpoint-0.pd")), state_of(os.path.join(one, "checkpoint-last.pd"))
    assert max(float(np.abs(end[k] - start[k]).max()) for k in end) > 100 * TOL  # the tolerance is no blanket
    assert_same_training(one, accum)
    assert_same_training(one, two)


def test_a_two_process_run_stopped_inside_an_epoch_continues_on_one(data, tmp_path):
    """Stopped after iteration 3 of epoch 2 (4 of 6 steps of 8 samples seen), continued by 1 process with
    --accum_iter 2 from iteration 8: it ends as the uninterrupted 2-process run did (to rounding), and the
    same resume done twice (there with --accum_iter auto) ends bit for bit alike."""
    whole, stopped = str(tmp_path / "whole"), str(tmp_path / "stopped")
    launched(data, whole, tmp_path)
    launched(data, stopped, tmp_path, stop=(2, 3))
    assert [r for r in range(6) if r < len(losses(stopped))] == [0, 1]
    again = str(tmp_path / "again")
    shutil.copytree(stopped, again)
    res = single(data, stopped, 4, 2)
    assert "continuing after the same 32 samples of the epoch" in res.stdout
    assert "Continuing epoch 2 at iteration 8." in res.stdout
    assert "--accum_iter auto: 2 (keeps the effective batch of 8" in single(data, again, 4, "auto").stdout
    assert_same_training(stopped, whole)
    a, b = state_of(os.path.join(stopped, "checkpoint-last.pd")), state_of(os.path.join(again, "checkpoint-last.pd"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert losses(stopped) == losses(again)


def test_accum_iter_auto_costs_no_rank_but_the_first_a_second_read(data, tmp_path):
    """--accum_iter auto on 2 processes: rank 0 reads the checkpoint to find the accumulation and again to
    resume, rank 1 only to resume."""
    out = str(tmp_path / "o")
    single(data, out, 8)
    cpu_kernels.available()
    logs = tmp_path / "launch"
    res = run_script("-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(logs),
                     os.path.join(ROOT, "tests", "count_reads.py"), *PRETRAIN, *flags(data, out, 4, "auto"),
                     timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = os.path.join(out, "checkpoint-last.pd")
    for rank, reads in ((0, 2), (1, 1)):
        text = (logs / f"workerlog.{rank}").read_text()
        assert text.count(f"checkpoint read by rank {rank}: {ckpt}") == reads, text[-3000:]
        assert text.count("checkpoint read by rank") == reads
    first = (logs / "workerlog.0").read_text()
    assert "--accum_iter auto: 1 (keeps the effective batch of 8" in first and "nothing to do: 6 of 6" in first


def test_another_effective_batch_is_refused_and_nothing_is_written(data, tmp_path):
    out = str(tmp_path / "o")
    single(data, out, 8)
    before = contents(out)
    assert_refused(run_script(*PRETRAIN, *flags(data, out, 8, 2), "--epochs", "7"), (
        f"{out}/checkpoint-last.pd: trained with an effective batch of 8 (--batch_size 8 x --accum_iter 1 "
        "x 1 process(es)), this run's is 16 (--batch_size 8 x --accum_iter 2 x 1); with 1 process(es) to keep "
        "it: --batch_size 8 --accum_iter 1, --batch_size 4 --accum_iter 2, --batch_size 2 --accum_iter 4"))
    assert_refused(run_script(*PRETRAIN, *flags(data, out, 3, "auto"), "--epochs", "7"), (
        f"{out}/checkpoint-last.pd: its effective batch of 8 is not a multiple of --batch_size 3 x 1 "
        "process(es); choose a --batch_size that divides 8"))
    assert contents(out) == before
    new = single(data, str(tmp_path / "new"), 8, "auto")
    assert "--accum_iter auto: a new run, 1" in new.stdout


def test_a_changed_training_set_is_refused_inside_an_epoch(data, tmp_path):
    out, images = str(tmp_path / "o"), str(tmp_path / "images")
    shutil.copytree(data, images)
    single(images, out, 8, stop=(1, 2))
    before = contents(out)
    os.remove(os.path.join(images, "train", "class_1", "img_3.png"))
    assert_refused(run_script(*PRETRAIN, *flags(images, out, 8)), (
        f"{out}/checkpoint-last.pd: stopped inside epoch 1 of a training set of 48 images, which now holds "
        "47: that epoch's order is gone; restore the images, or resume from the end of epoch 0"))
    assert contents(out) == before


@pytest.mark.parametrize("script", ["finetune", "linprobe"])
def test_classifiers_continue_on_another_process_count(data, tmp_path, script):
    """Fine-tuning (Mixup/CutMix pair samples inside each process's batch) and linear probing (the head's
    BatchNorm normalises each process's batch), as the official: not split-invariant, but the resumed run
    takes the same samples per step and the same effective batch, and lands near the uninterrupted one."""
    argv = {"finetune": ["main_finetune.py", "--model", "vit_micro_patch4", "--nb_classes", "2", "--mixup", "0.8",
                         "--cutmix", "1.0", "--blr", "5e-3"],
            "linprobe": ["main_linprobe.py", "--model", "vit_micro_patch4", "--nb_classes", "2", "--blr", "1"]}[script]
    whole, stopped = str(tmp_path / "whole"), str(tmp_path / "stopped")
    cpu_kernels.available()
    for out, stop in ((whole, ()), (stopped, ("2", "3"))):
        worker = [os.path.join(ROOT, "tests", "stop_worker.py"), *stop] if stop else []
        res = run_script("-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                         str(tmp_path / f"launch_{os.path.basename(out)}"), *worker, *argv,
                         *flags(data, out, 4), timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    res = run_script(*argv, *flags(data, stopped, 4, 2), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "continuing after the same 32 samples of the epoch" in res.stdout
    logs = {}
    for out in (whole, stopped):
        with open(os.path.join(out, "log.txt")) as f:
            logs[out] = [json.loads(line) for line in f]
    assert [r["epoch"] for r in logs[stopped]] == list(range(6))
    assert [r["train_loss"] for r in logs[stopped][:2]] == [r["train_loss"] for r in logs[whole][:2]]
    np.testing.assert_allclose([r["train_loss"] for r in logs[stopped]], [r["train_loss"] for r in logs[whole]],
                               rtol=0.05)
    assert abs(logs[stopped][-1]["test_acc1"] - logs[whole][-1]["test_acc1"]) <= 12.5  # one of 8 images


def test_a_two_process_run_killed_inside_an_epoch_continues_on_one(data, tmp_path):
    """kill -9 of the launch and its ranks during epoch 3: the run continues from checkpoint-last.pd (the end
    of epoch 2) on 1 process with --accum_iter 2, ends as the uninterrupted 2-process run did (to rounding),
    and the same resume done twice ends bit for bit alike."""
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    launched(data, whole, tmp_path)
    logs = tmp_path / "launch_killed"
    proc = subprocess.Popen([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                             str(logs), *PRETRAIN, *flags(data, killed, 4)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        log = (logs / "workerlog.0").read_text() if (logs / "workerlog.0").exists() else ""
        if "Epoch: [3]  [2/6]" in log:
            break
        time.sleep(0.05)
    for pid in [*descendants(proc.pid), proc.pid]:  # the ranks (and any workers), the launcher
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert len(losses(killed)) == 3  # epochs 0-2 done, epoch 3 under way
    again = str(tmp_path / "again")
    shutil.copytree(killed, again)
    single(data, killed, 4, 2)
    single(data, again, 4, "auto")
    assert_same_training(killed, whole)
    a, b = state_of(os.path.join(killed, "checkpoint-last.pd")), state_of(os.path.join(again, "checkpoint-last.pd"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
