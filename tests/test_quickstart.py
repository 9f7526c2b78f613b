"""The README's first command: demo/quickstart.sh end to end, with one epoch per stage."""
import json
import os

import pytest
from PIL import Image

from helpers import run_script


def recording_pip(folder):
    """A `pip` first on PATH that records its arguments and standard input, and fails."""
    os.makedirs(folder)
    with open(os.path.join(folder, "pip"), "w") as f:
        f.write(f"#!/bin/sh\necho \"$@\" >> {folder}/calls\ncat >> {folder}/stdin\nexit 1\n")
    os.chmod(os.path.join(folder, "pip"), 0o755)
    return {"PATH": f"{folder}:{os.environ['PATH']}"}


QUICKSTART = ("-c", "import subprocess, sys; sys.exit(subprocess.call(['bash', 'demo/quickstart.sh']))")


@pytest.mark.slow
def test_quickstart_runs_every_stage(tmp_path):
    out = str(tmp_path / "qs")
    env = {"OUTPUT_DIR": out, "PRETRAIN_EPOCHS": "1", "FINETUNE_EPOCHS": "1", "LINPROBE_EPOCHS": "1",
           **recording_pip(str(tmp_path / "bin"))}
    res = run_script(*QUICKSTART, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert not os.path.exists(tmp_path / "bin" / "calls")  # everything importable: nothing installed
    for stage in ("1/6", "2/6", "3/6", "4/6", "5/6", "6/6"):
        assert f"=== {stage}" in res.stdout
    assert "* Acc@1" in res.stdout and "1. " in res.stdout
    assert Image.open(os.path.join(out, "reconstruction.png")).size == (6 * 128, 6 * 96 + 24)  # --scale 6, headings
    for stage in ("pretrain", "finetune", "linprobe"):
        assert [json.loads(line)["epoch"] for line in open(os.path.join(out, stage, "log.txt"))] == [0]
    assert os.path.isfile(os.path.join(out, "finetune", "checkpoint-best.pd"))


def test_quickstart_installs_what_is_missing_but_never_paddle(tmp_path):
    """Paddle importable (a GPU build, say), another requirement missing: only the others are installed."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "simplejpeg.py").write_text("raise ImportError('not installed')\n")
    env = {"PYTHONPATH": f"{shadow}:{os.environ.get('PYTHONPATH', '')}", **recording_pip(str(tmp_path / "bin"))}
    res = run_script(*QUICKSTART, env=env, timeout=120)
    assert res.returncode != 0 and "=== 1/6" not in res.stdout  # the recording pip fails: the script stops
    assert open(tmp_path / "bin" / "calls").read().split() == ["install", "-q", "-r", "/dev/stdin"]
    wanted = open(tmp_path / "bin" / "stdin").read()
    assert "simplejpeg" in wanted and "paddlepaddle" not in wanted
