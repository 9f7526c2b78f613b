"""Official .pth loading without PyTorch, conversion, and refusal of unsafe or ill-fitting checkpoints."""
import argparse
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import paddle
import pytest

from conftest import ROOT, golden
from helpers import tiny_mae, tiny_vit
from torch_format import save_pth
from util.errors import CheckpointError
from util.weights import load_checkpoint, load_file, load_model_weights, save_file


def _torch_zip(path, payload):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pth_to_pd_round_trip_is_exact(tmp_path):
    pth = load_file(golden("mae_tiny.pth"))[0]["model"]
    dst = tmp_path / "mae_tiny.pd"
    out = subprocess.run([sys.executable, "-m", "util.convert_weights", golden("mae_tiny.pth"), str(dst)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ckpt = paddle.load(str(dst))
    model = tiny_mae(load=False)
    missing, unexpected = model.set_state_dict(ckpt["model"])
    assert not missing and not unexpected
    for name, value in model.state_dict().items():
        ref = pth[name].T if value.ndim == 2 and name.endswith(".weight") else pth[name]
        assert np.array_equal(value.numpy(), ref), name


def test_pth_and_pd_give_the_same_model(tmp_path):
    a = tiny_mae()
    save_file({"model": a.state_dict()}, str(tmp_path / "a.pd"))
    b = tiny_mae(load=False)
    load_model_weights(b, load_checkpoint(str(tmp_path / "a.pd"))["model"], "a.pd")
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and np.array_equal(v.numpy(), v2.numpy())


@pytest.mark.parametrize("container", ["pth", "pd"])
def test_unsafe_pickle_is_refused_and_not_run(tmp_path, container):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"model": _Evil(str(marker))}, protocol=2)
    path = tmp_path / f"evil.{container}"
    if container == "pth":
        _torch_zip(path, payload)
    else:
        path.write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"refusing to load.*system"):
        load_checkpoint(str(path))
    assert not marker.exists()
    out = subprocess.run([sys.executable, "-m", "util.convert_weights", str(path), str(tmp_path / "o.pd")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "refusing" in out.stderr and not marker.exists()
    assert not (tmp_path / "o.pd").exists()


def test_full_training_checkpoint_with_args(tmp_path):
    """Official training checkpoints also hold the epoch, scaler state and an argparse.Namespace."""
    src = load_file(golden("mae_tiny.pth"))[0]["model"]
    args = argparse.Namespace(lr=1e-3, model="mae_vit_tiny_patch4")
    path = str(tmp_path / "full.pth")
    save_pth({"model": src, "epoch": 3, "args": args, "scaler": {"scale": 65536.0}}, path)
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 3 and ckpt["scaler"]["scale"] == 65536.0 and ckpt["torch"]
    assert ckpt["args"] == {"lr": 1e-3, "model": "mae_vit_tiny_patch4"}
    assert np.array_equal(ckpt["model"]["blocks.0.attn.qkv.weight"], src["blocks.0.attn.qkv.weight"].T)


def test_batchnorm_stats_are_mapped(tmp_path):
    state = {"head.0.running_mean": np.arange(4, dtype=np.float32), "head.0.running_var": np.ones(4, np.float32),
             "head.0.num_batches_tracked": np.array(7, np.int64), "head.1.weight": np.ones([3, 4], np.float32)}
    path = str(tmp_path / "lin.pth")
    save_pth({"model": state}, path)
    model = load_checkpoint(path)["model"]
    assert sorted(model) == ["head.0._mean", "head.0._variance", "head.1.weight"]
    assert model["head.1.weight"].shape == (4, 3) and np.array_equal(model["head.0._mean"], np.arange(4))


def test_state_dict_problems_are_named(tmp_path):
    state = {k: v.numpy() for k, v in tiny_vit(True).state_dict().items()}
    del state["fc_norm.weight"]
    state["extra.weight"] = np.zeros(3, np.float32)
    state["head.weight"] = np.zeros([64, 5], np.float32)
    path = str(tmp_path / "bad.pd")
    save_file({"model": state}, path)
    with pytest.raises(CheckpointError) as err:
        load_model_weights(tiny_vit(True), load_checkpoint(path)["model"], path)
    msg = str(err.value)
    assert "bad.pd" in msg and "missing keys: fc_norm.weight" in msg and "unexpected keys: extra.weight" in msg
    assert "head.weight [64, 5] vs model [64, 10]" in msg


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated"])
def test_foreign_or_truncated_files(tmp_path, content):
    path = tmp_path / "x.pd"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="x.pd"):
        load_checkpoint(str(path))


def test_truncated_pth(tmp_path):
    data = open(golden("mae_tiny.pth"), "rb").read()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth"):
        load_checkpoint(str(path))


def test_missing_file():
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint("/nonexistent/ckpt.pth")


def test_save_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-0.pd")
    save_file({"model": {"a": np.ones(2, np.float32)}}, path)

    def crash(obj, f, *a, **k):
        open(f, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(paddle, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_file({"model": {"a": np.zeros(2, np.float32)}}, path)
    assert np.array_equal(load_checkpoint(path)["model"]["a"], np.ones(2))
    assert os.listdir(tmp_path) == ["checkpoint-0.pd"]


def test_resumed_accumulators_stay_where_the_optimizer_keeps_them(monkeypatch):
    """Every accumulator is written from a tensor on its own place (Paddle's set_value of a NumPy array
    would move it to the current device: the beta powers, which Adam keeps on the CPU, onto the GPU)."""
    from util import compat
    from util.adamw import AdamW
    from util.checkpoint import load_optimizer_state, optimizer_state
    model = paddle.nn.Linear(3, 2)
    opt = AdamW(learning_rate=1e-3, parameters=model.parameters())
    model(paddle.ones([4, 3])).sum().backward()
    opt.step()
    saved = optimizer_state(opt, model)
    fresh = AdamW(learning_rate=1e-3, parameters=model.parameters())
    written = []
    original = paddle.Tensor.set_value

    def spy(self, value):
        written.append((type(value), getattr(value, "place", None), self.place))
        return original(self, value)

    monkeypatch.setattr(paddle.Tensor, "set_value", spy)
    load_optimizer_state(fresh, model, {"optimizer": saved}, "ckpt")
    assert len(written) == sum(len(v) for v in saved["state"].values()) == 8
    assert all(kind is paddle.Tensor and str(src) == str(dst) for kind, src, dst in written), written
    for acc, per_param in compat.accumulators(fresh).items():
        for pname, value in per_param.items():
            name = {p.name: n for n, p in model.named_parameters()}[pname]
            assert np.array_equal(value.numpy(), saved["state"][name][acc])
