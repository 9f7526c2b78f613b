"""Features without masking: the weighted k-NN, the k-NN monitor of pre-training, main_extract.py."""
import json
import os
import re
import shutil
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
from util.cpu_layer import attach_cpu_paths
from util.datasets import ImageFolder, load_image
from util.features import extract, knn_top1, loaders_over
from util.transforms import eval_transform
from util.weights import load_checkpoint, load_model_weights

VIT = golden("vit_tiny_gp.pth")  # an official-format global-pool classifier, vit_micro_patch4 at 32 px


def numpy_knn(train, train_y, test, test_y, classes, k, t):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    correct = 0
    for row, label in zip(test @ train.T, test_y):
        near = np.argsort(-row, kind="stable")[:k]
        scores = np.full(classes, -np.inf)
        for j in near:  # log-sum-exp per class: exact at any temperature
            scores[train_y[j]] = np.logaddexp(scores[train_y[j]], row[j] / t)
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


def test_knn_top1_refuses_what_it_would_guess_about():
    """Labels a vote cannot count (-1 of a folder without class folders, past the classes, not whole numbers),
    a label count that differs from the rows, other feature widths, no rows, a row not finite, classes or
    k < 1, t <= 0: a DataError naming the argument, where a top-1 came out (or an IndexError)."""
    from util.errors import DataError

    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(30, 8)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float32)
    train_y, test_y = np.arange(30) % 3, np.arange(6) % 3
    nan = train.copy()
    nan[17, 2] = np.nan
    cases = [((train, np.r_[train_y[:-1], -1], test, test_y, 3), "train_labels: -1 is not a class in [0, 3)"),
             ((train, train_y, test, np.r_[test_y[:-1], 3], 3), "test_labels: 3 is not a class in [0, 3)"),
             ((train, train_y + 0.5, test, test_y, 3), "train_labels: not a list of whole numbers (float64"),
             ((train, train_y[:-1], test, test_y, 3), "train_features: shape [30, 8] for 29 train_labels"),
             ((train, train_y, test[:, :5], test_y, 3), "test_features: 5 numbers per row, train_features 8"),
             ((train[:0], train_y[:0], test, test_y, 3), "train_features: no rows"),
             ((train, train_y, test[:0], test_y[:0], 3), "test_features: no rows"),
             ((nan, train_y, test, test_y, 3), "train_features: row 17 is not finite"),
             ((train, train_y, test, test_y, 3.5), "classes: 3.5 is not a whole number >= 1"),
             ((train, train_y, test, test_y, 3, 0), "k: 0 is not a whole number >= 1"),
             ((train, train_y, test, test_y, 3, 5, 0.0), "t: 0.0 is not a positive number"),
             ((train, train_y, test, test_y, 3, 5, float("nan")), "t: nan is not a positive number")]
    for args, message in cases:
        with pytest.raises(DataError, match=re.escape(message)):
            knn_top1(*args)
    assert 0 <= knn_top1(train, list(train_y), test, test_y.astype(np.int32), 3, 5) <= 100


def test_weighted_knn_at_small_temperatures():
    """exp(similarity / t) overflows float64 below t ~ 1/709: the vote is taken relative to each query's
    nearest neighbour, so that it stays the log-sum-exp vote (not NaN, not class 0)."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(10, 16))
    train_y, test_y = rng.integers(0, 10, 400), rng.integers(1, 10, 40)  # class 0 is never the answer
    train = (centres[train_y] + 1.2 * rng.normal(size=(400, 16))).astype(np.float32)
    test = (centres[test_y] + 1.2 * rng.normal(size=(40, 16))).astype(np.float32)
    for t in (1e-4, 1e-3, 0.07):
        got = knn_top1(train, train_y, test, test_y, 10, 20, t)
        assert got == pytest.approx(numpy_knn(train, train_y, test, test_y, 10, 20, t), abs=1e-9)
        assert got > 40


@pytest.mark.parametrize("product_queries,block_queries", [(2048, 256), (7, 3)])
def test_nearest_equals_a_float64_search(tmp_path, monkeypatch, product_queries, block_queries):
    """Blocks of the bank (memory-mapped) in float32, candidates re-scored in float64: the neighbours and
    similarities of a float64 search, also where float32 cannot order rows (near duplicates: the float64
    fallback) and for ties (the lower row first); the queries in one product or in several (7 at a time,
    selected 3 at a time)."""
    from util import features
    monkeypatch.setattr(features, "BLOCK_ROWS", 37)
    monkeypatch.setattr(features, "PRODUCT_QUERIES", product_queries)
    monkeypatch.setattr(features, "BLOCK_QUERIES", block_queries)
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(500, 24))
    bank[100:200] = bank[7] + rng.normal(size=(100, 24)) * 3e-7  # cosines 1e-13 apart: below float32's error
    bank[300] = bank[301] * 3.0  # the same direction: a tie
    queries = np.concatenate([rng.normal(size=(30, 24)), bank[[7, 301]] + 1e-12])
    np.save(tmp_path / "bank.npy", bank.astype(np.float32))
    mapped = np.load(tmp_path / "bank.npy", mmap_mode="r")
    exact = bank.astype(np.float32).astype(np.float64)
    exact /= np.linalg.norm(exact, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    for k in (1, 5, 20, 60):
        sims, idx = features.nearest(mapped, queries, k)
        all_sims = q @ exact.T
        ref = np.lexsort((np.broadcast_to(np.arange(500), all_sims.shape), -all_sims))[:, :k + 1]
        ref_sims = np.take_along_axis(all_sims, ref, 1)
        assert np.allclose(sims, ref_sims[:, :k], rtol=0, atol=1e-14), k  # the same k-th neighbour distances
        apart = np.abs(np.diff(ref_sims, axis=1)) > 1e-14  # rows that float64 itself orders
        clear = apart[:, :k] & np.concatenate([np.ones((len(q), 1), bool), apart[:, :k - 1]], axis=1)
        assert np.array_equal(idx[clear], ref[:, :k][clear]), k
        assert clear[:30].all() and (k == 1 or not clear[30].all())  # the near duplicates: not by float64 either
    assert list(features.nearest(mapped, queries[-1:], 2)[1][0]) == [300, 301]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_train_val(str(tmp_path_factory.mktemp("feat")), 3, 10, 4)


def _features_by_hand(model, folder, pool):
    tf = eval_transform(model.patch_embed.img_size[0])
    samples = ImageFolder(folder).samples if os.path.isdir(os.path.join(folder, os.listdir(folder)[0])) else \
        [(os.path.join(folder, f), -1) for f in sorted(os.listdir(folder))]
    x = tf.batch(np.stack([tf(load_image(p)) for p, _ in samples]))
    with paddle.no_grad():
        return model.forward_features(x, pool).numpy(), samples


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
    one = tmp_path / "one"  # fewer images than processes: rank 1 holds none
    one.mkdir()
    os.link(samples[0][0], one / "a.png")
    res = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                          logs, "main_extract.py", "--model", "vit_micro_patch4", "--finetune", VIT, "--data_path",
                          str(one), "--output", str(tmp_path / "one.npz"), "--device", "cpu", "--num_workers", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, open(os.path.join(logs, "workerlog.1")).read()[-3000:]
    assert np.allclose(np.load(tmp_path / "one.npz")["features"], ref[:1], atol=1e-5)


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
    subset = []
    for c in range(10):
        items = [s for s in train.samples if s[1] == c]
        subset += [items[i] for i in sorted(rng.permutation(len(items))[:100])]

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


def _extract(*argv, timeout=600):
    return run_script("main_extract.py", "--model", "vit_micro_patch4", "--device", "cpu", "--num_workers", "0",
                      *argv, timeout=timeout)


def _one_line(res, *words):
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines


def test_extract_takes_labels_from_one_rule(data, tmp_path):
    """A dataset root needs --split; images beside folders are refused; a flat folder gives -1 for each of its
    images (other files ignored); class folders keep their nested images; a split whose classes are not
    train/'s is refused."""
    out = str(tmp_path / "f.npz")
    _one_line(_extract("--finetune", VIT, "--data_path", data, "--output", out), "dataset root", "--split val")
    res = _extract("--finetune", VIT, "--data_path", data, "--split", "val", "--output", out)
    assert res.returncode == 0, res.stderr[-2000:]
    val = ImageFolder(os.path.join(data, "val"))
    got = np.load(out)
    assert got["labels"].tolist() == [t for _, t in val.samples]
    assert got["paths"].tolist() == [p for p, _ in val.samples]
    _one_line(_extract("--finetune", VIT, "--data_path", data, "--split", "test", "--output", out), "folder not found")
    mixed = tmp_path / "mixed"
    shutil.copytree(os.path.join(data, "val", "class_0"), mixed / "sub")
    for i, (p, _) in enumerate(val.samples[-2:]):
        shutil.copy(p, mixed / f"top_{i}.png")
    _one_line(_extract("--finetune", VIT, "--data_path", str(mixed), "--output", out), "2 image file(s) beside 1")
    shutil.rmtree(mixed / "sub")
    (mixed / "notes.txt").write_text("not an image")
    res = _extract("--finetune", VIT, "--data_path", str(mixed), "--output", out)
    assert res.returncode == 0, res.stderr[-2000:]
    assert np.load(out)["labels"].tolist() == [-1, -1] and len(np.load(out)["paths"]) == 2
    nested = tmp_path / "nested"
    shutil.copytree(os.path.join(data, "val"), nested)
    shutil.copytree(os.path.join(data, "val", "class_1"), nested / "class_1" / "deeper")
    res = _extract("--finetune", VIT, "--data_path", str(nested), "--output", out)
    assert res.returncode == 0, res.stderr[-2000:]
    paths = np.load(out)["paths"].tolist()
    assert len(paths) == len(set(paths)) == len(val) + 4 and sum("deeper" in p for p in paths) == 4
    shifted = tmp_path / "shifted"  # val/ without a class of train/: its labels would mean other classes
    shutil.copytree(data, shifted)
    shutil.rmtree(shifted / "val" / "class_0")
    _one_line(_extract("--finetune", VIT, "--data_path", str(shifted), "--split", "val", "--output", out),
              str(shifted / "val"), f"those of {shifted / 'train'}", "missing class_0")
    res = _extract("--finetune", VIT, "--data_path", str(shifted), "--split", "train", "--output", out)
    assert res.returncode == 0, res.stderr[-2000:]  # train/ defines the labels
    unlabelled = tmp_path / "unlabelled"  # train/ without class folders: val/'s own give the labels
    shutil.copytree(os.path.join(data, "val"), unlabelled / "val")
    (unlabelled / "train").mkdir()
    shutil.copy(val.samples[0][0], unlabelled / "train" / "a.png")
    res = _extract("--finetune", VIT, "--data_path", str(unlabelled), "--split", "val", "--output", out)
    assert res.returncode == 0, res.stderr[-2000:]
    assert np.load(out)["labels"].tolist() == [t for _, t in val.samples]


def test_extract_class_tokens_of_a_pretraining_checkpoint(data, tmp_path):
    """--pool cls reads an MAE checkpoint (its decoder ignored): the class token through the final norm."""
    out = str(tmp_path / "cls.npz")
    mae = golden("mae_tiny.pth")
    res = _extract("--finetune", mae, "--data_path", os.path.join(data, "val"), "--output", out, "--pool", "cls")
    assert res.returncode == 0, res.stderr[-2000:]
    model = models_mae.mae_vit_micro_patch4()
    load_model_weights(model, load_checkpoint(mae)["model"], mae)
    model.eval()
    ref, _ = _features_by_hand(model, os.path.join(data, "val"), "cls")
    assert np.allclose(np.load(out)["features"], ref, atol=1e-5)


def _spawned_gather(count):
    import paddle.distributed as dist
    from util.features import gather_rows, rank_share
    dist.init_parallel_env()
    mine = rank_share(count)
    share = np.array([[i, i * 10.0] for i in mine], np.float32).reshape(len(mine), 2)
    got = gather_rows(share, count)
    assert got.tolist() == [[i, i * 10.0] for i in range(count)], (dist.get_rank(), got)


def _spawned_nearest(count, out):
    import paddle.distributed as dist
    from util.features import nearest_over_ranks, rank_share
    dist.init_parallel_env()
    rng = np.random.default_rng(3)
    bank, queries = rng.normal(size=(count, 8)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float32)
    mine = np.asarray(rank_share(count), np.int64)
    sims, idx = nearest_over_ranks(bank[mine], mine, queries, 4)
    np.savez(f"{out}.{dist.get_rank()}.npz", sims=sims, idx=idx, bank=bank, queries=queries)


@pytest.mark.parametrize("count", [2, 40])
def test_nearest_over_ranks_equals_one_search(tmp_path, count):
    """Three ranks, each searching its share of the bank (none for rank 2 when the bank has 2 rows), give
    every rank the neighbours of one search over the whole bank."""
    from util.features import nearest
    paddle.distributed.spawn(_spawned_nearest, args=(count, str(tmp_path / "r")), nprocs=3, backend="gloo")
    got = [np.load(tmp_path / f"r.{r}.npz") for r in range(3)]
    sims, idx = nearest(got[0]["bank"], got[0]["queries"], 4)
    for g in got:
        assert np.array_equal(g["idx"], idx) and np.allclose(g["sims"], sims, rtol=0, atol=1e-12)
    assert idx.shape == (6, min(4, count))


@pytest.mark.slow
def test_knn_monitor_with_fewer_val_images_than_processes(tmp_path):
    """Two processes, one validation image: rank 1 extracts nothing, the monitor still reports."""
    from data import make_image_folder
    root = str(tmp_path / "d")
    make_image_folder(root, classes=1, per_class=8, split="train")
    make_image_folder(root, classes=1, per_class=1, split="val", seed=1)
    out, logs = str(tmp_path / "out"), str(tmp_path / "logs")
    res = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                          logs, "main_pretrain.py", "--model", "mae_vit_micro_patch4", "--device", "cpu",
                          "--num_workers", "1", "--batch_size", "2", "--epochs", "1", "--warmup_epochs", "0",
                          "--data_path", root, "--output_dir", out, "--log_dir", out, "--knn_freq", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, open(os.path.join(logs, "workerlog.1")).read()[-3000:]
    log = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
    assert log[-1]["knn_acc1"] == 100.0  # one class
    assert "k-NN monitor: 8 train / 1 val images" in open(os.path.join(logs, "workerlog.0")).read()


@pytest.mark.parametrize("count", [1, 2, 5])
def test_gather_with_ranks_that_hold_no_rows(count):
    paddle.distributed.spawn(_spawned_gather, args=(count,), nprocs=3, backend="gloo")


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_extract_stops_on_a_signal_with_one_line(tmp_path, sig):
    import signal
    out = tmp_path / "f.npz"
    proc = subprocess.Popen([sys.executable, "main_extract.py", "--model", "vit_micro_patch4", "--finetune", VIT,
                             "--device", "cpu", "--num_workers", "2", "--batch_size", "1", "--data_path",
                             os.path.join(ROOT, "demo", "fashion_mnist_small", "train"), "--output", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "extracting features: 50/" in line:  # inside the loop, the rows file open
            break
    assert list(tmp_path.iterdir()), "the rows file exists while extracting"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err[-2000:]
    assert err.strip().splitlines() == [f"error: stopped by {sig}; {out} not written"], err[-2000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("size", ["64k", "200k"])
def test_extract_on_a_full_disk_leaves_nothing(data, tmp_path, size):
    """64k: the rows fail while features are written; 200k: the rows fit, the .npz does not."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespaces here")
    disk = tmp_path / "disk"
    disk.mkdir()
    train = os.path.join(ROOT, "demo", "fashion_mnist_small", "val")  # 500 x 64 float32: 128 KB of rows
    cmd = (f"mount -t tmpfs -o size={size} tmpfs {disk} || exit 9; {sys.executable} main_extract.py --model "
           f"vit_micro_patch4 --finetune {VIT} --device cpu --num_workers 0 --data_path {train} --output "
           f"{disk}/f.npz; echo EXIT $?; ls -A {disk}")
    res = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "EXIT 1" in res.stdout, res.stdout + res.stderr[-2000:]
    assert res.stdout.split("EXIT 1", 1)[1].split() == []  # nothing left on that disk
    written = "f.rows.tmp.npy" if size == "64k" else "f.npz"
    assert res.stderr.strip().splitlines() == [f"error: cannot write {disk}/{written}: No space left on device"], \
        res.stderr[-2000:]
