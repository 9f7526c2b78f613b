"""Tiny models in the golden configuration (img 32, patch 4, dim 64, depth 2, 4 heads; decoder 32-d, 2 blocks)."""
import os

import numpy as np

from layer import LayerNorm
from models_mae import MaskedAutoencoderViT
from models_vit import VisionTransformer

from conftest import golden
from util.weights import load_checkpoint, load_model_weights


def tiny_mae(norm_pix_loss=True, load=True):
    model = MaskedAutoencoderViT(32, 4, 3, 64, 2, 4, 32, 2, 4, 4.0, LayerNorm, norm_pix_loss)
    if load:
        load_model_weights(model, load_checkpoint(golden("mae_tiny.pth"))["model"], "mae_tiny.pth")
    return model


def tiny_vit(global_pool=True, img_size=32, num_classes=10, drop_path_rate=0.0):
    return VisionTransformer(global_pool=global_pool, img_size=img_size, patch_size=4, num_classes=num_classes,
                             embed_dim=64, depth=2, num_heads=4, drop_path_rate=drop_path_rate)


def to_torch_layout(name, array):
    """Paddle Linear weights are [in, out]; PyTorch's are [out, in]."""
    return array.T if array.ndim == 2 and name.endswith(".weight") else array


def max_abs(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def head_before_step(features, vit_io, lr=1e-3, weight_decay=0.05, eps=1e-8):
    """The 48px head that produced golden logits48 and loss48, in PyTorch layout.

    golden head_weight48 / head_bias48 hold the head AFTER the one AdamW step of vit_tiny_48_adamw_step.npz
    (they equal its head.* entries). The first AdamW step moves each entry by lr * g / (|g| + eps) after
    decoupled decay, so the head before it is recovered exactly by a fixed point on the cross-entropy
    gradient of `features` (the fc_norm output): a wrong forward pass still shows in logits and loss.
    """
    F = np.asarray(features, np.float64)
    y = vit_io["labels48"]
    W1, b1 = vit_io["head_weight48"].astype(np.float64), vit_io["head_bias48"].astype(np.float64)
    W, b = W1, b1
    for _ in range(5):
        z = F @ W.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(y)), y] -= 1
        gW, gb = p.T @ F / len(y), p.sum(0) / len(y)
        W = (W1 + lr * gW / (np.abs(gW) + eps)) / (1 - lr * weight_decay)
        b = b1 + lr * gb / (np.abs(gb) + eps)
    return W.astype(np.float32), b.astype(np.float32)


def run_script(*argv, timeout=600, env=None):
    """Run a project script or module with this interpreter from the repo root; returns CompletedProcess."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def state_of(path):
    """Model state_dict of a checkpoint file as numpy arrays."""
    return load_checkpoint(path)["model"]


def set_grads(model, grads):
    """Give every trainable parameter exactly the gradient grads['grad/' + name] (PyTorch layout)."""
    import paddle
    loss = 0
    for name, p in model.named_parameters():
        if not p.stop_gradient:
            g = np.ascontiguousarray(to_torch_layout(name, grads["grad/" + name]))
            loss = loss + (p * paddle.to_tensor(g)).sum()
    loss.backward()


def parse_flags(script, *argv):
    """A training script's flags read by its parse_args inside this process, where a flag error ends (exit 2,
    before any work): a CompletedProcess-like (returncode, stdout, stderr) without a process start."""
    import contextlib
    import importlib
    import io
    import types

    module = importlib.import_module(script[:-len(".py")])
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module.parse_args(list(argv))
        except SystemExit as e:
            code = e.code
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def descendants(pid):
    """The processes below pid (a launch's ranks, their data-loader workers), from /proc."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found
