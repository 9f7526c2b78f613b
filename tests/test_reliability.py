"""Fault injection: kills, preemption signals, corrupt checkpoints, bad image files, bad flags."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import paddle
import pytest
from PIL import Image

from util.amp import NativeScalerWithGradNormCount
from util.errors import CheckpointError, NonFiniteError
from util.weights import load_checkpoint, load_file, save_file
from conftest import ROOT
from data import make_image_folder, make_train_val
from helpers import run_script


def _args(data, out, *extra):
    return ["main_pretrain.py", "--model", "mae_vit_tiny_patch4", "--data_path", data, "--batch_size", "4",
            "--epochs", "3", "--warmup_epochs", "1", "--num_workers", "0", "--output_dir", out, "--log_dir", "",
            "--print_freq", "1", "--device", "cpu", "--save_freq", "100", *extra]


def _epochs(out):
    return [json.loads(line)["epoch"] for line in open(os.path.join(out, "log.txt"))]


def _start(argv):
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_epochs(out, n, proc, timeout=120):
    path = os.path.join(out, "log.txt")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isfile(path) and len(open(path).readlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    raise AssertionError("training did not reach the epoch in time")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), classes=2, per_class=20)


@pytest.mark.slow
def test_kill_9_then_rerun_resumes(dataset, tmp_path):
    out = str(tmp_path / "out")
    proc = _start(_args(dataset, out))
    _wait_for_epochs(out, 1, proc)
    time.sleep(0.5)  # inside epoch 1
    proc.kill()
    proc.wait()
    saved = os.path.isfile(os.path.join(out, "checkpoint-last.pd"))  # the log line comes first: maybe not yet
    assert _epochs(out) in ([0], [0, 1])
    res = run_script(*_args(dataset, out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert ("Auto-resume from" in res.stdout and "checkpoint-last.pd" in res.stdout) == saved
    assert _epochs(out) == [0, 1, 2]


@pytest.mark.slow
def test_killed_before_the_first_checkpoint_logs_each_epoch_once(dataset, tmp_path):
    """A kill between epoch 0's log line and its checkpoint: the rerun starts over and logs epoch 0 once."""
    out = str(tmp_path / "out")
    os.makedirs(out)
    with open(os.path.join(out, "log.txt"), "w") as f:
        f.write(json.dumps({"train_loss": 1.0, "epoch": 0}) + "\n")
    res = run_script(*_args(dataset, out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert _epochs(out) == [0, 1, 2] and "Auto-resume from" not in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_saves_position_and_rerun_continues(dataset, tmp_path, sig):
    """SIGTERM (preemption) or SIGHUP (a closed terminal): stop, save the position, continue on a rerun."""
    out = str(tmp_path / "out")
    one = ("--batch_size", "1")  # 40 short iterations per epoch: the signal lands inside one
    proc = _start(_args(dataset, out, *one))
    seen = []
    for line in proc.stdout:  # the signal goes once epoch 1's progress shows
        seen.append(line)
        if re.search(r"Epoch: \[1\]  \[\s*2/40\]", line):
            proc.send_signal(sig)
            break
    stdout, stderr = proc.communicate(timeout=120)
    stdout = "".join(seen) + stdout
    assert proc.returncode == 0, stderr[-2000:]
    assert f"Received {sig.name}" in stdout
    epoch = int(re.search(r"Stopped in epoch (\d) after iteration", stdout).group(1))  # 1, or 2 on a fast machine
    ckpt = paddle.load(os.path.join(out, "checkpoint-last.pd"))
    assert ckpt["epoch"] == epoch - 1 and 0 < ckpt["iteration"] < 40
    assert _epochs(out) == list(range(epoch))
    res = run_script(*_args(dataset, out, *one))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"Continuing epoch {epoch} at iteration {ckpt['iteration']}" in res.stdout
    first = re.search(rf"Epoch: \[{epoch}\]  \[\s*(\d+)/40\]", res.stdout)
    assert int(first.group(1)) == ckpt["iteration"]  # the batches already done are not repeated
    assert _epochs(out) == [0, 1, 2]


def test_resume_inside_an_epoch_with_another_batch_size():
    """The stop position means samples seen: another --batch_size continues after them, or stops with one
    line when no optimizer step of the new run ends there."""
    from types import SimpleNamespace

    from util.checkpoint import position_in_epoch
    ckpt = {"epoch": 0, "iteration": 73, "args": {"batch_size": 8}}
    assert position_in_epoch(ckpt, SimpleNamespace(batch_size=8, accum_iter=1, world_size=1), "c") == 73
    at_72 = {**ckpt, "iteration": 72}
    assert position_in_epoch(at_72, SimpleNamespace(batch_size=64, accum_iter=1, world_size=1), "c") == 9
    assert position_in_epoch(at_72, SimpleNamespace(batch_size=4, accum_iter=2, world_size=1), "c") == 144
    for batch_size, accum in ((64, 1), (16, 1), (24, 3)):
        with pytest.raises(CheckpointError, match=r"after 584 samples \(73 x --batch_size 8 x 1 process\(es\)\), "
                                                  r"which .* resume with --batch_size 8"):
            position_in_epoch(ckpt, SimpleNamespace(batch_size=batch_size, accum_iter=accum, world_size=1), "c")
    two = {**ckpt, "iteration": 6, "args": {"batch_size": 4, "accum_iter": 1, "world_size": 2}}
    assert position_in_epoch(two, SimpleNamespace(batch_size=4, accum_iter=2, world_size=1), "c") == 12


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back(dataset, tmp_path):
    out = str(tmp_path / "out")
    res = run_script(*_args(dataset, out, "--epochs", "2", "--save_freq", "1"))
    assert res.returncode == 0, res.stderr[-2000:]
    last = os.path.join(out, "checkpoint-last.pd")
    open(last, "wb").write(open(last, "rb").read()[:1000])  # truncated, and the newest file
    os.utime(last, (time.time() + 5, time.time() + 5))
    res = run_script(*_args(dataset, out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "skipping unusable checkpoint" in res.stdout and "Auto-resume from" in res.stdout
    assert "checkpoint-1.pd" in res.stdout.split("Auto-resume from")[1].splitlines()[0]
    assert _epochs(out) == [0, 1, 2]


SOUND = {"model": {"w": np.zeros(2, np.float32)}, "optimizer": {"state": {"w": {"moment1": np.zeros(2, np.float32)}}},
         "epoch": 0, "iteration": 3, "scaler": {}, "best": {"acc1": 12.5, "epoch": 0},
         "meters": [{"loss": {"count": 2, "total": 1.5, "values": [0.7, 0.8]}}], "skipped": [[0, 4, 5]],
         "args": {"batch_size": 8}}
WRONG = [("epoch", "abc"), ("epoch", None), ("epoch", [1]), ("epoch", -2), ("epoch", True), ("epoch", 1.5),
         ("iteration", -1), ("iteration", "3"), ("iteration", 2.0), ("optimizer", "adam"), ("optimizer", None),
         ("optimizer", {"state": "x"}), ("optimizer", {"state": {"w": [1, 2]}}), ("scaler", "x"), ("best", "high"),
         ("best", {"acc1": "high"}), ("best", {"acc1": float("nan")}), ("best", {"acc1": 1.0, "epoch": "x"}),
         ("best", {}), ("meters", "x"), ("meters", [1]), ("meters", [{"loss": {"count": "a"}}]),
         ("meters", [{"loss": {"count": 1, "total": 1.0, "values": ["a"]}}]), ("args", "x"), ("args", [1]),
         ("skipped", "x"), ("skipped", [[1, 2]]), ("skipped", [[1, 5, 4]]), ("skipped", [[1, -1, 2]]),
         ("skipped", [[1, 2, "3"]])]


def test_every_training_field_is_checked(tmp_path):
    from util.checkpoint import check_training_state
    path = str(tmp_path / "m.pd")
    save_file(dict(SOUND, model=[np.zeros(2)]), path)
    with pytest.raises(CheckpointError, match=r"'model' is list, not a dict of weights"):
        load_checkpoint(path)
    check_training_state(SOUND, "c.pd")
    check_training_state(dict(SOUND, best=None, meters=None), "c.pd")
    for key, value in WRONG:
        with pytest.raises(CheckpointError, match=rf"^c.pd: '{key}' .*not a checkpoint to continue training from"):
            check_training_state(dict(SOUND, **{key: value}), "c.pd")


@pytest.mark.slow
def test_checkpoints_with_wrong_fields_fall_back_or_stop_with_one_line(dataset, tmp_path):
    """Auto-resume passes over checkpoints whose fields are wrong to the previous sound one; --resume of
    one stops with a line naming the field."""
    out = str(tmp_path / "out")
    res = run_script(*_args(dataset, out, "--epochs", "2", "--save_freq", "1"))
    assert res.returncode == 0, res.stderr[-2000:]
    for n, (name, key, value) in enumerate([("checkpoint-1.pd", "meters", [{"loss": {"count": "a"}}]),
                                            ("checkpoint-last.pd", "epoch", "abc")]):
        path = os.path.join(out, name)
        save_file(dict(load_file(path)[0], **{key: value}), path)
        os.utime(path, (time.time() + 5 + n, time.time() + 5 + n))
    for key, value, why in [("epoch", None, "is None, not an epoch number"),
                            ("optimizer", "adam", "is str, not a dict"), ("args", [1], "is list, not a dict of flags")]:
        bad = str(tmp_path / f"bad_{key}.pd")
        save_file(dict(load_file(os.path.join(out, "checkpoint-0.pd"))[0], **{key: value}), bad)
        res = run_script(*_args(dataset, str(tmp_path / "other"), "--resume", bad))
        assert res.returncode == 1 and res.stderr.strip().splitlines() == [
            f"error: {bad}: '{key}' {why}; not a checkpoint to continue training from"], res.stderr
    res = run_script(*_args(dataset, out))
    assert res.returncode == 0, res.stderr[-2000:]
    skipped = [line for line in res.stdout.splitlines() if "skipping unusable checkpoint" in line]
    assert len(skipped) == 2 and "'epoch' is 'abc'" in skipped[0] and "'meters' meter 'loss'" in skipped[1]
    assert "checkpoint-0.pd" in res.stdout.split("Auto-resume from")[1].splitlines()[0]
    assert _epochs(out) == [0, 1, 2]


@pytest.mark.slow
def test_full_disk_and_log_folder_stop_with_one_line(dataset, tmp_path):
    """A real full file system (a tmpfs filled up) at the epoch's log line: one line, exit 1, no checkpoint
    half-written; once space is freed the same command finishes the run. log.txt a folder: one line at start."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespaces here")
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    logs.mkdir()
    argv = shlex.join(_args(dataset, str(out), "--epochs", "1", "--model", "mae_vit_micro_patch4",
                            "--input_size", "28", "--batch_size", "1"))
    run = lambda name: (f"{sys.executable} {argv} > {logs}/{name}.out 2> {logs}/{name}.err; "  # noqa: E731
                        f"echo $? > {logs}/{name}.rc; ")
    fill = lambda name: f"(dd if=/dev/zero of={out}/{name} bs=4k 2>/dev/null; true); "  # noqa: E731
    script = (f"mount -t tmpfs -o size=64m tmpfs {out} || exit; "  # the disk fills up inside epoch 0
              f"({sys.executable} {argv} > {logs}/full.out 2> {logs}/full.err; echo $? > {logs}/full.rc) & "
              f"until grep -q 'Epoch: \\[0\\]' {logs}/full.out 2>/dev/null; do sleep 0.05; done; "
              + fill("a") + "wait; " + fill("b") + run("start") + f"rm {out}/a {out}/b; " + run("again")
              + f"ls {out} > {logs}/files")
    subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, timeout=300)
    read = lambda name: open(logs / name).read()  # noqa: E731
    assert read("full.rc").strip() == "1", read("full.err")[-2000:]
    assert read("full.err").strip().splitlines() == [
        f"error: {out}/log.txt: cannot append the epoch's log line (No space left on device); the checkpoints of "
        "the epochs before are intact, rerun to continue"]
    assert read("start.rc").strip() == "1" and read("start.err").strip().splitlines() == [
        f"error: --output_dir {out}: cannot write there (No space left on device)"], read("start.err")[-2000:]
    assert read("again.rc").strip() == "0", read("again.err")[-2000:]
    assert "checkpoint-last.pd" in read("files") and "log.txt" in read("files")
    folder = tmp_path / "folder_log"
    (folder / "log.txt").mkdir(parents=True)
    res = run_script(*_args(dataset, str(folder)))
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        f"error: {folder / 'log.txt'}: exists and is not a file"]


def test_stop_signal_before_the_per_rank_print():
    """A SLURM job's preemption signal can come during the rendezvous, before print takes force=True."""
    code = ("import os, signal; from util.preempt import STOP; STOP.install(); os.kill(os.getpid(), signal.SIGTERM); "
            "print('flag', STOP.local_flag())")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines()[-2:] == ["Received SIGTERM: stopping after this iteration", "flag 1.0"]


@pytest.mark.slow
def test_stop_signal_during_start_up_saves_and_rerun_completes(dataset, tmp_path):
    """SIGTERM while the model and data are being set up: the run stops after its first step, saves, exits 0."""
    out = str(tmp_path / "out")
    proc = _start(_args(dataset, out))
    for line in proc.stdout:
        if line.startswith("[") and "job dir:" in line:
            break
    proc.send_signal(signal.SIGTERM)
    output, errors = proc.communicate(timeout=120)
    assert proc.returncode == 0, errors[-2000:]
    assert "Received SIGTERM" in output and re.search(r"Stopped (in|after) epoch 0", output), output[-2000:]
    res = run_script(*_args(dataset, out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert _epochs(out) == [0, 1, 2]


def _bad_dataset(root):
    make_image_folder(root, classes=2, per_class=6)
    folder = os.path.join(root, "train", "class_1")
    good = Image.open(os.path.join(folder, "img_0.png")).convert("RGB")
    good.convert("CMYK").save(os.path.join(folder, "cmyk.jpg"))
    good.convert("P").save(os.path.join(folder, "palette.png"))
    good.convert("RGBA").save(os.path.join(folder, "rgba.png"))
    Image.fromarray(np.asarray(good.convert("L"), np.uint16) * 257).save(os.path.join(folder, "deep.png"))
    good.save(os.path.join(folder, "full.jpg"))
    data = open(os.path.join(folder, "full.jpg"), "rb").read()
    bad = {"truncated.jpg": data[: len(data) // 2], "empty.png": b"", "text.png": b"not an image",
           "junk.jpg": data[:20] + b"\x00" * 200}  # a JPEG header, then nothing libjpeg can decode
    for name, content in bad.items():
        open(os.path.join(folder, name), "wb").write(content)
    return [os.path.join(folder, n) for n in bad]


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_bad_files_fail_fast_or_are_skipped(tmp_path, workers):
    root = str(tmp_path / "d")
    bad = _bad_dataset(root)
    args = _args(root, str(tmp_path / "o"), "--epochs", "1", "--num_workers", workers)
    start = time.time()
    res = run_script(*args, timeout=120)
    assert res.returncode == 1 and time.time() - start < 60
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and any(b in last for b in bad), last
    res = run_script(*args[:-4], "--num_workers", workers, "--skip_bad_images", "--output_dir",
                     str(tmp_path / "o2"), timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"Skipped {len(bad)} unreadable image(s) in epoch 0" in res.stdout
    assert sum("skipping unreadable image" in line for line in res.stdout.splitlines()) == len(bad)


def test_non_finite_loss_names_epoch_and_iteration():
    import argparse
    from engine_pretrain import train_one_epoch

    class Exploding(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.w = self.create_parameter([1])

        def forward(self, x, mask_ratio, noise=None):  # models_mae.MaskedAutoencoderViT.forward
            return self.w.sum() * float("nan"), None, None

    model = Exploding()
    opt = paddle.optimizer.AdamW(parameters=model.parameters())
    args = argparse.Namespace(accum_iter=1, lr=1e-3, min_lr=0.0, warmup_epochs=1, epochs=2, mask_ratio=0.75,
                              print_freq=10, device="cpu", no_amp=True, amp_dtype="float16", log_dir="", seed=0,
                              on_nonfinite="stop")
    with pytest.raises(NonFiniteError, match="Loss is nan at epoch 3, iteration 0"):
        train_one_epoch(model, [(paddle.zeros([2, 3, 4, 4]), None)], opt, 3, NativeScalerWithGradNormCount(False),
                        args=args)


@pytest.mark.parametrize("script,flags,message", [
    ("main_finetune.py", ["--eval"], "--eval needs --resume"),
    ("main_linprobe.py", ["--eval"], "--eval needs --resume"),
    ("main_pretrain.py", ["--accum_iter", "0"], "--accum_iter: must be >= 1"),
    ("main_finetune.py", ["--model", "vit_tiny_patch4", "--input_size", "50"], "not divisible by patch_size"),
    ("main_pretrain.py", ["--epochs", "5", "--warmup_epochs", "10"], "--warmup_epochs 10 is larger than --epochs 5"),
])
def test_bad_flag_combinations(script, flags, message):
    res = run_script(script, *flags)
    assert res.returncode == 2 and message in res.stderr.strip().splitlines()[-1], res.stderr


def test_dist_eval_in_one_process(tmp_path):
    root = make_image_folder(str(tmp_path / "d"), classes=2, per_class=2)
    make_image_folder(root, classes=2, per_class=2, split="val")
    res = run_script("main_finetune.py", "--model", "vit_micro_patch4", "--dist_eval", "--data_path", root,
                     "--nb_classes", "2", "--device", "cpu", "--output_dir", "")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: --dist_eval")


@pytest.fixture(scope="module")
def classes(tmp_path_factory):
    return make_train_val(str(tmp_path_factory.mktemp("cls")), 2, 4, 2)


def _classification(script, data, out, *extra):
    return [script, "--model", "vit_micro_patch4", "--nb_classes", "2", "--data_path", data, "--output_dir", out,
            "--log_dir", "", "--device", "cpu", "--num_workers", "0", "--batch_size", "4", "--warmup_epochs", "0",
            *extra]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["main_pretrain.py", "main_finetune.py", "main_linprobe.py"])
def test_rerunning_a_finished_run_has_nothing_to_do(classes, tmp_path, script):
    out = str(tmp_path / "out")
    argv = (_args(classes, out, "--epochs", "1", "--warmup_epochs", "0") if script == "main_pretrain.py"
            else _classification(script, classes, out, "--epochs", "1"))
    first = run_script(*argv)
    assert first.returncode == 0, first.stderr[-2000:]
    log = open(os.path.join(out, "log.txt")).read()
    again = run_script(*argv)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert again.stdout.strip().splitlines()[-1].endswith(f"nothing to do: 1 of 1 epochs done in {out}")
    assert open(os.path.join(out, "log.txt")).read() == log


@pytest.mark.slow
def test_best_checkpoint_is_the_best_of_the_whole_run(classes, tmp_path):
    """After a resume a worse epoch never replaces checkpoint-best.pd: the best so far travels in the checkpoint.
    Epoch 0's recorded best is raised to 100% so that epoch 1 is certainly worse."""
    out = str(tmp_path / "out")
    first = run_script(*_classification("main_finetune.py", classes, out, "--epochs", "1"))
    assert first.returncode == 0, first.stderr[-2000:]
    last = os.path.join(out, "checkpoint-last.pd")
    ckpt, _ = load_file(last)
    assert ckpt["best"]["epoch"] == 0
    ckpt["best"] = {"acc1": 100.0, "epoch": 0}
    save_file(ckpt, last)
    best = open(os.path.join(out, "checkpoint-best.pd"), "rb").read()
    second = run_script(*_classification("main_finetune.py", classes, out, "--epochs", "2"))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Max accuracy: 100.00% (epoch 0)" in second.stdout
    assert open(os.path.join(out, "checkpoint-best.pd"), "rb").read() == best
    assert load_file(os.path.join(out, "checkpoint-1.pd"))[0]["best"] == {"acc1": 100.0, "epoch": 0}
