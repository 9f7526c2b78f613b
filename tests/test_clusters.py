"""Clusters: the submitit scripts on submitit's local executor (2 tasks = ranks, a preemption that requeues
the job), two launchers as two nodes on this machine, and the submission's bad input."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from data import make_image_folder
from helpers import run_script, state_of
from util import cpu_kernels
from util.weights import load_checkpoint

pytestmark = pytest.mark.slow
submitit = pytest.importorskip("submitit")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), classes=2, per_class=16)


def training(data, epochs):
    """16 iterations per epoch with 2 ranks: a stop signal sent early in an epoch lands well before its end."""
    return ["--model", "mae_vit_tiny_patch4", "--data_path", data, "--batch_size", "1", "--epochs", str(epochs),
            "--warmup_epochs", "1", "--num_workers", "0", "--device", "cpu", "--print_freq", "1"]


def submit_local(data, job_dir, epochs, monkeypatch, timeout_min=None, tasks=2, extra=()):
    from util import slurm
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # submit() adds the repo; undone after
    cpu_kernels.available()
    submit_args, args = slurm.parse("test", "main_pretrain", ["--cluster", "local", "--nodes", "1", "--ngpus",
                                                              str(tasks), "--job_dir", job_dir, *training(data, epochs),
                                                              *extra])
    submit_args.timeout = timeout_min or submit_args.timeout
    return slurm.submit("main_pretrain", submit_args, args)


def epochs_logged(folder):
    return [json.loads(line)["epoch"] for line in open(os.path.join(folder, "log.txt"))]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    try:
        job = submit_local(data, str(tmp_path_factory.mktemp("jobs") / "%j"), 3, monkeypatch)
        job.results()
    finally:
        monkeypatch.undo()
    return job


def test_local_job_of_two_tasks_equals_the_launch_run(data, uninterrupted, tmp_path):
    folder = str(uninterrupted.paths.folder)
    assert epochs_logged(folder) == [0, 1, 2]
    assert "distributed init (rank 0 of 2" in open(uninterrupted.task(0).paths.stdout).read()
    out, logs = str(tmp_path / "launch"), str(tmp_path / "logs")
    res = run_script("-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", logs, "main_pretrain.py",
                     *training(data, 3), "--output_dir", out, "--log_dir", "", timeout=300)
    assert res.returncode == 0, open(os.path.join(logs, "workerlog.0")).read()[-2000:]
    a, b = state_of(os.path.join(folder, "checkpoint-last.pd")), state_of(os.path.join(out, "checkpoint-last.pd"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_preempted_job_is_requeued_and_completes_the_run(data, uninterrupted, tmp_path, monkeypatch):
    """submitit's preemption signal (USR2, as SLURM sends it) to every task during epoch 1: training stops at
    the next step, rank 0 saves, submitit requeues; the requeued tasks resume and end as the uninterrupted job."""
    job = submit_local(data, str(tmp_path / "%j"), 3, monkeypatch)
    deadline = time.time() + 120
    stdout = job.task(0).paths.stdout
    while not (os.path.isfile(stdout) and re.search(r"Epoch: \[1\]\s+\[\s*1/", open(stdout).read())):
        assert time.time() < deadline and not job.done(), "the job did not reach epoch 1"
        time.sleep(0.05)
    tasks = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(p) == job._process.pid]
    assert len(tasks) == 2
    for pid in tasks:
        os.kill(pid, signal.SIGUSR2)
    job.results()
    log = open(job.task(0).paths.stdout).read()
    assert "Stopped in epoch 1 after iteration" in log and "Requeued job" in open(job.task(0).paths.stderr).read()
    assert "Auto-resume from" in log and "Continuing epoch 1 at iteration" in log
    folder = str(job.paths.folder)
    assert epochs_logged(folder) == [0, 1, 2]
    a = state_of(os.path.join(folder, "checkpoint-last.pd"))
    b = state_of(os.path.join(str(uninterrupted.paths.folder), "checkpoint-last.pd"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert open(os.path.join(folder, "log.txt")).read() == \
        open(os.path.join(str(uninterrupted.paths.folder), "log.txt")).read()


def epoch_seconds(job):
    """Seconds per epoch of a finished job, from its log's 's / it' and iterations per epoch."""
    log = open(job.task(0).paths.stdout).read()
    per_it = [float(x) for x in re.findall(r"Total time: \S+ \(([\d.]+) s / it\)", log)]
    iterations = int(re.findall(r"\[\s*\d+/(\d+)\]", log)[-1])
    return sorted(per_it)[len(per_it) // 2] * iterations


def test_time_limit_requeues_until_the_run_is_complete(data, uninterrupted, tmp_path, monkeypatch):
    """submitit's own time limit on the local executor: a 1-minute job whose controller sends the preemption
    signal 30 s in; the run needs more than that, so it is requeued, resumes and completes, with every epoch
    once in log.txt."""
    # about 50 s of training at this machine's current speed: more than the 30 s before the signal, and
    # within the local executor's 6 attempts even when the machine slows down by half
    epochs = max(10, round(50 / epoch_seconds(uninterrupted)))
    job = submit_local(data, str(tmp_path / "%j"), epochs, monkeypatch, timeout_min=1)
    job.results()
    log = open(job.task(0).paths.stdout).read()
    assert "Requeued job" in open(job.task(0).paths.stderr).read() and "Auto-resume from" in log
    assert epochs_logged(str(job.paths.folder)) == list(range(epochs))


def _parent(pid):
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return None


def _node(data, out, logs, port, report, epochs=2):
    return subprocess.Popen([sys.executable, "-m", "paddle.distributed.launch", "--nnodes", "2", "--master",
                             f"127.0.0.1:{port}", "--nproc_per_node", "1", "--log_dir", logs,
                             os.path.join(ROOT, "tests", "dist_worker.py"), report, "main_pretrain.py",
                             *training(data, epochs), "--output_dir", out, "--log_dir", ""],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_two_launchers_as_two_nodes(data, tmp_path):
    cpu_kernels.available()
    report, out = tmp_path / "report", str(tmp_path / "out")
    report.mkdir()
    port = 20000 + os.getpid() % 20000
    nodes = [_node(data, out, str(tmp_path / f"node{i}"), port, str(report)) for i in (0, 1)]
    assert [n.wait(timeout=300) for n in nodes] == [0, 0]
    ranks = [json.load(open(report / f"rank{r}.json")) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for epoch in ("0", "1"):
        seen = [set(r["seen"][epoch]) for r in ranks]
        assert len(seen[0]) == len(seen[1]) == 16 and not seen[0] & seen[1]
    assert ranks[0]["params"] == ranks[1]["params"]
    assert ranks[1]["writes"] == [] and any(w.endswith("log.txt") for w in ranks[0]["writes"])
    assert os.path.isfile(os.path.join(out, "checkpoint-last.pd"))


def test_killing_one_node_ends_the_other(data, tmp_path):
    cpu_kernels.available()
    report = tmp_path / "report"
    report.mkdir()
    port = 20001 + os.getpid() % 20000
    nodes = [_node(data, str(tmp_path / "out"), str(tmp_path / f"node{i}"), port, str(report), epochs=20)
             for i in (0, 1)]
    logs = [tmp_path / f"node{i}" / "workerlog.0" for i in (0, 1)]
    deadline = time.time() + 120
    while not any(log.is_file() and "Epoch: [0]" in log.read_text() for log in logs):  # rank 0 is training
        assert time.time() < deadline and nodes[1].poll() is None
        time.sleep(0.05)
    children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(p) == nodes[1].pid]
    for pid in [nodes[1].pid, *children]:  # the whole node: its launcher and its training process
        os.kill(pid, signal.SIGKILL)
    started = time.time()
    code = nodes[0].wait(timeout=120)
    assert code != 0 and time.time() - started < 90


@pytest.mark.parametrize("flags,message,code", [
    (["--nodes", "0"], "argument --nodes: must be >= 1", 2),
    (["--ngpus", "0"], "argument --ngpus: must be >= 1", 2),
    ([], "SLURM is not available here (no sbatch)", 1),
])
def test_submission_bad_input(data, tmp_path, flags, message, code):
    out = run_script("submitit_pretrain.py", "--job_dir", str(tmp_path / "%j"), *flags, *training(data, 1),
                     env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == code and message in out.stderr.strip().splitlines()[-1], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_unwritable_job_dir(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = run_script("submitit_pretrain.py", "--cluster", "local", "--nodes", "1", "--ngpus", "2", "--job_dir",
                     str(blocker / "%j"), *training(data, 1))
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "--job_dir" in out.stderr.strip().splitlines()[-1] or "--output_dir" in out.stderr.strip().splitlines()[-1]


def test_without_submitit_installed(data, tmp_path):
    shim = tmp_path / "shim" / "submitit"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named submitit')\n")
    out = run_script("submitit_pretrain.py", "--job_dir", str(tmp_path / "%j"), *training(data, 1),
                     env={"PYTHONPATH": str(tmp_path / "shim")})
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and "need submitit (pip install -r requirements-slurm.txt)" in last


def test_a_job_resubmitted_on_fewer_gpus_continues_with_the_same_effective_batch(data, uninterrupted, tmp_path,
                                                                                  monkeypatch):
    """The 2-task job's folder (3 epochs done), submitted again with 1 task, --accum_iter auto and 4 epochs:
    the job continues at epoch 3 with --accum_iter 2 (2 x 1 x 1 = 1 x 1 x 2)."""
    folder = str(tmp_path / "job")
    shutil.copytree(str(uninterrupted.paths.folder), folder)
    job = submit_local(data, folder, 4, monkeypatch, tasks=1, extra=("--accum_iter", "auto"))
    job.results()
    out = open(job.paths.stdout).read()
    assert "--accum_iter auto: 2 (keeps the effective batch of 2" in out
    assert "With optim & sched!" in out and epochs_logged(folder) == [0, 1, 2, 3]
    args = load_checkpoint(os.path.join(folder, "checkpoint-last.pd"))["args"]
    assert (args["world_size"], args["accum_iter"]) == (1, 2)

