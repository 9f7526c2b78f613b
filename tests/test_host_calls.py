"""What a training step costs the host: blocking device->host reads and host->device uploads counted inside
train_one_epoch, on the path that runs on GPUs (no native CPU code) and with the CPU speed-ups."""
import json
import os

import numpy as np
import paddle
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
                                                                "util/dist.py"}, counts  # mixup's to_device


def test_evaluation_reads_the_device_once_per_batch(monkeypatch):
    """evaluate(): loss, top-1 and top-5 of a batch come back in one read; the numbers are those of the model."""
    import types

    import engine_finetune
    from helpers import tiny_vit
    paddle.seed(0)
    model = tiny_vit(num_classes=10)
    batches = [(paddle.randn([4, 3, 32, 32]), paddle.to_tensor(np.array([0, 1, 2, 3]) + i)) for i in range(3)]
    reads, depth = [], []

    def counted(fn, name):
        def read(self, *args):
            if not depth:  # the outermost call (tolist reads through numpy)
                reads.append(name)
            depth.append(name)
            try:
                return fn(self, *args)
            finally:
                depth.pop()
        return read

    for name in ("item", "numpy", "tolist", "__float__"):
        monkeypatch.setattr(paddle.Tensor, name, counted(getattr(paddle.Tensor, name), name))
    stats = engine_finetune.evaluate(batches, model, types.SimpleNamespace(device="cpu", no_amp=True,
                                                                           amp_dtype="float16"))
    assert len(reads) == 3, reads
    monkeypatch.undo()
    with paddle.no_grad():
        logits = [model(x) for x, _ in batches]
    top1 = [float((lg.argmax(1) == y).astype("float32").mean()) * 100 for lg, (_, y) in zip(logits, batches)]
    assert stats["acc1"] == pytest.approx(np.mean(top1), abs=1e-9)


def test_float16_loss_scaler_reads_once_per_step_and_skips_non_finite_steps(monkeypatch):
    """The float16 scaler's path (GradScaler enables itself only where the tracer's place is a GPU, so the
    test shows it one while it is built): the non-finite flag travels in the step's one read, and a step with
    infinite gradients is left out, counted, and backs the scale off. Paddle's CPU kernel of
    check_finite_and_unscale_ does not set its flag in place (the GPU's does), so for the infinite step the
    test hands the flag in."""
    from util import compat
    from paddle.amp import grad_scaler

    from util.amp import NativeScalerWithGradNormCount
    from util.epochs import read_step

    class Gpu:
        def is_gpu_place(self):
            return True
    monkeypatch.setattr(grad_scaler, "_dygraph_tracer", lambda: type("Tracer", (), {"_expected_place": Gpu()})())
    scaler = NativeScalerWithGradNormCount(enabled=True)
    monkeypatch.undo()
    paddle.seed(0)
    model = paddle.nn.Linear(4, 2)
    optimizer = paddle.optimizer.AdamW(parameters=model.parameters(), learning_rate=0.1)
    reads, depth = [], []

    def counted(read):
        def wrapper(self, *args, **kwargs):
            if not depth:  # a read inside another (tolist through numpy) is one read
                reads.append(read.__name__)
            depth.append(1)
            try:
                return read(self, *args, **kwargs)
            finally:
                depth.pop()
        return wrapper
    for name in ("item", "numpy", "tolist", "__float__", "__bool__"):
        monkeypatch.setattr(paddle.Tensor, name, counted(getattr(paddle.Tensor, name)))
    weights, per_step = [], []
    for factor in (1.0, float("inf"), 1.0):
        start = len(reads)
        with paddle.amp.auto_cast(enable=False, dtype="float16"):  # as util.amp.autocast (its dtype: the scaler's)
            loss = (model(paddle.ones([3, 4])) * factor).sum()
        found_inf = scaler.backward(loss, optimizer, parameters=model.parameters())
        assert found_inf is compat.found_inf(scaler._scaler) and found_inf.shape == [1]
        found_inf = paddle.full([1], factor == float("inf"))
        _, _, skip = read_step(loss, True, found_inf=found_inf)
        scaler.step(optimizer, skip)
        optimizer.clear_grad()
        per_step.append(len(reads) - start)
        weights.append(paddle.assign(model.weight))
    monkeypatch.undo()
    assert per_step == [1, 1, 1], reads
    assert scaler.skipped_steps == 1
    assert np.array_equal(weights[0].numpy(), weights[1].numpy())
    assert not np.array_equal(weights[1].numpy(), weights[2].numpy())
    assert float(np.asarray(scaler.state_dict()["scale"]).ravel()[0]) == 65536.0 / 2
