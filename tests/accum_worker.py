"""Under paddle.distributed.launch (2 processes): fine-tuning epochs of a tiny ViT through
engine_finetune.train_one_epoch with --accum_iter 2 at batch 2 and with --accum_iter 1 at batch 4, on the
same 16 images (each update sees the same 8 across both ranks). Plain SGD steps, so that the parameters
carry the gradients' agreement (Adam's g / sqrt(v) magnifies float noise in near-zero gradients).

    accum_worker.py REPORT_DIR

After every backward it records whether the gradients were all-reduced (equal on both ranks); rank 0 writes
REPORT_DIR/accum.json with those records, the largest difference of the update gradients (relative to the
largest gradient) and of the final parameters between the two runs.
"""
import json
import os
import sys
import types

import numpy as np
import paddle
import paddle.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import engine_finetune  # noqa: E402
from helpers import tiny_vit  # noqa: E402
from util.amp import NativeScalerWithGradNormCount  # noqa: E402
from util.cpu import configure_cpu  # noqa: E402
from util.losses import CrossEntropyLoss  # noqa: E402

configure_cpu()
dist.init_parallel_env()
rank = dist.get_rank()
rng = np.random.RandomState(0)
images = rng.randn(16, 3, 32, 32).astype(np.float32)
labels = rng.randint(0, 10, 16).astype(np.int64)


def synced(model):
    """Whether every parameter's gradient is the same on both ranks."""
    for p in model.parameters():
        gathered = []
        dist.all_gather(gathered, p.grad)
        if not np.array_equal(gathered[0].numpy(), gathered[1].numpy()):
            return False
    return True


class RecordingScaler(NativeScalerWithGradNormCount):
    def __init__(self, model, records):
        super().__init__(enabled=False)
        self.model, self.records, self.update_grads = model, records, []

    def backward(self, loss, optimizer, clip_grad=None, parameters=None, update_grad=True):
        found_inf = super().backward(loss, optimizer, clip_grad, parameters, update_grad)
        self.records.append({"update": update_grad, "synced": synced(self.model)})
        if update_grad:
            self.update_grads.append([p.grad.numpy().copy() for p in self.model.parameters()])
        return found_inf


def run(accum_iter, batch_size):
    """Two updates; micro-batch m of update u on rank r holds images u*8 + m*2*batch + r*batch + [0, batch)."""
    paddle.seed(0)
    layers = tiny_vit()
    model = paddle.DataParallel(layers)
    batches = []
    for u in range(2):
        for m in range(accum_iter):
            start = u * 8 + m * 2 * batch_size + rank * batch_size
            batches.append((paddle.to_tensor(images[start:start + batch_size]),
                            paddle.to_tensor(labels[start:start + batch_size])))
    args = types.SimpleNamespace(accum_iter=accum_iter, print_freq=100, lr=0.5, min_lr=0.0, warmup_epochs=0,
                                 epochs=1, device="cpu", no_amp=True, amp_dtype="float16", seed=0,
                                 on_nonfinite="stop")
    optimizer = paddle.optimizer.SGD(learning_rate=args.lr, parameters=[{"params": layers.parameters()}])
    scaler = RecordingScaler(layers, [])
    engine_finetune.train_one_epoch(model, CrossEntropyLoss(), batches, optimizer, 0, scaler, args=args)
    return {k: v.numpy() for k, v in layers.state_dict().items()}, scaler


accumulated, scaler = run(accum_iter=2, batch_size=2)
big_batch, big_scaler = run(accum_iter=1, batch_size=4)
if rank == 0:
    grad_diff = max(float(np.abs(a - b).max() / np.abs(b).max())
                    for step_a, step_b in zip(scaler.update_grads, big_scaler.update_grads)
                    for a, b in zip(step_a, step_b))
    param_diff = max(float(np.abs(accumulated[k] - big_batch[k]).max()) for k in accumulated)
    with open(os.path.join(sys.argv[1], "accum.json"), "w") as f:
        json.dump({"records": scaler.records, "big_batch_records": big_scaler.records, "update_grad_diff": grad_diff,
                   "param_diff": param_diff}, f)
