"""The Fashion-MNIST study driver end to end on a few hundred images, one epoch per stage."""
import json
import os
import shutil

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
    expected = {f"{kind}_{r}" for kind in ("pretrain", "linprobe") for r in (0.25, 0.5, 0.75, 0.9)}
    expected |= {"finetune_0.75", "linprobe_random_init", "finetune_from_scratch"}
    assert set(results) == expected
    for name, entry in results.items():
        logs = [json.loads(line) for line in open(entry["log"])]
        assert entry["epochs"] == len(logs) == 1 and entry["final_train_loss"] == logs[-1]["train_loss"]
        assert ("final_acc1" in entry) == (not name.startswith("pretrain"))
        assert entry["command"].startswith("python main_") and entry["wall_clock_s"] > 0
    for what, pair in (("linear probe", ("linprobe_0.75", "linprobe_random_init")),
                       ("fine-tune", ("finetune_0.75", "finetune_from_scratch"))):
        c = report["comparisons"][what]
        assert (c["mae"], c["baseline"]) == tuple(results[s]["final_acc1"] for s in pair)
        assert c["difference"] == c["mae"] - c["baseline"]
    table = open(os.path.join(out, "results.md")).read()
    assert "| linprobe_0.75 | 1 |" in table
    assert open(os.path.join(out, "README.md")).read() == (
        f"intro\n<!-- results: written by run.py -->\n{table}<!-- end of results -->\nconclusions\n")
    for picture in ("loss_curves.png", "reconstruction.png"):
        assert os.path.getsize(os.path.join(out, picture)) > 0
    again = run_script(DRIVER, "--smoke", "--data", data, "--out", out, "--stages", "linprobe_0.75")
    assert again.returncode == 0 and "[linprobe_0.75] done already" in again.stdout
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
