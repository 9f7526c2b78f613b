"""Preemption that changes nothing: runs interrupted anywhere (kill -9, SIGTERM inside an epoch, a killed
rank, SIGTERM to the launcher) and started again end with the same weights, bit for bit, and the same
log.txt as the uninterrupted run; a failed checkpoint write loses nothing."""
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from data import demo_subset
from helpers import descendants, run_script, state_of
from util import cpu_kernels

pytestmark = pytest.mark.slow

SCRIPTS = {
    "pretrain": ["main_pretrain.py", "--model", "mae_vit_micro_patch4", "--norm_pix_loss"],
    "finetune": ["main_finetune.py", "--model", "vit_micro_patch4", "--nb_classes", "10", "--input_size", "32",
                 "--mixup", "0.8", "--cutmix", "1.0", "--drop_path", "0.1", "--reprob", "0.25",
                 "--aa", "rand-m9-mstd0.5-inc1"],
    "linprobe": ["main_linprobe.py", "--model", "vit_micro_patch4", "--nb_classes", "10", "--input_size", "32"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """80 training and 40 validation images of the shipped Fashion-MNIST subset (10 iterations of 8)."""
    return demo_subset(tmp_path_factory.mktemp("fmnist"), {"train": 8, "val": 4})


def argv(script, data, out, batch_size=8):
    return [*SCRIPTS[script], "--data_path", data, "--output_dir", out, "--batch_size", str(batch_size), "--epochs",
            "3", "--warmup_epochs", "1", "--num_workers", "2", "--log_dir", "", "--print_freq", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run of each script, made once."""
    runs = {}

    def get(script):
        if script not in runs:
            out = str(tmp_path_factory.mktemp(f"ref_{script}"))
            res = run_script(*argv(script, data, out))
            assert res.returncode == 0, res.stderr[-3000:]
            runs[script] = out
        return runs[script]
    return get


def assert_same_run(out, ref, where=""):
    a, b = state_of(os.path.join(out, "checkpoint-last.pd")), state_of(os.path.join(ref, "checkpoint-last.pd"))
    assert a.keys() == b.keys()
    assert [k for k in a if not np.array_equal(a[k], b[k])] == [], where
    assert open(os.path.join(out, "log.txt")).read() == open(os.path.join(ref, "log.txt")).read(), where


def progress_line(epoch, step):
    return re.compile(rf"Epoch: \[{epoch}\]\s+\[\s*{step}/")


def interrupt(cmd, watch, pattern, send, timeout=120, **popen):
    """Start cmd, call send(process) once `pattern` shows in its output (or in the file `watch`), wait for it.
    A process that does not exit within `timeout` is sent SIGABRT, so that the failure shows where each of its
    threads waited (faulthandler)."""
    env = {**popen.pop("env", os.environ), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            **popen)
    if watch is None:
        for line in proc.stdout:
            if pattern.search(line):
                break
    else:
        deadline = time.time() + timeout
        while not (os.path.isfile(watch) and pattern.search(open(watch).read())):
            assert time.time() < deadline and proc.poll() is None, "the run did not reach the point of interruption"
            time.sleep(0.02)
    started = time.time()
    send(proc)
    try:
        output = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        raise AssertionError(f"no exit {timeout} s after the interruption; its threads then:\n"
                             + proc.communicate(timeout=60)[0][-8000:]) from None
    return proc.returncode, output, time.time() - started


@pytest.mark.parametrize("script,epoch,step", [(s, 1, 4) for s in SCRIPTS] + [("pretrain", 0, 9)])
def test_sigterm_then_rerun_is_the_same_run(data, reference, tmp_path, script, epoch, step):
    """Inside an epoch, or at its last step (the epoch is then finished and saved before stopping)."""
    out = str(tmp_path / "out")
    cmd = [sys.executable, *argv(script, data, out)]
    code, output, _ = interrupt(cmd, None, progress_line(epoch, step), lambda p: p.send_signal(signal.SIGTERM))
    assert code == 0, output[-2000:]
    assert re.search(r"Stopped (after epoch \d+\.|in epoch \d+ after iteration)", output), output[-2000:]
    res = run_script(*cmd[1:])
    assert res.returncode == 0, res.stderr[-2000:]
    assert_same_run(out, reference(script))


def test_sigterm_to_every_process_then_rerun_is_the_same_run(data, reference, tmp_path):
    """SLURM's preemption and `pkill -f` signal the loader workers too: they ignore it, the run still stops after
    its step and saves, and the rerun ends as the uninterrupted run."""
    out = str(tmp_path / "out")
    cmd = [sys.executable, *argv("finetune", data, out)]

    def everyone(proc):
        workers = descendants(proc.pid)
        assert len(workers) >= 2, workers
        for pid in [*workers, proc.pid]:
            os.kill(pid, signal.SIGTERM)

    code, output, _ = interrupt(cmd, None, progress_line(1, 4), everyone)
    assert code == 0 and "Traceback" not in output, output[-2000:]
    assert re.search(r"Stopped in epoch 1 after iteration", output), output[-2000:]
    res = run_script(*cmd[1:])
    assert res.returncode == 0, res.stderr[-2000:]
    assert_same_run(out, reference("finetune"))


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_kill_9_at_a_random_batch_then_rerun_is_the_same_run(data, reference, tmp_path, script):
    epoch, step = random.randrange(3), random.randrange(10)
    out = str(tmp_path / "out")
    cmd = [sys.executable, *argv(script, data, out)]
    code, _, _ = interrupt(cmd, None, progress_line(epoch, step), lambda p: p.kill())
    assert code == -signal.SIGKILL
    res = run_script(*cmd[1:])
    assert res.returncode == 0, (epoch, step, res.stderr[-2000:])
    assert_same_run(out, reference(script), f"killed at epoch {epoch}, iteration {step}")


def launch(data, out, log_dir):
    cpu_kernels.available()  # built once per machine: the ranks only load them
    return [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", log_dir,
            *argv("pretrain", data, out, batch_size=4)]


@pytest.fixture(scope="module")
def two_process_reference(data, tmp_path_factory):
    out, logs = str(tmp_path_factory.mktemp("ref2")), str(tmp_path_factory.mktemp("ref2_logs"))
    res = subprocess.run(launch(data, out, logs), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, open(os.path.join(logs, "workerlog.0")).read()[-3000:]
    return out


def test_two_processes_sigterm_to_the_launcher_then_rerun(data, two_process_reference, tmp_path):
    """Both ranks stop at the same step, rank 0 writes checkpoint-last.pd once, each rank exits 0 (the launcher
    itself exits with the signal's number, by Paddle's design); the rerun ends as the uninterrupted run."""
    out, logs = str(tmp_path / "out"), str(tmp_path / "logs")
    _, _, took = interrupt(launch(data, out, logs), os.path.join(logs, "workerlog.0"), progress_line(1, 2),
                           lambda p: p.send_signal(signal.SIGTERM))
    assert took < 30
    log0 = open(os.path.join(logs, "workerlog.0")).read()
    assert len(re.findall(r"Stopped in epoch 1 after iteration \d+; saved", log0)) == 1, log0[-2000:]
    assert "Traceback" not in log0 + open(os.path.join(logs, "workerlog.1")).read()
    res = subprocess.run(launch(data, out, str(tmp_path / "logs2")), cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0
    assert_same_run(out, two_process_reference)


def test_two_processes_kill_9_of_one_rank_ends_the_launch_then_rerun(data, two_process_reference, tmp_path):
    out, logs = str(tmp_path / "out"), str(tmp_path / "logs")

    def kill_rank_1(launcher):
        for pid in os.listdir("/proc"):
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                parent = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            if parent == launcher.pid and b"PADDLE_TRAINER_ID=1" in env:
                os.kill(int(pid), signal.SIGKILL)
                return
        raise AssertionError("rank 1 not found")

    code, _, took = interrupt(launch(data, out, logs), os.path.join(logs, "workerlog.0"), progress_line(1, 6),
                              kill_rank_1)
    assert code != 0 and took < 60
    res = subprocess.run(launch(data, out, str(tmp_path / "logs2")), cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0
    assert_same_run(out, two_process_reference)


def test_a_failed_checkpoint_write_loses_nothing(data, reference, tmp_path):
    """A file-size limit below a checkpoint's size: the save fails with one line naming the file, the earlier
    checkpoints stay as they were, and no temporary file is left."""
    out = str(tmp_path / "out")
    shutil.copytree(reference("pretrain"), out)
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out) if n.endswith(".pd")}
    cmd = argv("pretrain", data, out)
    cmd[cmd.index("--epochs") + 1] = "4"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, 2 ** 20))

    res = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         preexec_fn=limit)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert re.search(r"checkpoint-(3|last)\.pd: cannot write the checkpoint .*earlier checkpoints are intact", last)
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out) if n.endswith(".pd")} == before
    assert not [n for n in os.listdir(out) if ".tmp" in n]
