"""Bad input tried as a user (or an attacker) would: every case ends with a one-line error that names the
file, flag or key, the right exit code, no traceback and no hang, and leaves earlier outputs intact; inputs
that would give a silently wrong result stop or warn."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, golden
from data import make_train_val
from helpers import parse_flags, run_script
from torch_format import Forged, save_pth
from util.weights import load_checkpoint, save_file

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


def test_a_classifier_meets_only_the_classes_it_was_trained_on(data, tmp_path):
    """A checkpoint that records its training classes refuses class folders of other names (its label i would
    be scored as, or trained towards, another class): --eval, --resume, the auto-resume of its run and
    main_infer --data_path. The official .pth files record none and are taken as they are."""
    run_dir = str(tmp_path / "run")
    common = ["--model", "vit_micro_patch4", "--nb_classes", "3", *FLAGS]
    out = run_script("main_finetune.py", "--finetune", VIT, "--data_path", data, "--output_dir", run_dir, *common)
    assert out.returncode == 0, out.stderr[-2000:]
    ckpt = os.path.join(run_dir, "checkpoint-last.pd")
    other = str(tmp_path / "other")
    shutil.copytree(data, other)
    for split in ("train", "val"):
        os.rename(os.path.join(other, split, "class_2"), os.path.join(other, split, "class_x"))
    before = {k: v for k, v in digest(run_dir).items() if k != ".lock"}  # the lock records its holder
    for flags in (["--eval", "--resume", ckpt, "--output_dir", ""],
                  ["--resume", ckpt, "--output_dir", str(tmp_path / "new")],
                  ["--output_dir", run_dir, "--epochs", "2"]):  # its run continued (auto-resume)
        out = run_script("main_finetune.py", "--data_path", other, *common, *flags)
        assert_one_line_error(out, 1, ckpt, f"class folders of {other}{os.sep}",
                              "missing class_2; extra class_x")
    assert {k: v for k, v in digest(run_dir).items() if k != ".lock"} == before
    assert not os.path.exists(tmp_path / "new" / "checkpoint-0.pd")
    out = run_script("main_infer.py", "--model", "vit_micro_patch4", "--resume", ckpt, "--img_path", CAT,
                     "--data_path", other)
    assert_one_line_error(out, 1, os.path.join(other, "train"), "missing class_2; extra class_x")
    for script, flags in (("main_finetune.py", ["--eval", "--resume", ckpt, "--output_dir", "", *common]),
                          ("main_infer.py", ["--model", "vit_micro_patch4", "--resume", ckpt, "--img_path", CAT])):
        out = run_script(script, "--data_path", data, *flags)  # the classes it was trained on
        assert out.returncode == 0, out.stderr[-2000:]
    out = run_script("main_finetune.py", "--eval", "--resume", VIT, "--output_dir", "", "--data_path", other,
                     *common, "--nb_classes", "10")
    assert out.returncode == 0, out.stderr[-2000:]


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


def test_class_folders_that_link_into_the_dataset_are_skipped(data, tmp_path):
    """A class folder linked to another class (or to the split, or around it) is not an extra class, in
    train/ and val/; a class folder linked from outside the dataset is one."""
    from util.datasets import ImageFolder
    root = str(tmp_path / "d")
    shutil.copytree(data, root)
    outside = tmp_path / "elsewhere"
    shutil.copytree(os.path.join(data, "train", "class_0"), outside)
    for split in ("train", "val"):
        folder = os.path.join(root, split)
        os.symlink(os.path.join(folder, "class_0"), os.path.join(folder, "z_link_to_class_0"))
        os.symlink(folder, os.path.join(folder, "z_link_to_split"))
        os.symlink(os.path.dirname(folder), os.path.join(folder, "z_link_around"))
    os.symlink(outside, os.path.join(root, "train", "class_9_linked"))
    assert ImageFolder(os.path.join(root, "train")).classes == sorted(os.listdir(os.path.join(data, "train"))) + [
        "class_9_linked"]
    os.remove(os.path.join(root, "train", "class_9_linked"))
    out = run_script("main_finetune.py", "--model", "vit_micro_patch4", "--nb_classes", "10", "--data_path", root,
                     "--output_dir", str(tmp_path / "o"), *FLAGS, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for split in ("train", "val"):
        for name in ("z_link_to_class_0", "z_link_to_split", "z_link_around"):
            assert f"Warning: skipping class folder {os.path.join(root, split, name)}" in out.stdout
    ckpt = load_checkpoint(os.path.join(str(tmp_path / "o"), "checkpoint-last.pd"))
    assert ckpt["classes"] == sorted(os.listdir(os.path.join(data, "train")))


def test_start_epoch_beyond_the_run_is_a_flag_error(data, tmp_path):
    out = run_script("main_pretrain.py", "--model", "mae_vit_tiny_patch4", "--data_path", data, "--output_dir",
                     str(tmp_path / "o"), *FLAGS, "--start_epoch", "5")
    assert_one_line_error(out, 2, "--start_epoch 5", "--epochs 1")
    assert not os.path.exists(tmp_path / "o" / "log.txt")


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


def test_a_position_beyond_the_epoch_is_refused(data, tmp_path):
    """A checkpoint stopped at an iteration the epoch does not have (another dataset or batch size, or a
    damaged file): one line naming it, the checkpoint and log untouched."""
    out = str(tmp_path / "o")
    args = ["main_pretrain.py", "--model", "mae_vit_tiny_patch4", "--data_path", data, "--output_dir", out, *FLAGS]
    assert run_script(*args).returncode == 0
    last = os.path.join(out, "checkpoint-last.pd")
    ckpt = load_checkpoint(last)
    for iteration in (3, 1000):  # 12 images / batch 4: iterations 0-2
        save_file({**ckpt, "epoch": -1, "iteration": iteration}, last)
        before = digest(out)
        res = run_script(*args, "--epochs", "2")
        assert_one_line_error(res, 1, last, f"iteration {iteration}", "3 iterations")
        assert {k: v for k, v in digest(out).items() if k != ".lock"} == \
            {k: v for k, v in before.items() if k != ".lock"}  # .lock holds the pid of the run that has it


def test_knn_subset_larger_than_a_class(data, tmp_path):
    res = run_script("main_pretrain.py", "--model", "mae_vit_tiny_patch4", "--data_path", data, "--output_dir",
                     str(tmp_path / "o"), *FLAGS, "--knn_freq", "1", "--knn_train_per_class", "5")
    assert_one_line_error(res, 1, "--knn_train_per_class 5", os.path.join(data, "train", "class_0"), "holds 4")


@pytest.mark.parametrize("script,flags,named", [
    ("main_pretrain.py", ["--model", "mae_vit_tiny_patch4", "--mask_ratio", "0.999"], "--mask_ratio"),
    ("main_pretrain.py", ["--model", "mae_vit_tiny_patch4", "--input_size", "4"], "--mask_ratio"),
    ("main_finetune.py", ["--model", "vit_micro_patch4", "--drop_path", "1.5"], "--drop_path"),
    ("main_finetune.py", ["--model", "vit_micro_patch4", "--reprob", "2"], "--reprob"),
    ("main_finetune.py", ["--model", "vit_micro_patch4", "--smoothing", "1.5"], "--smoothing"),
    ("main_finetune.py", ["--model", "vit_micro_patch4", "--aa", "garbage-xyz"], "--aa"),
    ("main_finetune.py", ["--model", "vit_micro_patch4", "--cutmix_minmax", "0.9", "0.1"], "--cutmix_minmax"),
    ("main_finetune.py", ["--model", "vit_micro_patch4", "--mixup_prob", "1.5"], "--mixup_prob"),
    ("main_finetune.py", ["--model", "vit_micro_patch4", "--input_size", "28", "--cutmix_minmax", "0.5", "0.51"],
     "--cutmix_minmax"),
    ("main_finetune.py", ["--model", "vit_micro_patch4", "--input_size", "8", "--cutmix_minmax", "0.1", "0.12"],
     "--cutmix_minmax"),
    ("main_finetune.py", ["--model", "vit_micro_patch4", "--mixup", "inf"], "--mixup"),
    ("main_finetune.py", ["--model", "vit_micro_patch4", "--clip_grad", "inf"], "--clip_grad"),
    ("main_finetune.py", ["--model", "vit_micro_patch4", "--layer_decay", "1e999"], "--layer_decay"),
    ("main_linprobe.py", ["--model", "vit_micro_patch4", "--lr", "inf"], "--lr"),
    ("main_pretrain.py", ["--model", "mae_vit_tiny_patch4", "--weight_decay", "inf"], "--weight_decay"),
    ("main_pretrain.py", ["--model", "mae_vit_tiny_patch4", "--knn_t", "inf"], "--knn_t"),
    ("main_pretrain.py", ["--model", "mae_vit_tiny_patch4", "--knn_t", "0"], "--knn_t"),
    ("main_linprobe.py", ["--model", "vit_micro_patch4", "--batch_size", "1"], "--batch_size"),
    ("main_linprobe.py", ["--model", "vit_micro_patch4", "--recompute"], "--recompute"),
    ("benchmark.py", ["--job", "pretrain", "--mask_ratio", "1"], "--mask_ratio"),
    ("main_pretrain.py", ["--model", "mae_vit_tiny_patch4", "--on_nonfinite", "rewind", "--output_dir", ""],
     "--on_nonfinite rewind"),
    ("main_finetune.py", ["--model", "vit_micro_patch4", "--on_nonfinite", "skip"], "--on_nonfinite"),
    ("main_linprobe.py", ["--model", "vit_micro_patch4", "--max_rewinds", "-1"], "--max_rewinds"),
])
def test_flag_values_out_of_range(script, flags, named):
    out = parse_flags(script, *flags) if script.startswith("main_") else run_script(script, *flags)
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


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A small PNG that claims 20000 x 20000 pixels (Pillow's decompression-bomb guard refuses it)."""
    from PIL import Image
    path = str(tmp_path_factory.mktemp("bomb") / "bomb.png")
    Image.new("L", (20000, 20000)).save(path, optimize=True)
    assert os.path.getsize(path) < 2 ** 20
    return path


@pytest.mark.parametrize("command", ["infer", "visualize", "pretrain", "pretrain_workers", "benchmark"])
def test_decompression_bomb_names_the_file(data, tmp_path, bomb, command):
    root = str(tmp_path / "d")
    shutil.copytree(data, root)
    target = os.path.join(root, "train", "class_1", "bomb.png")
    shutil.copy(bomb, target)
    if command == "infer":
        out = run_script("main_infer.py", "--model", "vit_micro_patch4", "--resume", VIT, "--img_path", target)
    elif command == "visualize":
        out = run_script("main_visualize.py", "--model", "mae_vit_micro_patch4", "--resume", golden("mae_tiny.pth"),
                         "--img_path", target, "--output", str(tmp_path / "r.png"))
    elif command == "benchmark":
        out = run_script("benchmark.py", "--job", "data", "--data_path", root, "--batch_size", "13", "--iters", "1",
                         "--input_size", "32")  # one batch of all 13 images
    else:
        workers = "2" if command == "pretrain_workers" else "0"
        out = run_script("main_pretrain.py", "--model", "mae_vit_tiny_patch4", "--data_path", root, "--output_dir",
                         str(tmp_path / "o"), *FLAGS, "--num_workers", workers)
    assert_one_line_error(out, 1, target, "DecompressionBomb")


def test_decompression_bomb_is_skipped_with_skip_bad_images(data, tmp_path, bomb):
    root = str(tmp_path / "d")
    shutil.copytree(data, root)
    shutil.copy(bomb, os.path.join(root, "train", "class_1", "bomb.png"))
    out = run_script("main_pretrain.py", "--model", "mae_vit_tiny_patch4", "--data_path", root, "--output_dir",
                     str(tmp_path / "o"), *FLAGS, "--skip_bad_images")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "skipping unreadable image" in out.stdout and "Skipped 1 unreadable image(s) in epoch 0" in out.stdout


def _read_only(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_unwritable_output_dir_as_non_root(data, tmp_path):
    out = run_script("main_pretrain.py", "--model", "mae_vit_tiny_patch4", "--data_path", data,
                     "--output_dir", os.path.join(_read_only(tmp_path), "out"), *FLAGS)
    assert_one_line_error(out, 1, "--output_dir")


@pytest.mark.parametrize("flag", ["--output_dir", "--log_dir"])
def test_output_paths_that_cannot_be_folders(data, tmp_path, flag):
    a_file = str(tmp_path / "a_file")
    open(a_file, "w").write("x")
    argv = ["main_pretrain.py", "--model", "mae_vit_tiny_patch4", "--data_path", data, "--output_dir",
            str(tmp_path / "o"), *FLAGS, flag, a_file]
    for path in (a_file, os.path.join(a_file, "below")):
        argv[-1] = path
        started = time.time()
        out = run_script(*argv)
        assert_one_line_error(out, 1, flag, started=started)
        assert "Start training" not in out.stdout


def test_visualize_output_is_a_folder(tmp_path):
    out = run_script("main_visualize.py", "--model", "mae_vit_micro_patch4", "--resume", golden("mae_tiny.pth"),
                     "--img_path", CAT, "--output", str(tmp_path))
    assert_one_line_error(out, 1, "--output", str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_half_written_log_line_is_dropped_on_resume(data, tmp_path):
    out_dir = str(tmp_path / "o")
    argv = ["main_pretrain.py", "--model", "mae_vit_tiny_patch4", "--data_path", data, "--output_dir", out_dir, *FLAGS]
    assert run_script(*argv).returncode == 0
    with open(os.path.join(out_dir, "log.txt"), "a") as f:
        f.write('{"train_lr": 0.0001, "train_lo')
    out = run_script(*argv, "--epochs", "2")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "dropping line 2, not a complete log record" in out.stdout
    lines = open(os.path.join(out_dir, "log.txt")).read().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]


def _with_dtype(tmp_path, name, dtype, key=None):
    state = dict(load_checkpoint(VIT)["model"])
    for k in state:
        if key is None or k == key:
            state[k] = state[k].astype(dtype)
    path = str(tmp_path / name)
    if name.endswith(".pth"):
        save_pth({"model": {k: np.ascontiguousarray(v.T if v.ndim == 2 and k.endswith(".weight") else v)
                            for k, v in state.items()}}, path)
    else:
        save_file({"model": state}, path)
    return path


@pytest.mark.parametrize("name", ["half.pd", "half.pth"])
def test_float16_weights_are_cast_and_said(tmp_path, name):
    path = _with_dtype(tmp_path, name, np.float16)
    out = run_script("main_infer.py", "--model", "vit_micro_patch4", "--resume", path, "--img_path", CAT, "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "float16 weights cast to the model's float32" in out.stderr  # stdout holds the results only
    ref = run_script("main_infer.py", "--model", "vit_micro_patch4", "--resume", VIT, "--img_path", CAT, "--json")
    a, b = (json.loads(o.stdout) for o in (out, ref))
    assert a["topk_ids"] == b["topk_ids"] and np.allclose(a["topk_probs"], b["topk_probs"], atol=1e-2)


@pytest.mark.parametrize("command", ["infer", "finetune"])
def test_integer_weights_are_refused_naming_the_key(data, tmp_path, command):
    path = _with_dtype(tmp_path, "int.pd", np.int64, key="head.weight")
    if command == "infer":
        out = run_script("main_infer.py", "--model", "vit_micro_patch4", "--resume", path, "--img_path", CAT)
    else:
        out = run_script("main_finetune.py", "--model", "vit_micro_patch4", "--finetune", path, "--nb_classes", "10",
                         "--data_path", data, "--output_dir", str(tmp_path / "o"), *FLAGS)
    assert_one_line_error(out, 1, path, "head.weight (int64)")


@pytest.mark.parametrize("script,flags,named", [
    ("main_infer.py", ["--device", "gpu"], "--device"),
    ("main_infer.py", ["--device", "gpu:1"], "--device"),
    ("main_pretrain.py", ["--device", "cpu:7"], "--device"),
    ("main_infer.py", ["--input_size", "33"], "--input_size"),
    ("main_export.py", ["--input_size", "33", "--output", "x"], "--input_size"),
    ("main_visualize.py", ["--model", "mae_vit_tiny_patch4", "--input_size", "33"], "--input_size"),
    ("main_visualize.py", ["--model", "mae_vit_micro_patch4", "--scale", "100000"], "--scale"),
    ("main_visualize.py", ["--model", "mae_vit_micro_patch4", "--scale", "100000", "--img_path",
                           os.path.join(ROOT, "README.md")], "--scale"),  # refused before any image is decoded
    ("main_visualize.py", ["--model", "mae_vit_micro_patch4", "--mask_ratio", "0.999"], "--mask_ratio"),
    ("benchmark.py", ["--job", "infer", "--input_size", "33"], "--input_size"),
    ("main_pretrain.py", ["--input_size", "100000"], "--input_size"),
    ("benchmark.py", ["--job", "finetune", "--model", "vit_nope"], "--model"),
    ("benchmark.py", ["--job", "finetune", "--model", "mae_vit_base_patch16"], "--model"),
    ("benchmark.py", ["--job", "data"], "--data_path"),
    ("main_infer.py", ["--resume", "/nonexistent.pd"], "--resume"),
    ("main_finetune.py", ["--resume", "/nonexistent.pd", "--eval"], "--resume"),
    ("main_finetune.py", ["--finetune", "/nonexistent.pth"], "--finetune"),
    ("main_finetune.py", ["--resume", "/tmp", "--eval"], "is a folder"),
])
def test_more_flag_values_out_of_range(script, flags, named):
    needs = {"main_infer.py": ["--img_path", CAT, "--resume", VIT], "main_export.py": ["--resume", VIT],
             "main_visualize.py": ["--img_path", CAT, "--resume", golden("mae_tiny.pth")]}.get(script, [])
    training = script in ("main_pretrain.py", "main_finetune.py", "main_linprobe.py")
    out = parse_flags(script, *needs, *flags) if training else run_script(script, *needs, *flags)
    if "gpu" in flags[-1] and out.returncode != 2:
        pytest.skip("a CUDA build of Paddle")
    assert_one_line_error(out, 2, named)


def test_binary_class_names_file(tmp_path):
    names = tmp_path / "names.bin"
    names.write_bytes(bytes(range(256)) * 4)
    out = run_script("main_infer.py", "--model", "vit_micro_patch4", "--resume", VIT, "--img_path", CAT,
                     "--class_names", str(names))
    assert_one_line_error(out, 1, str(names))


def test_ignored_official_flags_say_so(data, tmp_path):
    out = run_script("main_pretrain.py", "--model", "mae_vit_tiny_patch4", "--data_path", data, "--output_dir",
                     str(tmp_path / "o"), *FLAGS, "--world_size", "8", "--dist_url", "tcp://x:1")
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--world_size", "--dist_url"):
        assert f"{flag} is accepted for compatibility with the official scripts and ignored" in out.stdout


@pytest.mark.parametrize("env,says", [
    ({"PADDLE_TRAINERS_NUM": "2"}, "PADDLE_TRAINERS_NUM=2 in the environment without PADDLE_TRAINER_ID and "
                                   "PADDLE_CURRENT_ENDPOINT"),
    ({"PADDLE_TRAINERS_NUM": "2", "PADDLE_TRAINER_ID": "2", "PADDLE_CURRENT_ENDPOINT": "127.0.0.1:1"},
     "PADDLE_TRAINERS_NUM=2 in the environment with PADDLE_TRAINER_ID='2'"),
    ({"PADDLE_TRAINERS_NUM": "two"}, "PADDLE_TRAINERS_NUM='two' in the environment is not a number of processes"),
])
@pytest.mark.parametrize("script", ["main_pretrain.py", "main_finetune.py"])
def test_stale_launch_environment_is_one_line(data, tmp_path, env, says, script):
    """Launcher variables left in a shell, without the launcher: one line, at once, no waiting for ranks."""
    res = run_script(script, "--data_path", data, "--output_dir", str(tmp_path), "--device", "cpu", env=env,
                     timeout=60)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]
    assert res.stderr.startswith(f"error: {says}")
