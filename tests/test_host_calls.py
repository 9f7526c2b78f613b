"""What a training step costs the host: blocking device->host reads and host->device uploads counted inside
train_one_epoch, on the path that runs on GPUs (no native CPU code) and with the CPU speed-ups."""
import json
import os

import pytest

from helpers import run_script
from conftest import ROOT

DATA = os.path.join(ROOT, "demo", "fashion_mnist_small")
COMMON = ["--input_size", "28", "--device", "cpu", "--num_workers", "2", "--batch_size", "16", "--epochs", "1",
          "--warmup_epochs", "0", "--data_path", DATA, "--print_freq", "20"]
JOBS = {"pretrain": ["main_pretrain.py", "--model", "mae_vit_micro_patch4", "--norm_pix_loss"],
        "finetune": ["main_finetune.py", "--model", "vit_micro_patch4", "--nb_classes", "10", "--mixup", "0.8",
                     "--cutmix", "1.0", "--reprob", "0.25", "--smoothing", "0.1", "--drop_path", "0.1"]}


@pytest.mark.slow
@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("job", sorted(JOBS))
def test_one_blocking_host_call_per_step(job, native, tmp_path):
    """Every augmentation on: one read per step (the loss, for the non-finite check); before the first step
    at most the two normalisation constants are placed on the device."""
    res = run_script("tests/host_calls_worker.py", *JOBS[job], *COMMON, "--output_dir", str(tmp_path),
                     "--log_dir", str(tmp_path), env={"MAE_NATIVE": native})
    assert res.returncode == 0, res.stderr[-2000:]
    counts = json.loads(res.stdout.strip().splitlines()[-1])
    steps = counts["steps"]
    assert len(steps) == 2000 // 16, counts
    assert max(steps) == 1 and sum(steps) == len(steps), counts  # exactly the loss read, every step
    assert counts["before_first_step"] <= (2 if native == "0" else 0), counts
    where = {site.split(":")[0] for site in counts["where"]}
    assert where <= {"util/epochs.py", "util/transforms.py"}, counts  # the loss read; the constants


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pair", "elem"])
def test_per_sample_mixing_adds_one_upload_per_step(mode, tmp_path):
    """timm's per-sample modes (not the official default): their mixing numbers are drawn on the host and
    uploaded together, once per step; the CutMix boxes are drawn on the device."""
    res = run_script("tests/host_calls_worker.py", *JOBS["finetune"], "--mixup_mode", mode, *COMMON,
                     "--output_dir", str(tmp_path), "--log_dir", str(tmp_path), env={"MAE_NATIVE": "0"})
    assert res.returncode == 0, res.stderr[-2000:]
    counts = json.loads(res.stdout.strip().splitlines()[-1])
    assert counts["steps"] == [2] * (2000 // 16), counts  # the loss read and one upload
    assert {site.split(":")[0] for site in counts["where"]} == {"util/epochs.py", "util/transforms.py",
                                                                "util/mixup.py"}, counts
