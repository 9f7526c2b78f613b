"""The shipped Fashion-MNIST study: results.json holds the fields its readers rely on, and every reported
number follows from the logs shipped beside it (run names and numbers read here independently of run.py)."""
import json
import os
import re

import numpy as np
import pytest

from conftest import ROOT

REPORT = os.path.join(ROOT, "experiments", "fashion_mnist")
RUNS = os.path.join(REPORT, "runs")
COMPARED = ("finetune_mae", "finetune_scratch", "partial_mae", "linprobe_mae")
BASELINES = ("logreg_mae", "knn_mae", "logreg_pixels", "knn_pixels", "cnn", "cnn_vit_aug")
FRACTIONS = ("1", "10", "100")


@pytest.fixture(scope="module")
def results():
    with open(os.path.join(REPORT, "results.json"), encoding="utf-8") as f:
        return json.load(f)


def run_name(method, fraction, draw, recipe, pretrain=""):
    return (f"recipe_{method}_{fraction}pct_draw{draw}_crop{recipe['crop_min']}_eval{recipe['crop_pct']}"
            + (f"_dp{recipe['drop_path']}_wd{recipe['weight_decay']}" if "drop_path" in recipe else "")
            + ("" if recipe["longer"] == "1" else f"_x{recipe['longer']}") + f"_blr{recipe['blr']}"
            + (f"_pretrain{pretrain}" if pretrain else ""))


def shipped_top1(name):
    with open(os.path.join(RUNS, name, "test.txt"), encoding="utf-8") as f:
        found = re.findall(r"\* Acc@1 ([\d.]+)", f.read())
    assert found, f"{name}/test.txt has no test top-1"
    return float(found[-1])


def draws_top1(results, method, fraction, pretrain=""):
    recipe = results["protocol"]["recipes"][method]["10" if fraction == "100" else fraction]
    return [shipped_top1(run_name(method, fraction, d, recipe, pretrain)) for d in results["protocol"]["draws"]]


def same_cell(cell, values):
    assert cell["runs"] == len(values) and cell["values"] == values
    assert cell["mean"] == pytest.approx(np.mean(values)) and cell["std"] == pytest.approx(np.std(values, ddof=1))


def test_fields_of_results_json(results):
    assert results["protocol"]["selection"] == "val" and results["protocol"]["draws"] == [0, 1, 2]
    assert set(results["summary"]) == set(COMPARED + BASELINES)
    for method, cells in results["summary"].items():
        assert set(cells) == set(FRACTIONS), method
        for fraction, cell in cells.items():
            assert {"mean", "std", "runs"} <= set(cell) and cell["runs"] == len(cell["values"]) == 3
    assert set(results["pretrain_epochs"]) == {"0", "10", "25", "50", "100"}
    assert set(results["pretrain_seeds"]) == {"0", "1"}


def test_summary_follows_from_the_logs(results):
    for method in COMPARED:
        for fraction in FRACTIONS:
            same_cell(results["summary"][method][fraction], draws_top1(results, method, fraction))
    name = next(n for n in results["runs"] if n.startswith("baselines_"))
    with open(os.path.join(RUNS, name, "log.txt"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for method in BASELINES:
        for fraction in FRACTIONS:
            lines = sorted((r for r in rows if (r["method"], r["percent"]) == (method, fraction)),
                           key=lambda r: r["draw"])
            assert [r["draw"] for r in lines] == results["protocol"]["draws"], (method, fraction)
            same_cell(results["summary"][method][fraction], [r["test_acc1"] for r in lines])


def test_pretraining_curve_and_seeds_follow_from_the_logs(results):
    main = str(results["protocol"]["main_pretrain_epochs"])
    for epochs, cell in results["pretrain_epochs"].items():
        same_cell(cell, draws_top1(results, "finetune_mae", "10", "" if epochs == main else epochs))
    assert results["pretrain_epochs"][main] == results["summary"]["finetune_mae"]["10"]
    for method in ("finetune_mae", "partial_mae", "linprobe_mae"):
        assert results["pretrain_seeds"]["0"][method] == results["summary"][method]["10"]
        same_cell(results["pretrain_seeds"]["1"][method], draws_top1(results, method, "10", f"{main}_seed1"))


def test_every_log_named_in_results_is_shipped_and_small(results):
    paths = [os.path.join(REPORT, p) for run in results["runs"].values() for p in run["logs"]]
    assert paths and all(os.path.isfile(p) for p in paths), [p for p in paths if not os.path.isfile(p)]
    sizes = [os.path.getsize(p) for p in paths]
    assert max(sizes) < 200_000 and sum(sizes) < 4_000_000
