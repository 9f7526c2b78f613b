"""Data parallelism under paddle.distributed.launch with 2 CPU processes (gloo): recompute, gradient
accumulation without extra all-reduces, BatchNorm buffers, the resume point, and the GPU-only choices
(flash attention's call, the device of each rank) checked through their arguments."""
import json
import os

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import layer
from conftest import ROOT
from data import make_train_val
from helpers import run_script, tiny_vit
from util import cpu_kernels
from util.dist import process_device

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_train_val(str(tmp_path_factory.mktemp("data")), 2, 12, 4)


def launch(tmp_path, name, script, *flags, env=None):
    """Run SCRIPT on 2 processes through tests/dist_worker.py; (exit code, rank 0's log, per-rank states)."""
    report, log_dir = str(tmp_path / f"{name}_report"), str(tmp_path / f"{name}_launch")
    os.makedirs(report)
    cpu_kernels.available()  # built once per machine: the ranks only load them
    out = run_script("-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", log_dir,
                     os.path.join(ROOT, "tests", "dist_worker.py"), report, script, *flags, env=env, timeout=300)
    log = open(os.path.join(log_dir, "workerlog.0")).read()
    states = [dict(np.load(os.path.join(report, f"rank{r}.npz"))) for r in (0, 1)
              if os.path.isfile(os.path.join(report, f"rank{r}.npz"))]
    return out.returncode, log, states


def common(data, out, *extra):
    return ["--data_path", data, "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--num_workers", "0",
            "--output_dir", out, "--log_dir", "", "--device", "cpu", *extra]


def assert_close_and_ranks_equal(plain, recomputed):
    for states in (plain, recomputed):
        assert len(states) == 2 and all(np.array_equal(states[0][k], states[1][k]) for k in states[0])
    assert max(float(np.abs(plain[0][k] - recomputed[0][k]).max()) for k in plain[0]) < 1e-6


@pytest.mark.slow
def test_pretrain_recompute_under_data_parallel(dataset, tmp_path):
    runs = []
    for name, extra in (("plain", []), ("recompute", ["--recompute"])):
        code, log, states = launch(tmp_path, name, "main_pretrain.py", "--model", "mae_vit_tiny_patch4",
                                   *common(dataset, str(tmp_path / name), *extra))
        assert code == 0, log[-3000:]
        runs.append(states)
    assert_close_and_ranks_equal(*runs)


@pytest.mark.slow
def test_finetune_recompute_with_drop_path_under_data_parallel(dataset, tmp_path):
    runs = []
    for name, extra in (("plain", []), ("recompute", ["--recompute"])):
        code, log, states = launch(tmp_path, name, "main_finetune.py", "--model", "vit_micro_patch4",
                                   "--nb_classes", "2", "--drop_path", "0.2", "--mixup", "0.8",
                                   *common(dataset, str(tmp_path / name), *extra))
        assert code == 0, log[-3000:]
        runs.append(states)
    assert_close_and_ranks_equal(*runs)


@pytest.mark.slow
def test_accumulation_reduces_gradients_once_per_update(tmp_path):
    log_dir = str(tmp_path / "launch")
    out = run_script("-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", log_dir,
                     os.path.join(ROOT, "tests", "accum_worker.py"), str(tmp_path), timeout=300)
    assert out.returncode == 0, open(os.path.join(log_dir, "workerlog.0")).read()[-3000:]
    report = json.load(open(tmp_path / "accum.json"))
    # micro-steps keep their local gradients (no all-reduce); each update all-reduces once
    assert report["records"] == [{"update": False, "synced": False}, {"update": True, "synced": True}] * 2
    assert report["big_batch_records"] == [{"update": True, "synced": True}] * 2
    assert report["update_grad_diff"] < 1e-5 and report["param_diff"] < 1e-6


@pytest.mark.slow
def test_linprobe_batchnorm_buffers_equal_on_both_ranks(dataset, tmp_path):
    code, log, states = launch(tmp_path, "lp", "main_linprobe.py", "--model", "vit_micro_patch4", "--nb_classes", "2",
                               *common(dataset, str(tmp_path / "lp")))
    assert code == 0, log[-3000:]
    mean, var = "head.0._mean", "head.0._variance"
    assert np.abs(states[0][mean]).max() > 0 and not np.allclose(states[0][var], 1)  # the statistics moved
    for k in (mean, var):
        assert np.array_equal(states[0][k], states[1][k]), k


@pytest.mark.slow
def test_ranks_with_different_local_output_dirs_do_not_resume_apart(dataset, tmp_path):
    """Rank 0's node-local output_dir holds a checkpoint, rank 1's does not: both stop with one message."""
    first = str(tmp_path / "first")
    code, log, _ = launch(tmp_path, "first", "main_pretrain.py", "--model", "mae_vit_tiny_patch4",
                          *common(dataset, first, "--epochs", "1", "--warmup_epochs", "0"))
    assert code == 0, log[-3000:]
    os.makedirs(tmp_path / "nodes" / "rank0" / "out")
    os.replace(os.path.join(first, "checkpoint-last.pd"), tmp_path / "nodes" / "rank0" / "out" / "checkpoint-last.pd")
    code, log, _ = launch(tmp_path, "second", "main_pretrain.py", "--model", "mae_vit_tiny_patch4",
                          *common(dataset, "out"), env={"RANK_CWD": str(tmp_path / "nodes")})
    assert code != 0
    assert "rank(s) 1 cannot read the checkpoint rank 0 resumes from" in log and "shared filesystem" in log
    assert "Traceback" not in log and "Start training" not in log


@pytest.mark.slow
def test_a_nan_on_one_rank_in_a_micro_step_rewinds_every_rank(dataset, tmp_path):
    """Rank 1 alone gets a NaN loss in a micro-step of --accum_iter 2: both ranks rewind to the same place,
    leave out the same optimizer step and finish equal."""
    code, log, states = launch(tmp_path, "nan", "main_pretrain.py", "--model", "mae_vit_micro_patch4",
                               *common(dataset, str(tmp_path / "nan"), "--accum_iter", "2", "--on_nonfinite",
                                       "rewind", "--input_size", "32"), env={"MAE_INJECT_NONFINITE": "1:0:1"})
    assert code == 0, log[-3000:]
    assert "Loss is nan at epoch 1, iteration 0: rewinding to" in log  # rank 0 prints for both
    assert "without iteration(s) 0-1 of epoch 1" in log
    assert len(states) == 2 and all(np.array_equal(states[0][k], states[1][k]) for k in states[0])
    logs = [json.loads(line) for line in open(tmp_path / "nan" / "log.txt")]
    assert [r["epoch"] for r in logs] == [0, 1] and logs[1]["skipped_iterations"] == [[0, 1]]


def test_fused_attention_gets_no_explicit_scale(monkeypatch):
    """On GPU, Paddle selects flash attention only without an explicit scale; its default equals the model's."""
    calls = []

    def sdpa(q, k, v, **kwargs):
        calls.append(kwargs)
        assert "scale" not in kwargs
        attn = F.softmax(paddle.matmul(q.transpose([0, 2, 1, 3]), k.transpose([0, 2, 3, 1])) * q.shape[-1] ** -0.5)
        return paddle.matmul(attn, v.transpose([0, 2, 1, 3])).transpose([0, 2, 1, 3])

    paddle.seed(0)
    model = tiny_vit().eval()
    x = paddle.randn([2, 3, 32, 32])
    layer.set_fused_attention(model, False)
    expected = model(x).numpy()  # attention written out
    layer.set_fused_attention(model, True)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    assert np.abs(model(x).numpy() - expected).max() < 1e-5
    assert len(calls) == 2 and calls[0]["training"] is False


@pytest.mark.parametrize("device,env,expected", [
    ("gpu", {}, "gpu"),
    ("gpu:3", {}, "gpu:3"),
    ("gpu:3", {"PADDLE_TRAINERS_NUM": "8", "FLAGS_selected_gpus": "5"}, "gpu:5"),
    ("gpu", {"PADDLE_TRAINERS_NUM": "2", "FLAGS_selected_gpus": "1"}, "gpu:1"),
    ("cpu", {"PADDLE_TRAINERS_NUM": "2"}, "cpu"),
])
def test_each_rank_takes_its_own_device(device, env, expected):
    assert process_device(device, env) == expected
