"""The README's first command: demo/quickstart.sh end to end, with one epoch per stage."""
import json
import os

import pytest
from PIL import Image

from helpers import run_script


@pytest.mark.slow
def test_quickstart_runs_every_stage(tmp_path):
    out = str(tmp_path / "qs")
    env = {"OUTPUT_DIR": out, "PRETRAIN_EPOCHS": "1", "FINETUNE_EPOCHS": "1", "LINPROBE_EPOCHS": "1"}
    res = run_script("-c", "import subprocess, sys; sys.exit(subprocess.call(['bash', 'demo/quickstart.sh']))",
                     env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    for stage in ("1/6", "2/6", "3/6", "4/6", "5/6", "6/6"):
        assert f"=== {stage}" in res.stdout
    assert "* Acc@1" in res.stdout and "1. " in res.stdout
    assert Image.open(os.path.join(out, "reconstruction.png")).size == (6 * 128, 6 * 96)  # --scale 6
    for stage in ("pretrain", "finetune", "linprobe"):
        assert [json.loads(line)["epoch"] for line in open(os.path.join(out, stage, "log.txt"))] == [0]
    assert os.path.isfile(os.path.join(out, "finetune", "checkpoint-best.pd"))
