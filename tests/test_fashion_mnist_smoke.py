"""The Fashion-MNIST study driver end to end on a few hundred images, one epoch per stage."""
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial

import numpy as np
import paddle
import pytest

from conftest import ROOT
from data import demo_subset
from helpers import run_script

DRIVER = os.path.join("experiments", "fashion_mnist", "run.py")


def _files(folder):
    return {os.path.relpath(os.path.join(d, f), folder)
            for d, _, fs in os.walk(folder) for f in fs if f.endswith(".png")}


def _name(method, percent, draw, recipe):
    """The run of `method` at `percent`, draw `draw` with `recipe`, as run.py names it."""
    return (f"recipe_{method}_{percent}pct_draw{draw}_crop{recipe['crop_min']}_eval{recipe['crop_pct']}"
            + (f"_dp{recipe['drop_path']}_wd{recipe['weight_decay']}" if "drop_path" in recipe else "")
            + ("" if recipe["longer"] == "1" else f"_x{recipe['longer']}") + f"_blr{recipe['blr']}")


@pytest.mark.slow
def test_study_driver_smoke(tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    demo_subset(data, {"train": 45, "val": 10})
    os.makedirs(out)
    with open(os.path.join(out, "README.md"), "w") as f:  # the report's README gets its table replaced
        f.write("intro\n<!-- results: written by run.py -->\nold table\n<!-- end of results -->\nconclusions\n")
    res = run_script(DRIVER, "--smoke", "--data", data, "--out", out, "--jobs", "2", timeout=1200)
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

    runs, protocol, summary = report["runs"], report["protocol"], report["summary"]
    recipes = protocol["recipes"]

    def val(name):
        return json.loads(open(os.path.join(out, name, "log.txt")).read().splitlines()[-1])["test_acc1"]

    for method, by_percent in recipes.items():  # each blr: the best validation top-1 of its sweep's runs
        for p, recipe in by_percent.items():
            chosen = _name(method, p, 0, recipe)
            swept = [n for n in runs if n.startswith(chosen.rsplit("_blr", 1)[0] + "_blr") and "_pretrain" not in n]
            assert len(swept) >= 3 and val(chosen) == max(map(val, swept)), (method, p)
            assert all(runs[n]["val_acc1"] == report["recipe_val_top1"][n] == val(n) for n in swept)
    for method, start in (("finetune_mae", "5e-3"), ("finetune_scratch", "2e-2")):
        recipe = recipes[method]["10"]  # its epoch multiple: the best of 1, 2 and the one past their better end
        tried = {m: _name(method, "10", 0, {**recipe, "longer": m, "blr": start}) for m in ("0.5", "1", "2", "4")}
        tried = {float(m): val(n) for m, n in tried.items() if n in runs}
        assert len(tried) == 3 and {1.0, 2.0} < set(tried), (method, tried)
        assert f"{max(tried, key=lambda m: (tried[m], -m)):g}" == recipe["longer"]
    assert recipes["linprobe_mae"]["10"]["crop_min"] == recipes["finetune_mae"]["10"]["crop_min"]
    assert {k: v for k, v in recipes["partial_mae"]["10"].items() if k != "blr"} == {
        k: v for k, v in recipes["finetune_mae"]["10"].items() if k != "blr"}
    assert set(summary) == {"finetune_mae", "partial_mae", "linprobe_mae", "finetune_scratch", "logreg_mae",
                            "logreg_pixels", "knn_mae", "knn_pixels", "cnn", "cnn_vit_aug"}
    reported = set()
    for method, cells in summary.items():
        assert set(cells) == {"1", "10", "100"}, method
        for p, cell in cells.items():
            assert cell["runs"] == len(cell["values"]) == 2  # two draws (two seeds at 100%)
            assert cell["mean"] == pytest.approx(np.mean(cell["values"]))
            assert cell["std"] == pytest.approx(np.std(cell["values"], ddof=1))
            if method in recipes:
                names = [_name(method, p, d, recipes[method]["10" if p == "100" else p]) for d in (0, 1)]
                assert cell["values"] == [runs[n]["test_acc1"] for n in names], (method, p)
                reported |= set(names)
                for n in names:
                    assert runs[n]["logs"] == [f"{n}/log.txt", f"{n}/test.txt"]
                    shipped = open(os.path.join(out, n, "test.txt")).read()
                    assert f"* Acc@1 {runs[n]['test_acc1']:.3f}" in shipped and "100 val images" in shipped
                    assert ("--partial_blocks 1" in runs[n]["command"]) == (method == "partial_mae")
                    assert f"--num_workers {0 if p == '1' else 2} " in runs[n]["command"]
                    epochs = 2 if method == "finetune_scratch" else 1
                    assert runs[n]["epochs"] == max(1, round(epochs * float(recipes[method]["10"]["longer"]))), n
    # the test set once per reported run: the comparison's, the pre-training curve's and the second seed's
    curve = report["pretrain_epochs"]
    assert set(curve) == {"0", "1", "2"} and curve["1"] == summary["finetune_mae"]["10"]
    assert all(cell["runs"] == 2 for cell in curve.values())
    seeds = report["pretrain_seeds"]
    for method in ("finetune_mae", "partial_mae", "linprobe_mae"):
        assert seeds["0"][method] == summary[method]["10"] and seeds["1"][method]["runs"] == 2
    others = {n for n in runs if "test_acc1" in runs[n]} - reported
    assert others and all(n.endswith(("_pretrain0", "_pretrain2", "_pretrain1_seed1")) for n in others), others
    for name in others:
        weights = os.path.join(out, "pretrain_e" + name.rsplit("_pretrain", 1)[1], "model.pd")
        assert (f"--finetune {weights}" in runs[name]["command"]) != name.endswith("_pretrain0")
        assert name.endswith("_pretrain0") or set(paddle.load(weights)) == {"model"}
    baselines = [json.loads(line) for line in open(os.path.join(out, "baselines_crop0.08_eval0.875", "log.txt"))]
    assert len(baselines) == 6 * 6
    assert os.listdir(os.path.join(out, "baselines_crop0.08_eval0.875", "fits")) == []  # a written line's go
    for row in baselines:
        if row["draw"] == 0 and row["percent"] in ("1", "10"):  # chosen on validation from its grid
            assert row["val_acc1"] == max(s["val_acc1"] for s in row["sweep"])
        else:
            source = next(r for r in baselines if r["method"] == row["method"] and r["draw"] == 0 and
                          r["percent"] == ("10" if row["percent"] == "100" else row["percent"]))
            assert row["setting"] == source["setting"] and "sweep" not in row
        assert row["test_acc1"] in summary[row["method"]][row["percent"]]["values"]
        if row["percent"] == "100" and row["draw"] > 0 and not row["method"].startswith("cnn"):  # all labels
            first = next(r for r in baselines if (r["method"], r["percent"], r["draw"]) == (row["method"], "100", 0))
            assert row["same_as_draw"] == 0 and {**first, "draw": row["draw"], "same_as_draw": 0} == row
        else:
            assert "same_as_draw" not in row
        scratch_epochs = max(1, round(2 * float(recipes["finetune_scratch"]["10"]["longer"])))
        assert not row["method"].startswith("cnn") or row["epochs"] == scratch_epochs
    cost = report["cost"]  # every run counted once, in the first stage that needed it
    assert list(cost) == ["pretrain", "recipe", "compare", "seeds", "curve", "baselines", "pictures"]
    assert sum(c["runs"] for c in cost.values()) == len(runs) and cost["baselines"]["runs"] == 1
    assert sum(c["wall_clock_min"] for c in cost.values()) == pytest.approx(
        sum(r["wall_clock_s"] for r in runs.values()) / 60)
    assert sum(c["machine_min"] for c in cost.values()) == pytest.approx(
        sum(r["machine_s"] for r in runs.values()) / 60)
    cores = len(os.sched_getaffinity(0))
    pinned = {n: re.findall(r"^\[cores ([\d,]+) of (\d+)\]$", open(os.path.join(out, n + ".stdout")).read(), re.M)
              for n in runs if os.path.isfile(os.path.join(out, n + ".stdout"))}
    assert all(pinned.values()) and all(int(of) == cores for found in pinned.values() for _, of in found)
    if cores >= 2:  # two runs at a time, each on its own part of the cores
        shares = {found[0][0] for found in pinned.values() if len(found[0][0].split(",")) < cores}
        assert len(shares) == 2 and sorted(int(c) for share in shares for c in share.split(",")) == sorted(
            os.sched_getaffinity(0)), pinned
    command = runs["baselines_crop0.08_eval0.875"]["command"]
    assert "--crop_pct 0.875 --crop_min 0.08" in command and os.path.join(out, "pretrain_e1", "model.pd") in command
    table = open(os.path.join(out, "results.md")).read()
    assert open(os.path.join(out, "README.md")).read() == (
        f"intro\n<!-- results: written by run.py -->\n{table}<!-- end of results -->\nconclusions\n")
    reports = ("results.json", "results.md", "label_efficiency.png", "pretrain_epochs.png", "loss_curves.png",
               "reconstruction.png")
    written = {f: open(os.path.join(out, f), "rb").read() for f in reports}
    assert all(written.values())
    again = run_script(DRIVER, "--smoke", "--data", data, "--out", out)
    assert again.returncode == 0 and "done already" in again.stdout and "--output_dir" not in again.stdout  # no run
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
    res = run_script(DRIVER, "--smoke", "--data", str(data), "--out", str(tmp_path / "o"), "--jobs", "0")
    assert res.returncode == 2 and "argument --jobs: must be >= 1, got 0" in res.stderr


def _idx(path, array):
    """An IDX file of unsigned bytes, gzipped, as Fashion-MNIST ships them."""
    import gzip

    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_prepare_fashion_mnist_writes_whole_or_nothing(tmp_path):
    """The IDX files become OUT/train and OUT/val, class by class; images and labels that disagree (counts,
    a label past the classes, shapes) are refused naming the files, and a run that stops leaves no OUT that
    would look prepared (run.py prepares again where OUT has no train/); an OUT not empty is refused."""
    prepare = os.path.join("demo", "prepare_fashion_mnist.py")
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(0)

    def write(prefix, n, labels=None, images=None):
        _idx(src / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)) if images is None else images)
        _idx(src / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10 if labels is None else labels)

    write("train", 30)
    write("t10k", 20)
    res = run_script(prepare, "--src", str(src), "--out", str(out), "--train_per_class", "2")
    assert res.returncode == 0, res.stderr
    assert len(_files(out / "train")) == 20 and len(_files(out / "val")) == 20 and len(os.listdir(out / "val")) == 10
    assert not os.path.exists(str(out) + ".part")
    res = run_script(prepare, "--src", str(src), "--out", str(out))
    assert res.returncode == 2 and f"argument --out: {out} exists and is not an empty folder" in res.stderr

    labels = src / "t10k-labels-idx1-ubyte.gz"
    for images, labels_of_val, message in (
            (None, np.arange(19) % 10, f"{src / 't10k-images-idx3-ubyte.gz'} has 20 images, {labels} 19 labels"),
            (None, np.full(20, 10), f"{labels}: label 10, where the classes are 0 to 9"),
            (np.zeros((20, 784)), None, f"{src / 't10k-images-idx3-ubyte.gz'} and {labels}: shapes [20, 784] and "
             "[20], not images and labels")):
        write("t10k", 20, labels_of_val, images)
        fresh = tmp_path / "fresh"
        res = run_script(prepare, "--src", str(src), "--out", str(fresh))
        assert res.returncode == 2 and f"argument --src: {message}" in res.stderr and "Traceback" not in res.stderr
        assert not fresh.exists()  # train/ was written, into fresh.part: nothing looks prepared
    write("t10k", 20)
    (tmp_path / "fresh.part" / "val" / "stale").mkdir(parents=True)  # left by a stopped run: started over
    res = run_script(prepare, "--src", str(src), "--out", str(tmp_path / "fresh"), "--val_per_class", "1")
    assert res.returncode == 0 and len(_files(tmp_path / "fresh" / "val")) == 10
    assert sorted(os.listdir(tmp_path / "fresh" / "val"))[0] == "0_t-shirt_top"
    res = run_script(prepare, "--src", str(src), "--out", str(tmp_path / "x"), "--val_per_class", "0")
    assert res.returncode == 2 and "argument --val_per_class: needs a whole number >= 1, got 0" in res.stderr


def test_study_baselines_flags_are_checked(tmp_path):
    for flag, value in (("--crop_pct", "0"), ("--crop_min", "1.5")):
        flags = {"--crop_pct": "1", "--crop_min": "0.5", flag: value}
        res = run_script(os.path.join("experiments", "fashion_mnist", "baselines.py"), "--train", "1:0=d", "--val",
                         "v", "--test", "t", "--checkpoint", "c", "--epochs", "1=1", "--log", "l",
                         *[x for kv in flags.items() for x in kv])
        assert res.returncode == 2 and f"argument {flag}: needs 0 < value <= 1, got {float(value)}" in res.stderr
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    res = run_script(os.path.join("experiments", "fashion_mnist", "baselines.py"), "--train", "1:0=d", "--val", "v",
                     "--test", "t", "--checkpoint", "c", "--epochs", "1=1", "--crop_pct", "1", "--crop_min", "0.5",
                     "--log", str(blocker / "log.txt"))
    assert res.returncode == 2 and f"argument --log: cannot make {blocker / 'fits'}" in res.stderr


def test_study_baselines_flags_are_parsed_whole(tmp_path):
    """--train, --epochs, --max_iter and --input_size: each malformed, repeated or missing value named, exit 2."""
    base = {"--train": ["1:0=d", "10:0=e"], "--epochs": ["1=5", "10=2"], "--max_iter": ["50"], "--input_size": ["28"]}
    cases = [("--train", ["1:0=d", "1:0=e"], "argument --train: 1:0 given twice"),
             ("--train", ["1-0=d"], "argument --train: 1-0=d: expected PERCENT:DRAW=DIR"),
             ("--epochs", ["1=5"], "argument --epochs: no epochs for 10% (given in --train)"),
             ("--epochs", ["1=5", "10=x"], "argument --epochs: 10=x: expected PERCENT=N"),
             ("--epochs", ["1=5", "10=0"], "argument --epochs: 10=0: expected PERCENT=N"),
             ("--epochs", ["1=5", "10"], "argument --epochs: 10: expected PERCENT=N"),
             ("--epochs", ["1=5", "10=2", "1=3"], "argument --epochs: 1=3: expected PERCENT=N, N >= 1, each percent "
              "once"),
             ("--max_iter", ["0"], "argument --max_iter: must be >= 1, got 0"),
             ("--input_size", ["-3"], "argument --input_size: must be >= 1, got -3"),
             ("--input_size", ["30"], "argument --input_size: img_size 30 is not divisible by patch_size 4")]
    for flag, values, message in cases:
        flags = {**base, flag: values}
        res = run_script(os.path.join("experiments", "fashion_mnist", "baselines.py"), "--val", "v", "--test", "t",
                         "--checkpoint", "c", "--crop_pct", "1", "--crop_min", "0.5", "--log", str(tmp_path / "l"),
                         *[x for k, v in flags.items() for x in (k, *v)])
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, (flag, res.stderr)


def test_study_pictures_keep_every_point_on_the_accuracy_axis():
    """The axis starts at 60 unless a point (mean - std) lies lower: then at the multiple of 5 below it, 0 at
    the lowest; the label states it."""
    report = _study_module("report")

    assert [report.axis_base(points) for points in ([83.7, 91.2], [72.1, 57.3], [55.0], [-3.0, 20.0], [])] == \
        [60, 55, 55, 0, 60]


def test_study_logs_refuse_what_they_cannot_read_whole(tmp_path):
    """A log line the study computes on that is not a whole record (bad JSON, a field missing or of the wrong
    type, a baseline given twice) is refused naming the file, line and field; a last line cut off by a kill is
    left out, and baselines.py cuts it from its log before it appends. So do a broken wall-clock record and
    a run whose last epoch has no validation top-1."""
    sys.path.insert(0, os.path.join(ROOT, "experiments", "fashion_mnist"))
    import cores
    import records
    from util.errors import Error

    good = {"method": "knn_mae", "percent": "10", "draw": 1, "train_images": 500,
            "setting": {"k": 5, "features": "mae_avg"}, "val_acc1": 80.5, "test_acc1": 79.25}
    path = tmp_path / "log.txt"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "draw": 2})[:40])
    assert records.read_baselines(str(path)) == ([good], True)
    bad = [({**good, "method": "svm"}, "'method' 'svm' is not one of"), ({**good, "percent": 10}, "'percent'"),
           ({**good, "draw": -1}, "'draw'"), ({**good, "draw": True}, "'draw'"),
           ({**good, "setting": None}, "'setting'"),
           ({**good, "setting": {"k": 2.5, "features": "mae_avg"}}, "'setting' is not {'k': a whole number > 0"),
           ({**good, "setting": {"k": 5, "features": "pixels"}},
            "'setting' is not {'k': a whole number > 0, 'features': one of mae_cls, mae_avg}"),
           ({**good, "setting": {"k": 5, "features": "mae_avg", "C": 1}}, "'setting'"),
           ({**good, "method": "cnn", "setting": {"lr": 0, "features": "pixels"}}, "'setting' is not {'lr': a number"),
           ({**good, "val_acc1": "80"}, "'val_acc1'"), ({**good, "test_acc1": 101.0}, "'test_acc1'"),
           ({k: v for k, v in good.items() if k != "test_acc1"}, "'test_acc1'"), ([1, 2], "not a JSON object"),
           ({**good, "draw": 0}, "knn_mae at 10% draw 0 again (first on line 1)")]
    for row, message in bad:
        path.write_text(json.dumps({**good, "draw": 0}) + "\n\n" + json.dumps(row) + "\n" + json.dumps(good) + "\n")
        with pytest.raises(Error, match=re.escape(f"{path} line 3: {message}")):
            records.read_baselines(str(path))
    path.write_text("{\"epoch\": 0, \"train_loss\": 1.5}\nnot json\n")
    with pytest.raises(Error, match=re.escape(f"{path} line 2: not a JSON object")):
        records.read_log(str(tmp_path))
    for row, message in (({"epoch": 0.5, "train_loss": 1.0}, "'epoch'"), ({"epoch": 0}, "'train_loss'"),
                         ({"epoch": 0, "train_loss": 1.0, "test_acc1": None}, "'test_acc1'")):
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(Error, match=re.escape(f"{path} line 1: {message}")):
            records.read_log(str(tmp_path))
    path.write_text("{\"epoch\": 0, \"train_loss\": 1.5}\n{\"epoch\": 1, \"train_lo")
    assert records.read_log(str(tmp_path)) == [{"epoch": 0, "train_loss": 1.5}]  # a cut line: that epoch runs again
    with pytest.raises(Error, match=re.escape(f"{path}: its last epoch has no validation top-1")):
        records.last_val(str(tmp_path), records.read_log(str(tmp_path)))
    for text in ("", "12.5\nx\n", "1\n2\n3\n", "-4\n"):
        (tmp_path / "wall_clock.txt").write_text(text)
        with pytest.raises(Error, match=re.escape(f"{tmp_path / 'wall_clock.txt'}: expected the wall clock")):
            cores.clocks(str(tmp_path))
    (tmp_path / "wall_clock.txt").write_text("90.0\n45.0\n")
    assert cores.clocks(str(tmp_path)) == (90.0, 45.0)

    log = tmp_path / "baselines" / "log.txt"
    log.parent.mkdir()
    log.write_text(json.dumps(good) + "\n" + json.dumps({**good, "draw": 2})[:40])
    res = run_script(os.path.join("experiments", "fashion_mnist", "baselines.py"), "--train", "10:1=d", "--val",
                     str(tmp_path / "no_val"), "--test", "t", "--checkpoint", "c", "--epochs", "10=1", "--crop_pct",
                     "1", "--crop_min", "0.5", "--log", str(log))
    assert res.returncode == 1 and f"{log}: its last line was cut off" in res.stdout
    assert f"error: {tmp_path / 'no_val'}: dataset folder not found" in res.stderr
    assert log.read_text() == json.dumps(good) + "\n"
    log.write_text(json.dumps(good) + "\n" + json.dumps({**good, "setting": {"k": 0, "features": "mae_avg"}}) + "\n")
    res = run_script(os.path.join("experiments", "fashion_mnist", "baselines.py"), "--train", "10:1=d", "--val",
                     "v", "--test", "t", "--checkpoint", "c", "--epochs", "10=1", "--crop_pct", "1", "--crop_min",
                     "0.5", "--log", str(log))
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith(f"error: {log} line 2: 'setting'")
    assert "Traceback" not in res.stderr

    data, out = tmp_path / "data", tmp_path / "out"  # run.py ends with the line too
    demo_subset(str(data), {"train": 45, "val": 10})
    (out / "pretrain_e1").mkdir(parents=True)
    (out / "pretrain_e1" / "wall_clock.txt").write_text("1.5\nx\n")
    res = run_script(DRIVER, "--smoke", "--data", str(data), "--out", str(out), "--stages", "pretrain")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().endswith(f"error: {out / 'pretrain_e1' / 'wall_clock.txt'}: expected the wall clock "
                                       "and the machine time in seconds, one a line")


def test_study_baselines_refuse_folders_that_disagree(tmp_path):
    """Every folder the baselines read holds --val's classes (or a label would mean another class) and images
    of one size (they are compared pixel by pixel)."""
    sys.path.insert(0, os.path.join(ROOT, "experiments", "fashion_mnist"))
    import baselines
    from PIL import Image
    from util.errors import DataError

    for name, classes in (("val", ("a", "b")), ("test", ("a", "c"))):
        for c in classes:
            (tmp_path / name / c).mkdir(parents=True)
            for i in range(2):
                Image.new("L", (8, 8), 40 * i).save(tmp_path / name / c / f"{i}.png")
    images, labels = baselines.load_folder(str(tmp_path / "val"))
    assert images.shape == (4, 8, 8, 3) and labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(DataError, match="class folders differ from those of v: missing b; extra c"):
        baselines.load_folder(str(tmp_path / "test"), ["a", "b"], "v")
    Image.new("L", (9, 8)).save(tmp_path / "val" / "b" / "2.png")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'val' / 'b' / '2.png'}: 9x8 pixels, where ")):
        baselines.load_folder(str(tmp_path / "val"))


def test_study_splits_are_finished_or_refused(tmp_path, monkeypatch):
    """A split folder left part-built (links missing, a copy cut off, no record) is finished on the next
    start; one holding a file the study would not put there, or made before its images changed, is refused
    naming the file. Where the file system has no hard links the study copies, and checks the copies' bytes."""
    sys.path.insert(0, os.path.join(ROOT, "experiments", "fashion_mnist"))
    import splits
    from util.errors import DataError

    data = demo_subset(str(tmp_path / "data"), {"train": 12})
    dev = splits.development_folder(data, 2)
    built = _files(dev) | {"split.txt"}
    record = (tmp_path / "data_dev" / "split.txt").read_text()
    first = sorted(_files(dev))[0]
    os.remove(os.path.join(dev, first))
    os.remove(os.path.join(dev, "split.txt"))
    open(os.path.join(dev, first) + ".tmp", "wb").close()
    assert splits.development_folder(data, 2) == dev
    assert _files(dev) | {"split.txt"} == built and (tmp_path / "data_dev" / "split.txt").read_text() == record
    assert not [f for _, _, fs in os.walk(dev) for f in fs if f.endswith(".tmp")]
    assert os.path.samefile(os.path.join(dev, first), os.path.join(data, "train", first.split(os.sep, 1)[1]))

    extra = os.path.join(dev, "val", os.listdir(os.path.join(dev, "val"))[0], "stray.png")
    open(extra, "wb").close()
    with pytest.raises(DataError, match=re.escape(f"{extra}: not an image of this split, so {dev} was made from")):
        splits.development_folder(data, 2)
    os.remove(extra)
    image = sorted(_files(os.path.join(data, "train")))[3]
    os.remove(os.path.join(data, "train", image))  # the images prepared again: new files under the same names
    demo_subset(str(tmp_path / "again"), {"train": 12})
    shutil.copy(os.path.join(tmp_path, "again", "train", image), os.path.join(data, "train", image))
    splits.development_folder(data, 2)  # the same bytes: still this split
    with open(os.path.join(data, "train", image), "ab") as f:
        f.write(b"!")
    with pytest.raises(DataError, match=r"data_dev/(train|val)/.* not .*, so .* was made from other images"):
        splits.development_folder(data, 2)

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    subset = splits.label_subset_folder(dev, 10, 0)
    files = sorted(_files(os.path.join(subset, "train")))
    assert len(files) == 20 and not os.path.samefile(os.path.join(subset, "train", files[0]),
                                                     os.path.join(dev, "train", files[0]))
    assert splits.label_subset_folder(dev, 10, 0) == subset  # copies with the same bytes pass
    with open(os.path.join(dev, "train", files[0]), "ab") as f:
        f.write(b"!")
    with pytest.raises(DataError, match=re.escape(f"{os.path.join(subset, 'train', files[0])}: not ")):
        splits.label_subset_folder(dev, 10, 0)


def test_study_baselines_fit_a_method_that_draws_nothing_once_per_folder():
    """Logistic regression and kNN on a draw with an earlier draw's training folder and setting (at 100% every
    draw has all the labels) repeat that draw's line; another folder or setting, or the CNN, is fitted."""
    sys.path.insert(0, os.path.join(ROOT, "experiments", "fashion_mnist"))
    import baselines

    setting = {"C": 1.0, "features": "pixels"}
    first = {"method": "logreg_pixels", "percent": "100", "draw": 0, "setting": setting, "test_acc1": 80.0}
    fractions = {("100", 0): "d/dev/train", ("100", 1): "d/dev/./train", ("100", 2): "d/other/train"}
    rows = {("logreg_pixels", "100", 0): first, ("cnn", "100", 0): {**first, "method": "cnn"}}
    assert baselines.same_fit(rows, "logreg_pixels", "100", 1, setting, fractions) == first
    assert baselines.same_fit(rows, "logreg_pixels", "100", 2, setting, fractions) is None  # another folder
    assert baselines.same_fit(rows, "logreg_pixels", "100", 1, {**setting, "C": 10.0}, fractions) is None
    assert baselines.same_fit(rows, "cnn", "100", 1, setting, fractions) is None  # the CNN draws its seed
    assert baselines.same_fit(rows, "knn_pixels", "100", 1, setting, fractions) is None  # no earlier line


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
    # the ViTs' training transform for the CNN: grey rows in [0, 1], a seeded draw, crops that move the content
    raw = np.repeat((images[:8].reshape(-1, 28, 28, 1).clip(0, 1) * 255).astype(np.uint8), 3, axis=3)
    rows = [baselines.vit_augmentation(raw, 28, 0.2, seed)(np.arange(8)) for seed in (0, 0, 1)]
    assert rows[0].shape == (8, 784) and rows[0].min() >= 0 and rows[0].max() <= 1
    assert np.array_equal(rows[0], rows[1]) and not np.array_equal(rows[0], rows[2])
    assert not np.allclose(rows[0], baselines.pixels(raw), atol=0.1)
    # another --input_size: the augmentation gives that size, the CNN takes its side from the rows
    big = baselines.vit_augmentation(raw, 32, 0.2, 0)
    assert big(np.arange(8)).shape == (8, 1024)
    model, _ = cnn.train(np.zeros((8, 1024), np.float32), labels[:8], 2, 1e-3, 1, seed=0, batch_size=4, augment=big)
    assert cnn.predict(model, np.zeros((5, 1024), np.float32)).shape == (5,)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("augmented", [False, True])
def test_study_cnn_fit_resumes_bit_for_bit(tmp_path, monkeypatch, augmented):
    """A CNN fit stopped after a checkpoint and started again ends with the uninterrupted fit's weights and
    loss, bit for bit (batch order, dropout and the ViTs' augmentation all drawn on); a finished file is read,
    not trained again; a file of another fit or an unreadable one is refused, naming the file."""
    sys.path.insert(0, os.path.join(ROOT, "experiments", "fashion_mnist"))
    import baselines
    import cnn
    from util.errors import CheckpointError

    rng = np.random.default_rng(3)
    x, y = rng.random((200, 784)).astype(np.float32), rng.integers(0, 3, 200)
    raw = np.repeat((x.reshape(-1, 28, 28, 1) * 255).astype(np.uint8), 3, axis=3)

    def fit(**kw):
        augment = baselines.vit_augmentation(raw, 28, 0.5, 7) if augmented else None
        return cnn.train(x, y, 3, 3e-3, 5, seed=7, batch_size=64, augment=augment, **kw)

    whole, whole_loss = fit()
    path, save, saves = str(tmp_path / "fit.pd"), cnn.save_fit, []

    def save_then_stop(*args):
        save(*args)
        saves.append(args[2])
        if len(saves) == 2:
            raise _Stop

    monkeypatch.setattr(cnn, "save_fit", save_then_stop)
    with pytest.raises(_Stop):
        fit(checkpoint=path, save_every=0.0)
    assert saves == [1, 2]
    resumed, loss = fit(checkpoint=path, save_every=0.0)
    assert saves == [1, 2, 3, 4, 5] and loss == whole_loss
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy()), name
    monkeypatch.setattr(cnn, "save_fit", save)
    train_step = paddle.optimizer.Adam.step
    monkeypatch.setattr(paddle.optimizer.Adam, "step", lambda self: pytest.fail("a finished fit trained again"))
    again, again_loss = fit(checkpoint=path)
    assert again_loss == whole_loss and np.array_equal(again.state_dict()["classifier.4.weight"].numpy(),
                                                       whole.state_dict()["classifier.4.weight"].numpy())
    monkeypatch.setattr(paddle.optimizer.Adam, "step", train_step)
    with pytest.raises(CheckpointError, match=f"{re.escape(path)}: a fit with epochs 5, this one has 6"):
        cnn.train(x, y, 3, 3e-3, 6, seed=7, batch_size=64, checkpoint=path)
    with pytest.raises(CheckpointError, match=f"{re.escape(path)}: a fit with images 200, this one has 100"):
        cnn.train(x[:100], y[:100], 3, 3e-3, 5, seed=7, batch_size=64, checkpoint=path)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=re.escape(path)):
        fit(checkpoint=path)


def test_study_cnn_fit_refuses_malformed_fields(tmp_path):
    """Every field of a CNN fit's file, missing or of the wrong type or shape, is refused naming the file and
    the field, before training: none is loaded in part or skipped."""
    sys.path.insert(0, os.path.join(ROOT, "experiments", "fashion_mnist"))
    import cnn
    from util.errors import CheckpointError
    from util.weights import load_file, save_file

    rng = np.random.default_rng(3)
    x, y = rng.random((100, 784)).astype(np.float32), rng.integers(0, 3, 100)
    good = str(tmp_path / "good.pd")
    cnn.train(x, y, 3, 3e-3, 2, seed=7, batch_size=50, checkpoint=good)
    ckpt, _ = load_file(good)
    weights = dict(ckpt["model"])
    weights["classifier.4.bias"] = np.zeros(4, np.float32)
    bad = {"epoch": ("two", 0, 3), "loss": (None, "0.5"), "model": ([1], weights, {"a": np.zeros(1)}),
           "optimizer": (3, {"state": {"classifier.4.bias": 1}}), "schedule": ([1],), "order_rng": ("x",),
           "dropout_rng": ([1, 2],), "augment_rng": ([3],)}
    path = str(tmp_path / "bad.pd")
    for key, values in bad.items():
        for value in (*values, "missing"):
            broken = {k: v for k, v in ckpt.items() if k != key or value != "missing"}
            if value != "missing":
                broken[key] = value
            save_file(broken, path)
            if key == "model" and isinstance(value, dict):  # the weights' own check names every key
                named = " does not fit SmallCNN: " + ("shape mismatch: classifier.4.bias" if value is weights
                                                     else "missing keys: features.0.weight")
            else:
                named = f": '{key}' "
            with pytest.raises(CheckpointError, match=re.escape(path + named)):
                cnn.train(x, y, 3, 3e-3, 2, seed=7, batch_size=50, checkpoint=path)


def test_study_wall_clock_leaves_out_stopped_time(tmp_path):
    """A run's wall_clock.txt counts the seconds it ran, not the seconds the study was stopped (SIGSTOP)."""
    sleeper = "[sys.executable, '-c', 'import time\\nfor _ in range(30): time.sleep(0.1)']"
    driver = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.join(ROOT, DRIVER))!r}); import run, cores; "
              f"cores.TICK = 0.2; cores.timed_call({sleeper}, "
              f"{str(tmp_path / 'run')!r}, {str(tmp_path / 'run.stdout')!r})")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT, start_new_session=True)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGSTOP)
    time.sleep(4.0)
    os.killpg(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=60) == 0
    elapsed = time.monotonic() - start
    counted, machine = map(float, (tmp_path / "run" / "wall_clock.txt").read_text().split())
    assert elapsed > 6.5 and 2.9 <= counted < elapsed - 3.0  # 3 s of sleeps, 4 s stopped
    assert machine == counted  # it had all the cores


def _study_module(name="run"):
    """A module of the study (run.py first: it puts the repository on the path)."""
    sys.path.insert(0, os.path.join(ROOT, "experiments", "fashion_mnist"))
    importlib.import_module("run")
    return importlib.import_module(name)


def test_study_runs_are_pinned_to_their_cores(tmp_path):
    """A run on some of the cores sees only those (its threads and loader workers inherit them), and its
    machine time is its wall clock times its share."""
    cores = _study_module("cores")
    everything = sorted(os.sched_getaffinity(0))
    show = [sys.executable, "-c",
            "import os, time; time.sleep(0.5); print('affinity', sorted(os.sched_getaffinity(0)))"]
    for share in ([everything[-1]], None):
        folder, stdout = tmp_path / f"run{share}", tmp_path / f"run{share}.stdout"
        cores.timed_call(show, str(folder), str(stdout), share)
        text = stdout.read_text()
        assert f"affinity {share or everything}" in text
        assert text.startswith(f"[cores {','.join(map(str, share or everything))} of {len(everything)}]")
        wall, machine = cores.clocks(str(folder))
        assert wall >= 0.5 and machine == pytest.approx(wall * len(share or everything) / len(everything), abs=0.1)
    (tmp_path / "whole").mkdir()
    (tmp_path / "whole" / "wall_clock.txt").write_text("12.5\n")  # one line: the run had every core
    assert cores.clocks(str(tmp_path / "whole")) == (12.5, 12.5)


def _bare_study(run, out, jobs):
    """A Study of `jobs` runs at a time, each on all the cores, writing to `out`, without the data it
    would prepare."""
    study = run.Study.__new__(run.Study)
    study.out, study.c, study.jobs = str(out), {"batch": 8, "workers": {10: 0}}, jobs
    study.shares = _study_module("cores").Shares([sorted(os.sched_getaffinity(0))] * jobs)
    study.rank = threading.local()
    study.runs, study.stage_of, study.current = {}, {}, None
    study.locks, study.locks_lock, study.wanted = {}, threading.Lock(), {}
    study.stopping, study.failure = threading.Event(), None
    return study


def _ranked(rank):
    """A waiting run's rank for Shares.take, not rising while it waits."""
    return lambda: rank


def test_study_shares_go_to_the_earliest_part_first(monkeypatch):
    """A freed share of the cores goes to the waiting run of the earliest-listed part, whatever the order
    the runs asked in; runs of one part in the order they asked."""
    cores = _study_module("cores")
    monkeypatch.setattr(cores, "HOLD", 0.0)
    shares = cores.Shares(["a"])
    held = shares.take(_ranked(0))
    given, threads = [], []
    for rank, label in ((5, "curve"), (1, "scratch 1st"), (3, "seeds"), (1, "scratch 2nd")):
        def wait_and_take(rank=rank, label=label):
            share = shares.take(_ranked(rank))
            given.append(label)
            shares.give(share, rank)
        threads.append(threading.Thread(target=wait_and_take))
        threads[-1].start()
        while len(shares.waiting) < len(threads):  # each asks before the next one does
            time.sleep(0.01)
    shares.give(held, 0)
    for t in threads:
        t.join(10)
    assert given == ["scratch 1st", "scratch 2nd", "seeds", "curve"]
    assert [s for s, _, _ in shares.free] == ["a"] and not shares.waiting


def test_study_a_freed_share_waits_for_its_part_next_run(monkeypatch):
    """A chain of runs (a recipe's steps) keeps its share from one run to the next although a later-listed
    part's run was waiting first; a share its part does not ask for again goes to the waiting run after
    HOLD seconds."""
    cores = _study_module("cores")
    monkeypatch.setattr(cores, "HOLD", 1.0)
    shares = cores.Shares(["a"])
    held = shares.take(_ranked(3))
    got = []
    waiter = threading.Thread(target=lambda: got.append((shares.take(_ranked(6)), time.monotonic())))
    waiter.start()
    while not shares.waiting:
        time.sleep(0.01)
    shares.give(held, 3)
    time.sleep(0.2)  # the chain works out its next run
    assert shares.take(_ranked(3)) == "a" and not got
    shares.give("a", 3)
    given = time.monotonic()
    waiter.join(10)
    assert got and got[0][0] == "a" and 0.9 <= got[0][1] - given < 5

    shares = cores.Shares(["a"])  # at a start: the shares wait, then go to the earliest-listed part
    shares.hold(1.0)
    order = []
    late = threading.Thread(target=lambda: order.append(shares.take(_ranked(7))))
    late.start()
    while not shares.waiting:
        time.sleep(0.01)
    assert shares.take(_ranked(2)) == "a" and not order
    shares.give("a", 2)
    late.join(10)
    assert order == ["a"]


def test_study_a_run_ranks_as_the_earliest_part_that_needs_it(tmp_path, monkeypatch):
    """A run a later-listed part asked for first (a sweep a second seed's part needs) takes a freed share
    before another part's run once an earlier-listed part (the comparison) comes to wait for it too."""
    run = _study_module()
    monkeypatch.setattr(_study_module("cores"), "HOLD", 0.0)
    study = _bare_study(run, tmp_path, 1)
    held = study.shares.take(_ranked(0))
    trained = []

    def part(rank, name):
        study.rank.value = rank
        with study.lock(name):
            if name not in trained:
                study.call(name, [sys.executable, "-c", ""], str(tmp_path / name), str(tmp_path / f"{name}.out"))
                trained.append(name)

    threads = []
    for rank, name, asked in ((8, "sweep", lambda: len(study.shares.waiting) == 1),
                              (5, "other", lambda: len(study.shares.waiting) == 2),
                              (2, "sweep", lambda: len(study.wanted["sweep"]) == 2)):
        threads.append(threading.Thread(target=part, args=(rank, name)))
        threads[-1].start()
        while not asked():  # each asks before the next one does
            time.sleep(0.01)
    study.shares.give(held, 0)
    for t in threads:
        t.join(30)
    assert trained == ["sweep", "other"]
    assert study.wanted == {"sweep": [], "other": []} and not study.shares.waiting


def test_study_run_many_stops_the_others_on_a_failure(tmp_path, monkeypatch):
    """Runs side by side: one that fails ends the call within a tick, the other stopped (not waited for), and
    a run waiting for a share of the cores never starts."""
    run = _study_module()
    monkeypatch.setattr(_study_module("cores"), "TICK", 0.2)
    study = _bare_study(run, tmp_path, 2)
    marker = f"sleeper-{os.getpid()}-{time.time_ns()}"
    started = tmp_path / "started"
    scripts = {"sleep": f"import time; time.sleep(120)  # {marker}", "fail": "import time; time.sleep(1); exit(3)",
               "later": f"open({str(started)!r}, 'w').close()"}

    def fake_run(what):
        with study.lock(what):
            study.call(what, [sys.executable, "-c", scripts[what]], str(tmp_path / what), str(tmp_path / f"{what}.out"))
        return what

    monkeypatch.setattr(study, "run", fake_run, raising=False)
    monkeypatch.setattr(study, "spec", lambda what: (what,), raising=False)
    start = time.monotonic()
    with pytest.raises(SystemExit, match="error: fail failed"):
        study.run_many([("sleep",), ("fail",)])
    assert time.monotonic() - start < 30
    assert not _study_module("cores").LIVE
    alive = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert not alive
    assert study.run_many([]) == []

    study = _bare_study(run, tmp_path, 2)  # three parts of stages side by side: the third waits for a share
    with pytest.raises(SystemExit, match="error: fail failed"):
        study.together([lambda: fake_run("sleep"), lambda: fake_run("fail"), lambda: fake_run("later")], 3)
    assert (tmp_path / "later.out").read_text().startswith("[cores ")  # it had its share and did not start
    assert not started.exists() and not _study_module("cores").LIVE


def test_study_tests_each_run_as_soon_as_it_is_trained(tmp_path, monkeypatch):
    """The checkpoint a test reads is not kept with the logs: each run of a comparison is tested before the
    next one trains, so a machine that ends part-way loses no finished run."""
    run = _study_module()
    study = _bare_study(run, tmp_path, 1)
    events = []
    monkeypatch.setattr(study, "spec", lambda method, percent, draw, *_: (f"{method}{percent}_{draw}",), raising=False)
    monkeypatch.setattr(study, "run", lambda *call: events.append(("train", call[:3])) or study.spec(*call)[0],
                        raising=False)
    monkeypatch.setattr(study, "test", lambda name: events.append(("test", name)), raising=False)
    study.test_all([("scratch", 10, d, {}) for d in (0, 1)] + [("scratch", 100, 0, {})])
    assert events == [("train", ("scratch", 100, 0)), ("test", "scratch100_0"), ("train", ("scratch", 10, 0)),
                      ("test", "scratch10_0"), ("train", ("scratch", 10, 1)), ("test", "scratch10_1")]
    assert list(study.runs) == ["scratch100_0", "scratch10_0", "scratch10_1"]


def test_study_trains_a_run_again_whose_checkpoint_is_gone(tmp_path):
    """A run trained on another machine comes with its logs but not its checkpoint: testing it trains it again
    (its first log kept), then tests the new checkpoint once."""
    run = _study_module()
    script = tmp_path / "fake_train.py"
    script.write_text(
        "import json, os, sys\n"
        "if '--eval' in sys.argv:\n"
        "    print('* Acc@1 77.700', open(sys.argv[sys.argv.index('--resume') + 1]).read())\n"
        "    sys.exit()\n"
        "out = sys.argv[sys.argv.index('--output_dir') + 1]\n"
        "open(os.path.join(out, 'starts'), 'a').write('x')\n"
        "open(os.path.join(out, 'checkpoint-last.pd'), 'w').write('weights')\n"
        "with open(os.path.join(out, 'log.txt'), 'a') as f:\n"
        "    f.writelines(json.dumps({'epoch': e, 'train_loss': 1.0, 'test_acc1': 50.0}) + '\\n' for e in range(2))\n")
    study = _bare_study(run, tmp_path, 1)
    study.data = str(tmp_path)
    flags = [str(script), "--model", "vit", "--crop_pct", "1"]
    study.train("moved", flags, 2, 10)
    os.remove(tmp_path / "moved" / "checkpoint-last.pd")
    assert study.test("moved") == 77.7
    assert (tmp_path / "moved" / "starts").read_text() == "xx"
    read_log = _study_module("records").read_log
    assert len(read_log(str(tmp_path / "moved"))) == 2 and (tmp_path / "moved" / "log.first.txt").is_file()
    assert study.test("moved") == 77.7 and (tmp_path / "moved" / "starts").read_text() == "xx"


def test_study_parts_side_by_side_train_a_shared_run_once(tmp_path):
    """Two parts of the study that need the same run (the curve's main point is the comparison's run) train
    it once: the second waits for it and finds it done."""
    run = _study_module()
    script = tmp_path / "fake_train.py"
    script.write_text(
        "import json, os, sys, time\n"
        "out = sys.argv[sys.argv.index('--output_dir') + 1]\n"
        "epochs = int(sys.argv[sys.argv.index('--epochs') + 1])\n"
        "open(os.path.join(out, 'starts'), 'a').write('x')\n"
        "time.sleep(1)\n"
        "with open(os.path.join(out, 'log.txt'), 'w') as f:\n"
        "    f.writelines(json.dumps({'epoch': e, 'train_loss': 1.0, 'test_acc1': 50.0}) + '\\n'"
        " for e in range(epochs))\n")
    study = _bare_study(run, tmp_path, 2)
    train = partial(study.train, "shared", [str(script)], 3, 10)
    assert study.together([train, train, partial(study.train, "other", [str(script)], 2, 10)], 3) == [
        "shared", "shared", "other"]
    read_log = _study_module("records").read_log
    assert (tmp_path / "shared" / "starts").read_text() == "x" and len(read_log(str(tmp_path / "shared"))) == 3
    assert (tmp_path / "other" / "starts").read_text() == "x"


def test_study_stages_side_by_side_after_the_main_pretraining(tmp_path, monkeypatch):
    """With two shares, parts of different stages train at the same time, all after the main pre-training;
    the pass in order that follows starts from an empty list of runs."""
    run = _study_module()
    study = _bare_study(run, tmp_path, 2)
    spans = {}

    def part(label):
        out = tmp_path / f"{label}.times"
        with study.lock(label):
            study.call(label, [sys.executable, "-c", f"import time; a = time.time(); time.sleep(1); "
                       f"open({str(out)!r}, 'w').write(f'{{a}} {{time.time()}}')"], str(tmp_path / label),
                       str(tmp_path / f"{label}.out"))
        spans[label] = tuple(map(float, out.read_text().split()))
        study.runs[label] = None

    groups = {"pretrain": ["main"], "compare": ["scratch"], "curve": ["point"]}
    monkeypatch.setattr(study, "parts", lambda group: [partial(part, label) for label in groups[group]])
    monkeypatch.setattr(run, "START", 1.0)
    study.stages_together(["pretrain", "compare", "curve"])
    assert spans["main"][1] + 1.0 <= min(spans["scratch"][0], spans["point"][0])
    assert max(spans["scratch"][0], spans["point"][0]) < min(spans["scratch"][1], spans["point"][1])
    assert study.runs == {} and study.stage_of == {}


def test_study_grid_goes_on_past_the_end_holding_the_best(monkeypatch, tmp_path):
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

    # a run whose training loss rose above twice chance level's diverged: it is never the choice
    study = run.Study.__new__(run.Study)
    study.out = str(tmp_path)
    for name, losses in (("calm", (2.3, 1.0, 0.9)), ("wild", (2.3, 4.7, 1.2))):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "log.txt").write_text("".join(json.dumps({"train_loss": v, "test_acc1": 70.0, "epoch": i})
                                                         + "\n" for i, v in enumerate(losses)))
    assert study.score("calm") == 70.0 and study.score("wild") == -1.0

    # a baseline's sweep: here the validation top-1 grows with k up to k = 200, so the grid goes on past 50
    def fit(kind, setting, x, y, classes, epochs, seed, max_iter, crop_min, checkpoint):
        return (lambda v: (np.arange(len(v)) >= min(setting["k"], 200)).astype(np.int64)), {}

    monkeypatch.setattr(baselines, "fit", fit)
    data = ({"pixels": np.zeros((300, 2))}, np.zeros(300, np.int64))
    row = baselines.run("knn_pixels", "1", 0, data, data, data, 2, 1, None, 10, 0.5)
    assert [s["setting"]["k"] for s in row["sweep"]] == [1, 3, 5, 10, 20, 50, 125, 312, 779]
    assert row["setting"] == {"k": 312, "features": "pixels"} and row["val_acc1"] == pytest.approx(200 / 3)
