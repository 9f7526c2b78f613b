"""The shipped Fashion-MNIST study: results.json holds the fields its readers rely on, and every reported
number follows from the logs shipped beside it (read here independently of run.py)."""
import json
import os
import re

import numpy as np
import pytest

from conftest import ROOT

REPORT = os.path.join(ROOT, "experiments", "fashion_mnist")
RUNS = os.path.join(REPORT, "runs")
METHODS = ("finetune_mae", "finetune_scratch", "linprobe_mae", "logreg_mae", "logreg_pixels", "knn_mae",
           "knn_pixels", "cnn")
TRAINED = ("finetune_mae", "finetune_scratch", "linprobe_mae")


@pytest.fixture(scope="module")
def results():
    with open(os.path.join(REPORT, "results.json"), encoding="utf-8") as f:
        return json.load(f)


def test_fields_of_results_json(results):
    assert results["protocol"]["selection"] == "val"
    for method in METHODS:
        for fraction in ("1", "10", "100"):
            cell = results["summary"][method][fraction]
            assert {"mean", "std", "runs"} <= set(cell) and cell["runs"] == len(cell["values"])
            if fraction != "100":
                assert cell["runs"] >= 3 and cell["std"] > 0, (method, fraction)
    assert len(results["pretrain_epochs"]) >= 3


def shipped_top1(path):
    found = re.findall(r"\* Acc@1 ([\d.]+)", open(path, encoding="utf-8").read())
    assert found, f"{path} has no test top-1"
    return float(found[-1])


def test_summary_follows_from_the_logs(results):
    chosen = results["protocol"]["chosen_blr"]
    draws = results["protocol"]["draws"]
    expected = {m: {} for m in METHODS}
    for method in TRAINED:
        for fraction in ("1", "10", "100"):
            blr = chosen[method]["10" if fraction == "100" else fraction]
            names = [f"{method}_{fraction}pct_draw{d}_blr{blr}" for d in (draws if fraction != "100" else [0])]
            expected[method][fraction] = [shipped_top1(os.path.join(RUNS, n, "test.txt")) for n in names]
    with open(os.path.join(RUNS, "baselines", "log.txt"), encoding="utf-8") as f:
        for row in map(json.loads, filter(str.strip, f)):
            expected[row["method"]].setdefault(row["percent"], []).append(row["test_acc1"])
    for method, cells in expected.items():
        for fraction, values in cells.items():
            cell = results["summary"][method][fraction]
            assert cell["values"] == values and cell["mean"] == pytest.approx(np.mean(values)), (method, fraction)
            if len(values) > 1:
                assert cell["std"] == pytest.approx(np.std(values, ddof=1)), (method, fraction)


def test_pretraining_curve_follows_from_the_logs(results):
    blr = results["protocol"]["chosen_blr"]["finetune_mae"]["10"]
    main = str(results["protocol"]["main_pretrain_epochs"])
    assert main in results["pretrain_epochs"]
    for epochs, top1 in results["pretrain_epochs"].items():
        name = f"finetune_mae_10pct_draw0_blr{blr}" + ("" if epochs == main else f"_pretrain{epochs}")
        assert shipped_top1(os.path.join(RUNS, name, "test.txt")) == top1, epochs


def test_every_log_named_in_results_is_shipped_and_small(results):
    paths = [os.path.join(REPORT, p) for run in results["runs"].values() for p in run["logs"]]
    assert paths and all(os.path.isfile(p) for p in paths), [p for p in paths if not os.path.isfile(p)]
    sizes = [os.path.getsize(p) for p in paths]
    assert max(sizes) < 200_000 and sum(sizes) < 3_000_000
