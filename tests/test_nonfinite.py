"""--on_nonfinite: the official stop, and rewinds that get past a non-finite loss or weights, bounded by
--max_rewinds, with no checkpoint ever holding a non-finite value."""
import argparse
import json
import os

import numpy as np
import paddle
import pytest

from data import demo_subset
from helpers import parse_flags, run_script
from util import nonfinite
from util.amp import NativeScalerWithGradNormCount
from util.args import freeze
from util.epochs import epoch_meters, train_epochs
from util.run_state import resume
from util.errors import NonFiniteError
from util.weights import load_checkpoint

PRETRAIN = ["main_pretrain.py", "--model", "mae_vit_micro_patch4", "--norm_pix_loss", "--batch_size", "8",
            "--epochs", "3", "--warmup_epochs", "1", "--num_workers", "2", "--log_dir", "", "--print_freq", "100"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """80 training images of the shipped Fashion-MNIST subset (10 iterations of 8 per epoch), 20 to validate."""
    return demo_subset(tmp_path_factory.mktemp("fmnist"), {"train": 8, "val": 2})


def log_lines(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def assert_finite_checkpoints(out):
    for name in os.listdir(out):
        if name.endswith(".pd"):
            ckpt = load_checkpoint(os.path.join(out, name))  # rejects non-finite weights
            for accs in ckpt["optimizer"]["state"].values():
                assert all(np.isfinite(v).all() for v in accs.values()), name


def test_stop_is_the_default_and_rewind_gets_past_an_injected_nan(data, tmp_path):
    stop, rewind = str(tmp_path / "stop"), str(tmp_path / "rewind")
    env = {**os.environ, nonfinite.INJECT_VAR: "1:4"}
    res = run_script(*PRETRAIN, "--data_path", data, "--output_dir", stop, env=env)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == "error: Loss is nan at epoch 1, iteration 4, stopping training"
    assert [r["epoch"] for r in log_lines(stop)] == [0]
    assert load_checkpoint(os.path.join(stop, "checkpoint-last.pd"))["epoch"] == 0

    res = run_script(*PRETRAIN, "--data_path", data, "--output_dir", rewind, "--on_nonfinite", "rewind", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Loss is nan at epoch 1, iteration 4: rewinding to" in res.stdout
    assert "Continuing at epoch 1, iteration 0, without iteration(s) 4-4 of epoch 1" in res.stdout
    logs = log_lines(rewind)
    assert [r["epoch"] for r in logs] == [0, 1, 2] and logs[0] == log_lines(stop)[0]
    assert logs[1]["skipped_iterations"] == [[4, 4]] and "skipped_iterations" not in logs[2]
    last = load_checkpoint(os.path.join(rewind, "checkpoint-last.pd"))
    assert last["epoch"] == 2 and last["skipped"] == [[1, 4, 4]]
    assert_finite_checkpoints(rewind)


def test_fine_tuning_rewinds_too(data, tmp_path):
    out = str(tmp_path / "o")
    res = run_script("main_finetune.py", "--model", "vit_micro_patch4", "--nb_classes", "10", "--input_size", "28",
                     "--mixup", "0.8", "--reprob", "0.25", "--data_path", data, "--output_dir", out,
                     "--on_nonfinite", "rewind", *PRETRAIN[4:], env={**os.environ, nonfinite.INJECT_VAR: "2:9"})
    assert res.returncode == 0, res.stderr[-2000:]
    logs = log_lines(out)
    assert [r["epoch"] for r in logs] == [0, 1, 2] and logs[2]["skipped_iterations"] == [[9, 9]]
    assert all(np.isfinite(r["test_acc1"]) for r in logs)
    assert_finite_checkpoints(out)


def test_a_run_that_diverges_for_good_stops_after_the_rewinds(data, tmp_path):
    out = str(tmp_path / "o")
    res = run_script(*PRETRAIN, "--data_path", data, "--output_dir", out, "--on_nonfinite", "rewind",
                     "--max_rewinds", "2", "--lr", "1e30", "--warmup_epochs", "0")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Loss is nan at epoch 0, iteration ") and \
        last.endswith(" after 2 rewind(s) (--max_rewinds 2), stopping training"), last
    assert res.stdout.count("rewinding to") == 2
    start = load_checkpoint(os.path.join(out, "checkpoint-last.pd"))
    assert start["epoch"] == -1 and start["iteration"] == 0  # the state training started from
    assert_finite_checkpoints(out)


class Loader:
    """The loader interface train_epochs uses, for 4 iterations per epoch."""

    class Sampler:
        def set_epoch(self, epoch):
            pass

    batch_sampler = Sampler()
    dataset = range(32)

    def skip_batches(self, n):
        pass

    def __len__(self):
        return 4


def counting_run(tmp_path, mode, poison):
    """train_epochs over 3 epochs where each optimizer step adds 1 to every weight, and the step `poison`
    (epoch, iteration) once makes them NaN (as non-finite gradients would); the run's model."""
    os.makedirs(tmp_path)
    paddle.seed(0)
    model = paddle.nn.Linear(2, 2)
    optimizer = paddle.optimizer.AdamW(parameters=model.parameters())
    args = freeze(argparse.Namespace(output_dir=str(tmp_path), resume="", auto_resume=True, start_epoch=0, epochs=3,
                                     on_nonfinite=mode, max_rewinds=3, accum_iter=1, save_freq=1, eval_freq=1,
                                     log_dir="", batch_size=8, world_size=1))
    poisoned = []

    def train_one_epoch(epoch, start_iter, left_out, log_writer, metric_logger):
        metric_logger, _ = epoch_meters(epoch, metric_logger)
        for step in range(start_iter, 4):
            if step in left_out:
                continue
            for p in model.parameters():
                p.set_value(p + 1)
            if (epoch, step) == poison and not poisoned:
                poisoned.append(step)
                model.weight.set_value(paddle.full_like(model.weight, float("nan")))
            metric_logger.update(loss=1.0, lr=0.1)
        return metric_logger, None

    start = model.weight.numpy().copy()
    train_epochs(args, model, optimizer, NativeScalerWithGradNormCount(False), Loader(), train_one_epoch)
    return start, model, args


def test_weights_made_non_finite_are_never_saved(tmp_path):
    with pytest.raises(NonFiniteError, match=r"Weights are not finite \(not saved\) at epoch 1, iteration 3"):
        counting_run(tmp_path / "stop", "stop", (1, 3))
    assert load_checkpoint(str(tmp_path / "stop" / "checkpoint-last.pd"))["epoch"] == 0

    start, model, args = counting_run(tmp_path / "rewind", "rewind", (1, 3))
    last = load_checkpoint(str(tmp_path / "rewind" / "checkpoint-last.pd"))
    assert last["skipped"] == [[1, 3, 3]]
    np.testing.assert_array_equal(model.weight.numpy(), start + 11)  # 12 steps, the poisoned one left out
    np.testing.assert_array_equal(last["model"]["weight"], start + 11)
    state = resume(args.replace(epochs=4), model, paddle.optimizer.AdamW(parameters=model.parameters()),
                   NativeScalerWithGradNormCount(False))
    assert state.epoch == 3 and state.skipped == [[1, 3, 3]]  # a resumed run counts the rewind


def test_the_failed_step_is_the_one_that_made_the_weights_non_finite():
    model = paddle.nn.Linear(2, 2)
    error = NonFiniteError("Loss is nan", 3, 5)
    assert nonfinite.failed_step(error, model, 2) == [3, 4, 5]
    model.weight.set_value(paddle.full_like(model.weight, float("inf")))
    assert nonfinite.failed_step(error, model, 2) == [3, 2, 3]  # the step before made the weights inf
    assert nonfinite.failed_step(NonFiniteError("Loss is nan", 3, 1), model, 2) == [3, 0, 1]


def test_batch_statistics_blame_no_earlier_step():
    """The probe's BatchNorm statistics (non-trainable parameters in Paddle) overflowed by a batch's forward
    are that step's failure, not the step before; frozen encoder weights are not the optimizer's either."""
    import models_vit
    from helpers import tiny_vit
    model = tiny_vit(global_pool=False)
    models_vit.add_bn_head(model)
    for p in model.parameters():
        p.stop_gradient = True
    for p in model.head.parameters():
        p.stop_gradient = False
    error = NonFiniteError("Loss is nan", 3, 5)
    from util import compat
    stats = compat.batch_norm_statistics(model)
    assert len(stats) == 2 and not any(t.stop_gradient for t in stats)  # as main_linprobe leaves them
    stats[1].set_value(paddle.full_like(stats[1], float("inf")))  # the running variance
    assert not nonfinite.weights_finite(model) and nonfinite.weights_finite(model, trained=True)
    assert nonfinite.failed_step(error, model, 2) == [3, 4, 5]
    model.head[1].weight.set_value(paddle.full_like(model.head[1].weight, float("nan")))
    assert nonfinite.failed_step(error, model, 2) == [3, 2, 3]


@pytest.mark.parametrize("value", ["x", "1", "1:2:3:4", "-1:2", "1:b"])
def test_a_malformed_injection_variable_is_named(value, tmp_path, monkeypatch):
    monkeypatch.setenv(nonfinite.INJECT_VAR, value)
    res = parse_flags(*PRETRAIN, "--data_path", str(tmp_path))
    assert res.returncode == 2 and nonfinite.INJECT_VAR in res.stderr.strip().splitlines()[-1]
