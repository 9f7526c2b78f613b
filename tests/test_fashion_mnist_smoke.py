"""The Fashion-MNIST study driver end to end on a few hundred images, one epoch per stage."""
import json
import os
import shutil
import sys

import pytest

from conftest import ROOT
from helpers import run_script

DRIVER = os.path.join("experiments", "fashion_mnist", "run.py")


def _subset(dst, per_split):
    """The first images of each class of the shipped Fashion-MNIST subset (real data, no download)."""
    for split, n in per_split.items():
        src = os.path.join(ROOT, "demo", "fashion_mnist_small", split)
        for c in sorted(os.listdir(src)):
            os.makedirs(os.path.join(dst, split, c))
            for f in sorted(os.listdir(os.path.join(src, c)))[:n]:
                shutil.copy(os.path.join(src, c, f), os.path.join(dst, split, c, f))


@pytest.mark.slow
def test_study_driver_smoke(tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    _subset(data, {"train": 30, "val": 10})
    os.makedirs(out)
    with open(os.path.join(out, "README.md"), "w") as f:  # the report's README gets its table replaced
        f.write("intro\n<!-- results: written by run.py -->\nold table\n<!-- end of results -->\nconclusions\n")
    res = run_script(DRIVER, "--smoke", "--data", data, "--out", out, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.load(open(os.path.join(out, "results.json")))
    results = report["stages"]
    expected = {"pretrain", "baselines"} | {f"{kind}_{p}" for kind in ("linprobe_mae", "finetune_mae",
                                                                       "finetune_scratch") for p in (1, 10, 100)}
    assert set(results) == expected
    subsets = {}
    for name, entry in results.items():
        logs = [json.loads(line) for line in open(entry["log"])]
        assert entry["wall_clock_s"] > 0
        if name == "baselines":
            assert entry["rows"] == logs and len(logs) == 9
            continue
        assert entry["epochs"] == len(logs) == 1 and entry["final_train_loss"] == logs[-1]["train_loss"]
        assert ("final_acc1" in entry) == (name != "pretrain")
        assert entry["command"].startswith("python main_")
        if name != "pretrain":
            subsets[name.rsplit("_", 1)[1]] = entry["train_images"]
            assert report["test_top1"][name.rsplit("_", 1)[0]][name.rsplit("_", 1)[1]] == entry["final_acc1"]
    # class-balanced subsets: 1% and 10% of 30 per class round to at least 2 and 3 per class
    assert subsets == {"1": 20, "10": 30, "100": 300}
    train_1 = open(os.path.join(data + "_labels1pct", "subset.txt")).read().split()
    train_10 = open(os.path.join(data + "_labels10pct", "subset.txt")).read().split()
    assert set(train_1) < set(train_10)
    assert len(os.listdir(os.path.join(data + "_labels1pct", "val", "0_t-shirt_top"))) == 10
    for row in results["baselines"]["rows"]:
        assert report["test_top1"][row["method"]][row["percent"]] == row["test_acc1"]
    for p in ("1", "10", "100"):
        gain = report["finetune_mae_minus_scratch"][p]
        assert gain == report["test_top1"]["finetune_mae"][p] - report["test_top1"]["finetune_scratch"][p]
    table = open(os.path.join(out, "results.md")).read()
    assert "| finetune_mae_1 | 20 | 1 | 1 |" in table
    assert open(os.path.join(out, "README.md")).read() == (
        f"intro\n<!-- results: written by run.py -->\n{table}<!-- end of results -->\nconclusions\n")
    reports = ("results.json", "results.md", "label_efficiency.png", "loss_curves.png", "reconstruction.png")
    written = {f: open(os.path.join(out, f), "rb").read() for f in reports}
    assert all(written.values())
    again = run_script(DRIVER, "--smoke", "--data", data, "--out", out, "--stages", "linprobe_mae_10")
    assert again.returncode == 0 and "[linprobe_mae_10] done already" in again.stdout
    assert {f: open(os.path.join(out, f), "rb").read() for f in reports} == written  # the report step rewrites
    bad = run_script(DRIVER, "--smoke", "--data", data, "--out", out, "--stages", "nothing")
    assert bad.returncode == 2 and "unknown stage(s) nothing" in bad.stderr


def test_study_driver_bad_paths(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = run_script(DRIVER, "--smoke", "--data", str(blocker / "data"), "--out", str(tmp_path / "o"))
    assert res.returncode != 0 and "could not prepare --data" in res.stderr
    data = tmp_path / "data"
    _subset(str(data), {"train": 1, "val": 1})
    res = run_script(DRIVER, "--smoke", "--data", str(data), "--out", str(blocker / "out"))
    assert res.returncode == 1 and f"--out {blocker / 'out'}" in res.stderr and "Traceback" not in res.stderr


def test_study_baselines_solvers():
    """kNN equals a direct count of the K nearest by cosine; logistic regression reaches a vanishing gradient."""
    import numpy as np
    sys.path.insert(0, os.path.join(ROOT, "experiments", "fashion_mnist"))
    import baselines

    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(300, 20)), rng.normal(size=(50, 20))
    train_y = rng.integers(0, 4, 300)
    pred = baselines.knn_predict(train_x, train_y, test_x, 4, chunk=7)
    cos = (test_x / np.linalg.norm(test_x, axis=1, keepdims=True)) @ (
        train_x / np.linalg.norm(train_x, axis=1, keepdims=True)).T
    for i in range(len(test_x)):
        near = train_y[np.argsort(-cos[i])[:baselines.K]]
        counts = np.bincount(near, minlength=4)
        winners = np.flatnonzero(counts == counts.max())
        assert pred[i] == next(c for c in near if c in winners)  # ties: the class met first
    centres = rng.normal(size=(3, 20)) * 3
    y = rng.integers(0, 3, 400)
    x = (centres[y] + rng.normal(size=(400, 20))).astype(np.float32)
    w, b, iterations, grad = baselines.logistic_regression(x, y, 3)
    assert grad < 1e-6 and 0 < iterations < 5000
    assert (np.argmax(x @ w + b, axis=1) == y).mean() > 0.95
