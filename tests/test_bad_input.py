"""Bad input tried as a user (or an attacker) would: every case ends with a one-line error that names the
file, flag or key, the right exit code, no traceback and no hang, and leaves earlier outputs intact; the
cases that used to give a silently wrong result now stop or warn."""
import hashlib
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, golden
from data import make_train_val
from helpers import run_script
from torch_format import Forged, save_pth
from util.checkpoint import load_checkpoint, save_file

CAT = os.path.join(ROOT, "demo", "chelsea.png")
VIT = golden("vit_tiny_gp.pth")
FLAGS = ["--device", "cpu", "--num_workers", "0", "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0",
         "--log_dir", ""]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_train_val(str(tmp_path_factory.mktemp("data")), 3, 4, 2)


def digest(folder):
    """Every file under folder with its content hash: what a failed run must leave unchanged."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(dirpath, n)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def assert_one_line_error(out, code, *names, started=None):
    text = out.stdout + out.stderr
    assert out.returncode == code, (out.returncode, text[-3000:])
    assert "Traceback" not in text and "ccache" not in text, text[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    for name in names:
        assert name in last, (name, last)
    if started is not None:
        assert time.time() - started < 120


@pytest.mark.parametrize("view", [
    (0, (200000000,), (1,)),  # more elements than the storage holds
    (0, (4,), (-1000000000,)),  # a huge negative stride
    (3, (2, 2), (2, 1)),  # the offset pushes the view past the end
    (0, (2, 3), (1,)),  # size and stride of different lengths
])
@pytest.mark.parametrize("command", ["convert", "infer"])
def test_forged_tensor_record_never_crashes_the_reader(tmp_path, view, command):
    src, dst = str(tmp_path / "x.pth"), str(tmp_path / "y.pd")
    state = {k: v for k, v in load_checkpoint(VIT)["model"].items()}
    save_pth({"model": {"cls_token": Forged(np.zeros(4, np.float32), *view), **{
        k: np.ascontiguousarray(v.T if v.ndim == 2 and k.endswith(".weight") else v)
        for k, v in state.items() if k != "cls_token"}}}, src)
    started = time.time()
    if command == "convert":
        out = run_script("-m", "util.convert_weights", src, dst)
    else:
        out = run_script("main_infer.py", "--model", "vit_micro_patch4", "--resume", src, "--img_path", CAT)
    assert out.returncode > 0  # not killed by a signal
    assert_one_line_error(out, 1, src, started=started)
    assert not os.path.exists(dst)


@pytest.mark.parametrize("change,named", [
    (lambda val: shutil.rmtree(os.path.join(val, "class_2")), "missing class_2"),
    (lambda val: shutil.copytree(os.path.join(val, "class_1"), os.path.join(val, "class_9")), "extra class_9"),
    (lambda val: os.rename(os.path.join(val, "class_0"), os.path.join(val, "class_zero")),
     "missing class_0; extra class_zero"),
])
@pytest.mark.parametrize("script", ["main_finetune.py", "main_linprobe.py"])
def test_val_classes_must_match_train(data, tmp_path, change, named, script):
    root = str(tmp_path / "d")
    shutil.copytree(data, root)
    change(os.path.join(root, "val"))
    out = run_script(script, "--model", "vit_micro_patch4", "--nb_classes", "10", "--data_path", root,
                     "--output_dir", str(tmp_path / "o"), *FLAGS)
    assert_one_line_error(out, 1, os.path.join(root, "val"), named)


def test_eval_with_shifted_classes_stops(data, tmp_path):
    root = str(tmp_path / "d")
    shutil.copytree(data, root)
    shutil.rmtree(os.path.join(root, "val", "class_0"))
    out = run_script("main_finetune.py", "--model", "vit_micro_patch4", "--nb_classes", "10", "--eval",
                     "--resume", VIT, "--data_path", root, "--output_dir", "", *FLAGS)
    assert_one_line_error(out, 1, "missing class_0")


def test_symlinks_into_the_dataset_are_not_followed_twice(data, tmp_path):
    root = str(tmp_path / "d")
    shutil.copytree(data, root)
    os.symlink("..", os.path.join(root, "train", "class_1", "loop"))
    os.symlink("../class_2", os.path.join(root, "train", "class_1", "other"))
    os.mkfifo(os.path.join(root, "train", "class_1", "pipe.png"))
    out = run_script("main_pretrain.py", "--model", "mae_vit_tiny_patch4", "--data_path", root,
                     "--output_dir", str(tmp_path / "o"), *FLAGS, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Dataset: 12 images" in out.stdout
    for name in ("loop", "other", "pipe.png"):
        assert f"Warning: skipping {os.path.join(root, 'train', 'class_1', name)}" in out.stdout


def test_one_run_per_output_dir(data, tmp_path):
    out_dir = str(tmp_path / "o")
    args = ["main_pretrain.py", "--model", "mae_vit_tiny_patch4", "--data_path", data, "--output_dir", out_dir, *FLAGS]
    first = run_script(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    before = digest(out_dir)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from util import run_dir; "
                               f"run_dir.lock({out_dir!r}); print('locked', flush=True); time.sleep(120)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = run_script(*args, "--epochs", "2")
        assert_one_line_error(second, 1, f"--output_dir {out_dir}", f"pid {holder.pid}")
        assert {k: v for k, v in digest(out_dir).items() if k != ".lock"} == \
            {k: v for k, v in before.items() if k != ".lock"}
    finally:
        holder.kill()
        holder.wait()
    third = run_script(*args, "--epochs", "2")  # the killed holder left no stuck lock
    assert third.returncode == 0, third.stderr[-2000:]


def test_convert_weights_refuses_to_overwrite_its_source(tmp_path):
    path = str(tmp_path / "ckpt.pd")
    save_file({"model": load_checkpoint(VIT)["model"], "optimizer": {}, "epoch": 3}, path)
    before = open(path, "rb").read()
    out = run_script("-m", "util.convert_weights", path, path)
    assert_one_line_error(out, 2, path)
    assert open(path, "rb").read() == before


def test_accum_iter_beyond_an_epoch(data, tmp_path):
    out = run_script("main_pretrain.py", "--model", "mae_vit_tiny_patch4", "--data_path", data, "--output_dir",
                     str(tmp_path / "o"), *FLAGS, "--accum_iter", "4")  # 12 images / 4 = 3 iterations
    assert_one_line_error(out, 1, "--accum_iter 4", "never step")


@pytest.mark.parametrize("script,flags,named", [
    ("main_pretrain.py", ["--model", "mae_vit_tiny_patch4", "--mask_ratio", "0.999"], "--mask_ratio"),
    ("main_pretrain.py", ["--model", "mae_vit_tiny_patch4", "--input_size", "4"], "--mask_ratio"),
    ("main_finetune.py", ["--model", "vit_micro_patch4", "--drop_path", "1.5"], "--drop_path"),
    ("main_finetune.py", ["--model", "vit_micro_patch4", "--reprob", "2"], "--reprob"),
    ("main_finetune.py", ["--model", "vit_micro_patch4", "--smoothing", "1.5"], "--smoothing"),
    ("main_finetune.py", ["--model", "vit_micro_patch4", "--aa", "garbage-xyz"], "--aa"),
    ("main_finetune.py", ["--model", "vit_micro_patch4", "--cutmix_minmax", "0.9", "0.1"], "--cutmix_minmax"),
    ("main_finetune.py", ["--model", "vit_micro_patch4", "--mixup_prob", "1.5"], "--mixup_prob"),
    ("main_linprobe.py", ["--model", "vit_micro_patch4", "--batch_size", "1"], "--batch_size"),
    ("benchmark.py", ["--job", "pretrain", "--mask_ratio", "1"], "--mask_ratio"),
])
def test_flag_values_out_of_range(script, flags, named):
    out = run_script(script, *flags)
    assert_one_line_error(out, 2, named)


@pytest.mark.parametrize("command", ["infer", "eval"])
def test_non_finite_weights_are_refused(data, tmp_path, command):
    path = str(tmp_path / "nan.pd")
    state = dict(load_checkpoint(VIT)["model"])
    state["blocks.1.mlp.fc2.weight"] = state["blocks.1.mlp.fc2.weight"].copy()
    state["blocks.1.mlp.fc2.weight"][3, 5] = np.nan
    save_file({"model": state}, path)
    if command == "infer":
        out = run_script("main_infer.py", "--model", "vit_micro_patch4", "--resume", path, "--img_path", CAT)
    else:
        out = run_script("main_finetune.py", "--model", "vit_micro_patch4", "--nb_classes", "10", "--eval", "--resume",
                         path, "--data_path", data, "--output_dir", "", *FLAGS)
    assert_one_line_error(out, 1, path, "blocks.1.mlp.fc2.weight")
