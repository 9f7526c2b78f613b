"""The Fashion-MNIST study driver end to end on a few hundred images, one epoch per stage."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import paddle
import pytest

from conftest import ROOT
from data import demo_subset
from helpers import run_script

DRIVER = os.path.join("experiments", "fashion_mnist", "run.py")


def _files(folder):
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".png")}


@pytest.mark.slow
def test_study_driver_smoke(tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    demo_subset(data, {"train": 45, "val": 10})
    os.makedirs(out)
    with open(os.path.join(out, "README.md"), "w") as f:  # the report's README gets its table replaced
        f.write("intro\n<!-- results: written by run.py -->\nold table\n<!-- end of results -->\nconclusions\n")
    res = run_script(DRIVER, "--smoke", "--data", data, "--out", out, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.load(open(os.path.join(out, "results.json")))
    assert report["protocol"]["selection"] == "val"

    # the validation split: 5 per class held out of the training images, the test images in neither part
    train, val = _files(data + "_dev/train"), _files(data + "_dev/val")
    assert not train & val and train | val == _files(os.path.join(data, "train"))
    assert {os.path.dirname(f) for f in val} == {os.path.dirname(f) for f in train} and len(val) == 50
    # label draws: class-balanced, 1% inside 10% of the same draw, the draws differ
    draws = {(p, d): _files(f"{data}_dev_labels{p}pct_draw{d}/train") for p in (1, 10) for d in (0, 1)}
    assert all(len(draws[(1, d)]) == 20 and len(draws[(10, d)]) == 40 for d in (0, 1))
    assert draws[(1, 0)] < draws[(10, 0)] and draws[(1, 1)] < draws[(10, 1)] and draws[(10, 0)] != draws[(10, 1)]
    assert all(f in train for files in draws.values() for f in files)

    runs = report["runs"]
    chosen = report["protocol"]["chosen_blr"]
    for p in ("1", "10"):  # a real choice; two values put the best at an end, so the grid goes on past it
        swept = list(report["sweeps_val_top1"]["finetune_mae"][p])
        assert swept in (["2.5e-3", "5e-3", "1.25e-3"], ["2.5e-3", "5e-3", "1e-2"])
    for method, sweep in report["sweeps_val_top1"].items():
        for p in ("1", "10"):
            assert chosen[method][p] == max(sweep[p], key=sweep[p].get)  # the best validation top-1
            for blr, acc in sweep[p].items():
                name = f"{method}_{p}pct_draw0_blr{blr}"
                assert runs[name]["val_acc1"] == acc == json.loads(open(os.path.join(
                    out, name, "log.txt")).read().splitlines()[-1])["test_acc1"]
                assert ("test_acc1" in runs[name]) == (blr == chosen[method][p])  # the test set once, when chosen
    summary = report["summary"]
    assert set(summary) == {"finetune_mae", "finetune_scratch", "linprobe_mae", "logreg_mae", "logreg_pixels",
                            "knn_mae", "knn_pixels", "cnn"}
    for method, cells in summary.items():
        assert set(cells) == {"1", "10", "100"}, method
        for p, cell in cells.items():
            assert cell["runs"] == len(cell["values"]) == (1 if p == "100" else 2)
            assert cell["mean"] == pytest.approx(np.mean(cell["values"]))
            assert cell["std"] == (None if p == "100" else pytest.approx(np.std(cell["values"], ddof=1)))
            if method in chosen:
                blr = chosen[method]["10" if p == "100" else p]
                names = [f"{method}_{p}pct_draw{d}_blr{blr}" for d in ((0,) if p == "100" else (0, 1))]
                assert cell["values"] == [runs[n]["test_acc1"] for n in names]
                for n in names:
                    assert runs[n]["logs"] == [f"{n}/log.txt", f"{n}/test.txt"]
                    shipped = open(os.path.join(out, n, "test.txt")).read()
                    assert f"* Acc@1 {runs[n]['test_acc1']:.3f}" in shipped and "100 val images" in shipped
    for name, entry in runs.items():  # from scratch (the ViT and the CNN) trains longer: here 2 epochs, not 1
        if name.startswith("finetune_"):
            assert entry["epochs"] == (2 if name.startswith("finetune_scratch") else 1), name
    assert report["protocol"]["scratch_and_cnn_epochs"] == {"1": 2, "10": 2, "100": 2}
    baselines = [json.loads(line) for line in open(os.path.join(out, "baselines", "log.txt"))]
    assert len(baselines) == 5 * 5
    for row in baselines:
        if row["draw"] == 0 and row["percent"] in ("1", "10"):  # chosen on validation from its grid
            assert row["val_acc1"] == max(s["val_acc1"] for s in row["sweep"])
        else:
            source = next(r for r in baselines if r["method"] == row["method"] and r["draw"] == 0 and
                          r["percent"] == ("10" if row["percent"] == "100" else row["percent"]))
            assert row["setting"] == source["setting"] and "sweep" not in row
        assert row["test_acc1"] in summary[row["method"]][row["percent"]]["values"]
        assert row["method"] != "cnn" or row["epochs"] == 2
    for epochs in (1, 2):  # later stages start from the pre-trainings' weights, kept without optimizer state
        weights = os.path.join(out, f"pretrain_e{epochs}", "model.pd")
        assert set(paddle.load(weights)) == {"model"}
        assert f"--finetune {weights}" in runs[f"finetune_mae_10pct_draw0_blr{chosen['finetune_mae']['10']}"
                                               + ("" if epochs == 1 else "_pretrain2")]["command"]
    # the curve may go past the pre-training that every classifier and baseline starts from
    assert set(report["pretrain_epochs"]) == {"1", "2"} and report["protocol"]["main_pretrain_epochs"] == 1
    assert report["pretrain_epochs"]["1"] == runs[f"finetune_mae_10pct_draw0_blr{chosen['finetune_mae']['10']}"][
        "test_acc1"]
    assert os.path.join(out, "pretrain_e1", "model.pd") in runs["baselines"]["command"]
    table = open(os.path.join(out, "results.md")).read()
    assert open(os.path.join(out, "README.md")).read() == (
        f"intro\n<!-- results: written by run.py -->\n{table}<!-- end of results -->\nconclusions\n")
    reports = ("results.json", "results.md", "label_efficiency.png", "pretrain_epochs.png", "loss_curves.png",
               "reconstruction.png")
    written = {f: open(os.path.join(out, f), "rb").read() for f in reports}
    assert all(written.values())
    again = run_script(DRIVER, "--smoke", "--data", data, "--out", out)
    assert again.returncode == 0 and "[linprobe_mae_10pct_draw1_blr0.1] done already" in again.stdout
    assert {f: open(os.path.join(out, f), "rb").read() for f in reports} == written  # the report step rewrites
    bad = run_script(DRIVER, "--smoke", "--data", data, "--out", out, "--stages", "nothing")
    assert bad.returncode == 2 and "invalid choice: 'nothing'" in bad.stderr


def test_study_driver_bad_paths(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = run_script(DRIVER, "--smoke", "--data", str(blocker / "data"), "--out", str(tmp_path / "o"))
    assert res.returncode != 0 and "could not prepare --data" in res.stderr
    data = tmp_path / "data"
    demo_subset(str(data), {"train": 1, "val": 1})
    res = run_script(DRIVER, "--smoke", "--data", str(data), "--out", str(blocker / "out"))
    assert res.returncode == 1 and f"--out {blocker / 'out'}" in res.stderr and "Traceback" not in res.stderr


def test_study_baselines_solvers():
    """kNN equals a direct count of the k nearest by cosine; logistic regression reaches a vanishing gradient;
    the CNN learns separable classes."""
    sys.path.insert(0, os.path.join(ROOT, "experiments", "fashion_mnist"))
    import baselines
    import cnn

    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(300, 20)), rng.normal(size=(50, 20))
    train_y = rng.integers(0, 4, 300)
    cos = (test_x / np.linalg.norm(test_x, axis=1, keepdims=True)) @ (
        train_x / np.linalg.norm(train_x, axis=1, keepdims=True)).T
    for k in (1, 5, 20):
        pred = baselines.knn_predict(train_x, train_y, test_x, 4, k, chunk=7)
        for i in range(len(test_x)):
            near = train_y[np.argsort(-cos[i])[:k]]
            counts = np.bincount(near, minlength=4)
            winners = np.flatnonzero(counts == counts.max())
            assert pred[i] == next(c for c in near if c in winners)  # ties: the class met first
    centres = rng.normal(size=(3, 20)) * 3
    y = rng.integers(0, 3, 400)
    x = (centres[y] + rng.normal(size=(400, 20))).astype(np.float32)
    w, b, iterations, grad = baselines.logistic_regression(x, y, 3)
    assert grad < 1e-6 and 0 < iterations < 5000
    assert (np.argmax(x @ w + b, axis=1) == y).mean() > 0.95
    images = np.zeros((256, 784), dtype=np.float32)  # class 1: a bright top half, class 0: a bright bottom half
    labels = rng.integers(0, 2, 256)
    images[labels == 1, :392], images[labels == 0, 392:] = 1.0, 1.0
    images += rng.normal(scale=0.1, size=images.shape).astype(np.float32)
    model, loss = cnn.train(images, labels, 2, 1e-3, 3, seed=0, batch_size=32)
    assert loss < 0.2 and (cnn.predict(model, images) == labels).mean() == 1.0


def test_study_wall_clock_leaves_out_stopped_time(tmp_path):
    """A run's wall_clock.txt counts the seconds it ran, not the seconds the study was stopped (SIGSTOP)."""
    driver = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.join(ROOT, DRIVER))!r}); import run; "
              f"run.TICK = 0.2; run.timed_call([sys.executable, '-c', 'import time\\nfor _ in range(30): time.sleep(0.1)'], "
              f"{str(tmp_path / 'run')!r}, {str(tmp_path / 'run.stdout')!r})")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT, start_new_session=True)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGSTOP)
    time.sleep(4.0)
    os.killpg(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=60) == 0
    elapsed = time.monotonic() - start
    counted = float((tmp_path / "run" / "wall_clock.txt").read_text())
    assert elapsed > 6.5 and 2.9 <= counted < elapsed - 3.0  # 3 s of sleeps, 4 s stopped


def test_study_grid_goes_on_past_the_end_holding_the_best(monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "experiments", "fashion_mnist"))
    import baselines
    import grids
    import run

    assert grids.beyond_edge([2.5e-3, 5e-3, 1e-2], [58.2, 61.8, 66.4]) == pytest.approx(2e-2)
    assert grids.beyond_edge([5e-3, 1e-2, 2.5e-3], [61.8, 50.0, 70.0]) == pytest.approx(1.25e-3)  # any order
    assert grids.beyond_edge([2.5e-3, 5e-3, 1e-2], [58.2, 66.5, 66.4]) is None
    assert grids.beyond_edge([2.5e-3, 5e-3, 1e-2], [60.0, 60.0, 60.0]) == pytest.approx(1.25e-3)  # ties: smaller
    assert grids.beyond_edge([0.1, 0.8, 6.4, 25.6], [18.7, 40.8, 67.9, 70.1]) == pytest.approx(102.4)
    assert grids.beyond_edge([0.8], [50.0]) is None  # one value: no ratio to go on at
    assert [run.blr_string(v) for v in (0.01 * 0.01 / 0.005, 2.5e-3 ** 2 / 5e-3, 25.6 ** 2 / 6.4, 1e-2)] == [
        "2e-2", "1.25e-3", "102.4", "1e-2"]

    # a baseline's sweep: here the validation top-1 grows with k up to k = 200, so the grid goes on past 50
    def fit(kind, setting, x, y, classes, epochs, seed, max_iter):
        return (lambda v: (np.arange(len(v)) >= min(setting["k"], 200)).astype(np.int64)), {}

    monkeypatch.setattr(baselines, "fit", fit)
    data = ({"pixels": np.zeros((300, 2))}, np.zeros(300, np.int64))
    row = baselines.run("knn_pixels", "1", 0, data, data, data, 2, 1, None, 10)
    assert [s["setting"]["k"] for s in row["sweep"]] == [1, 3, 5, 10, 20, 50, 125, 312, 779]
    assert row["setting"] == {"k": 312, "features": "pixels"} and row["val_acc1"] == pytest.approx(200 / 3)
