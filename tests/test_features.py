"""Features without masking: the weighted k-NN, the k-NN monitor of pre-training, main_extract.py."""
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

import models_mae
import models_vit
from conftest import ROOT, golden
from data import make_train_val
from helpers import run_script
from util.checkpoint import load_checkpoint, load_model_weights, load_pretrained
from util.cpu_layer import attach_cpu_paths
from util.datasets import ImageFolder, load_image
from util.features import encoder_features, extract, knn_top1, loaders_over
from util.transforms import eval_transform

VIT = golden("vit_tiny_gp.pth")  # an official-format global-pool classifier, vit_micro_patch4 at 32 px


def numpy_knn(train, train_y, test, test_y, classes, k, t):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    correct = 0
    for row, label in zip(test @ train.T, test_y):
        near = np.argsort(-row, kind="stable")[:k]
        scores = np.zeros(classes)
        for j in near:
            scores[train_y[j]] += np.exp(row[j] / t)
        correct += scores.argmax() == label
    return 100.0 * correct / len(test_y)


def test_weighted_knn_equals_numpy():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    train_y, test_y = rng.integers(0, 4, 300), rng.integers(0, 4, 120)
    train = (centres[train_y] + 1.5 * rng.normal(size=(300, 16))).astype(np.float32)
    test = (centres[test_y] + 1.5 * rng.normal(size=(120, 16))).astype(np.float32)
    for k, t in ((1, 0.07), (20, 0.07), (50, 0.5)):
        got = knn_top1(train, train_y, test, test_y, 4, k, t, chunk=17)
        assert got == pytest.approx(numpy_knn(train, train_y, test, test_y, 4, k, t), abs=1e-9)
        assert 30 < got < 100


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_train_val(str(tmp_path_factory.mktemp("feat")), 3, 10, 4)


def _features_by_hand(model, folder, pool):
    tf = eval_transform(model.patch_embed.img_size[0])
    samples = ImageFolder(folder).samples if os.path.isdir(os.path.join(folder, os.listdir(folder)[0])) else \
        [(os.path.join(folder, f), -1) for f in sorted(os.listdir(folder))]
    x = tf.batch(np.stack([tf(load_image(p)) for p, _ in samples]))
    with paddle.no_grad():
        return encoder_features(model, x, pool).numpy(), samples


@pytest.mark.slow
def test_extract_class_folders_flat_folders_and_two_processes(data, tmp_path):
    out = str(tmp_path / "val.npz")
    res = run_script("main_extract.py", "--model", "vit_micro_patch4", "--finetune", VIT, "--data_path",
                     os.path.join(data, "val"), "--output", out, "--batch_size", "5", "--device", "cpu")
    assert res.returncode == 0, res.stderr[-2000:]
    got = np.load(out)
    model = models_vit.vit_micro_patch4(num_classes=10, global_pool=True)
    load_model_weights(model, load_checkpoint(VIT)["model"], VIT)
    model.eval()
    ref, samples = _features_by_hand(model, os.path.join(data, "val"), "avg")
    assert got["features"].dtype == np.float32 and got["features"].shape == (12, 64)
    assert np.allclose(got["features"], ref, atol=1e-5)
    assert got["labels"].tolist() == [t for _, t in samples] and got["paths"].tolist() == [p for p, _ in samples]
    assert got["class_names"].tolist() == ["class_0", "class_1", "class_2"]
    flat = tmp_path / "flat"
    flat.mkdir()
    for p, _ in samples[:5]:
        os.link(p, flat / os.path.basename(p).replace(".png", f"_{len(os.listdir(flat))}.png"))
    res = run_script("main_extract.py", "--model", "vit_micro_patch4", "--finetune", VIT, "--data_path", str(flat),
                     "--output", str(tmp_path / "flat.npz"), "--device", "cpu")
    assert res.returncode == 0, res.stderr[-2000:]
    flat_got = np.load(tmp_path / "flat.npz")
    assert flat_got["labels"].tolist() == [-1] * 5 and flat_got["class_names"].tolist() == []
    assert np.allclose(flat_got["features"], _features_by_hand(model, str(flat), "avg")[0], atol=1e-5)
    logs = str(tmp_path / "logs")
    two = str(tmp_path / "two.npz")
    res = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                          logs, "main_extract.py", "--model", "vit_micro_patch4", "--finetune", VIT, "--data_path",
                          os.path.join(data, "val"), "--output", two, "--batch_size", "4", "--device", "cpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, open(os.path.join(logs, "workerlog.0")).read()[-3000:]
    assert np.allclose(np.load(two)["features"], got["features"], atol=1e-5)
    assert np.load(two)["paths"].tolist() == got["paths"].tolist()


def test_extract_bad_input(data, tmp_path):
    args = ["main_extract.py", "--model", "vit_micro_patch4", "--finetune", VIT, "--device", "cpu"]
    res = run_script(*args, "--data_path", os.path.join(data, "val"), "--output", str(tmp_path / "f.txt"))
    assert res.returncode == 2 and "argument --output" in res.stderr
    res = run_script(*args, "--data_path", str(tmp_path / "none"), "--output", str(tmp_path / "f.npz"))
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [f"error: {tmp_path / 'none'}: folder not found"]
    res = run_script(*args, "--data_path", os.path.join(data, "val"), "--output", str(tmp_path / "f.npz"),
                     "--pool", "cls")  # a global-pool classifier has no final norm for the class token
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1 and "norm.weight" in res.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = run_script(*args, "--data_path", os.path.join(data, "val"), "--output", str(blocker / "f.npz"))
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1 and "--output" in res.stderr


@pytest.mark.slow
def test_knn_monitor_in_pre_training(tmp_path):
    """knn_acc1 in the log lines of the due epochs and in VisualDL, equal to a NumPy k-NN on the features of
    the saved encoder, and above the untrained encoder's."""
    data = os.path.join(ROOT, "demo", "fashion_mnist_small")
    out = str(tmp_path / "out")
    res = run_script("main_pretrain.py", "--model", "mae_vit_micro_patch4", "--input_size", "28", "--device", "cpu",
                     "--num_workers", "2", "--batch_size", "64", "--epochs", "10", "--warmup_epochs", "1", "--blr",
                     "2e-3", "--norm_pix_loss", "--data_path", data, "--output_dir", out, "--log_dir", out,
                     "--knn_freq", "4", "--knn_train_per_class", "100", "--print_freq", "1000", timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    logs = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
    assert [r["epoch"] for r in logs if "knn_acc1" in r] == [3, 7, 9]
    from visualdl import LogReader
    reader = LogReader(file_path=os.path.join(out, [f for f in os.listdir(out) if f.startswith("vdlrecords")][0]))
    assert [round(v.value, 4) for v in reader.get_data("scalar", "knn_acc1")] == \
        [round(r["knn_acc1"], 4) for r in logs if "knn_acc1" in r]
    tf = eval_transform(28)
    train, val = ImageFolder(os.path.join(data, "train")), ImageFolder(os.path.join(data, "val"))
    rng = np.random.default_rng(0)  # the monitor's class-balanced subset: --seed 0
    subset = [s for c in range(10) for s in (lambda items: [items[i] for i in sorted(rng.permutation(len(items))[:100])])(
        [s for s in train.samples if s[1] == c])]

    def knn(model):
        """Features as the monitor takes them (batches of --batch_size), the vote in NumPy."""
        sets = []
        for samples in (subset, val.samples):
            ds = ImageFolder(os.path.join(data, "val"), transform=tf)
            ds.samples = samples
            sets.append(extract(model, loaders_over(ds, 64), len(ds), "avg"))
        return numpy_knn(sets[0], np.array([t for _, t in subset]), sets[1], [t for _, t in val.samples], 10, 20,
                         0.07)

    trained = attach_cpu_paths(models_mae.mae_vit_micro_patch4(img_size=28))  # the run's forward
    load_model_weights(trained, load_checkpoint(os.path.join(out, "checkpoint-last.pd"))["model"], out)
    assert knn(trained) == pytest.approx(logs[-1]["knn_acc1"], abs=1e-9)
    paddle.seed(0)
    assert logs[-1]["knn_acc1"] > knn(models_mae.mae_vit_micro_patch4(img_size=28))
    res = run_script("main_pretrain.py", "--model", "mae_vit_micro_patch4", "--data_path", str(tmp_path / "nodata"),
                     "--knn_freq", "1", "--device", "cpu", "--output_dir", str(tmp_path / "o2"))
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    os.makedirs(tmp_path / "noval" / "train")
    os.symlink(os.path.join(data, "train", "1_trouser"), tmp_path / "noval" / "train" / "1_trouser")
    res = run_script("main_pretrain.py", "--model", "mae_vit_micro_patch4", "--data_path", str(tmp_path / "noval"),
                     "--knn_freq", "1", "--device", "cpu", "--output_dir", str(tmp_path / "o3"), "--batch_size", "8")
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'noval' / 'val'}: dataset folder not found"], res.stderr
