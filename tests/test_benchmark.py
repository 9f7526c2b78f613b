"""benchmark.py runs every job with the project's real code and prints its JSON line (speed is not asserted)."""
import json
import os

import pytest

from conftest import ROOT
from helpers import run_script


@pytest.mark.parametrize("job,model,extra", [
    ("pretrain", "mae_vit_micro_patch4", []),
    ("finetune", "vit_micro_patch4", []),
    ("infer", "vit_micro_patch4", []),
    ("infer", "vit_micro_patch4", ["--backend", "inference"]),
    ("pretrain", "mae_vit_micro_patch4", ["--recompute"]),
])
def test_benchmark_jobs(job, model, extra):
    res = run_script("benchmark.py", "--job", job, "--model", model, "--batch_size", "4", "--input_size", "32",
                     "--iters", "2", "--warmup", "1", "--device", "cpu", *extra)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["job"] == job and out["model"] == model and out["img_per_s"] > 0 and out["peak_mem_mb"] > 0
    assert out["model_gflop_per_s"] > 0 and out["gflop_per_img"] > 0 and out["gemm_peak_gflop_per_s"] > 0


def test_benchmark_flops_of_vit_base():
    """ViT-B/16 at 224: 17.6 G multiply-adds per image, as usually quoted, i.e. 35.1 GFLOP."""
    import paddle

    import benchmark
    import models_vit
    with paddle.LazyGuard():
        model = models_vit.vit_base_patch16()
    assert benchmark.model_flops(model, "infer", 0.75) / 2e9 == pytest.approx(17.56, abs=0.05)


def test_benchmark_data_pipeline():
    res = run_script("benchmark.py", "--job", "data", "--data_path", os.path.join(ROOT, "demo", "fashion_mnist_small"),
                     "--input_size", "32", "--batch_size", "16", "--iters", "3", "--warmup", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["img_per_s"] > 0
