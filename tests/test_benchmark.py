"""benchmark.py runs every job with the project's real code and prints its JSON line (speed is not asserted)."""
import json
import os

import pytest
from PIL import Image

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


def test_benchmark_data_on_generated_jpegs(tmp_path):
    """The JPEG timing set: ImageNet-like widths, JPEG 4:2:0; timed with workers, up to the float batch."""
    res = run_script(os.path.join("experiments", "speed", "make_jpegs.py"), "--out", str(tmp_path), "--count", "24")
    assert res.returncode == 0, res.stderr[-2000:]
    files = sorted(str(p) for p in tmp_path.glob("train/*/*.jpg"))
    assert len(files) == 24 and len(list(tmp_path.glob("val/*/*.jpg"))) == 6
    for path in files:
        with Image.open(path) as img:
            assert img.format == "JPEG" and 400 <= img.size[0] <= 520
            assert img.layer[0][1:3] == (2, 2)  # luma sampled 2x2 per chroma sample: 4:2:0
    res = run_script("benchmark.py", "--job", "data", "--data_path", str(tmp_path), "--transform", "finetune",
                     "--batch_size", "4", "--iters", "3", "--warmup", "1", "--num_workers", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["transform"] == "finetune" and out["num_workers"] == 2
    assert out["img_per_s_per_worker"] == round(out["img_per_s"] / 2, 1)


@pytest.mark.parametrize("job", ["infer", "data"])
def test_recompute_is_refused_where_it_would_do_nothing(job):
    res = run_script("benchmark.py", "--job", job, "--recompute", "--data_path", os.path.join(ROOT, "demo"))
    assert res.returncode == 2
    assert f"argument --recompute: --job {job} runs no backward pass" in res.stderr
