"""Pre-training: golden optimizer step and lr schedule, end-to-end runs, resume, distributed, bad input."""
import argparse
import json
import os

import numpy as np
import paddle
import pytest

import main_pretrain
import util.lr_sched as lr_sched
from conftest import ROOT, golden
from data import make_image_folder
from engine_pretrain import train_one_epoch
from helpers import max_abs, run_script, set_grads, state_of, tiny_mae, to_torch_layout
from util import cpu_kernels
from util.amp import NativeScalerWithGradNormCount
from util.lr_decay import param_groups_weight_decay

GROUPS = json.load(open(golden("optim_groups.json")))


def test_weight_decay_groups_match_official():
    model = tiny_mae(load=False)
    groups = param_groups_weight_decay(model, 0.05)
    names = {p.name: n for n, p in model.named_parameters()}
    got = {names[p.name]: g["weight_decay"] for g in groups for p in g["params"]}
    assert got == GROUPS["pretrain_weight_decay_mae_tiny"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05]


def test_one_adamw_step_matches_official(mae_io):
    model = tiny_mae()
    args = argparse.Namespace(weight_decay=0.05, lr=1e-3)
    optimizer = main_pretrain.create_optimizer(model, args)
    set_grads(model, mae_io)
    optimizer.step()
    after = np.load(golden("mae_tiny_adamw_step.npz"))
    for name, value in model.state_dict().items():
        assert max_abs(to_torch_layout(name, value.numpy()), after[name]) <= 1e-6, name


def test_lr_schedule_matches_official():
    sched = GROUPS["lr_schedule"]
    args = argparse.Namespace(**sched["args"])
    model = tiny_mae(load=False)
    optimizer = paddle.optimizer.AdamW(parameters=[
        {"params": [model.cls_token], "learning_rate": 1.0, "weight_decay": 0.0},
        {"params": [model.mask_token], "weight_decay": 0.0}])
    for row in sched["rows"]:
        lr = lr_sched.adjust_learning_rate(optimizer, row["epoch"], args)
        assert lr == pytest.approx(row["lr"], rel=1e-12, abs=1e-15)
        assert lr_sched.group_lrs(optimizer) == pytest.approx(row["group_lrs"], rel=1e-6, abs=1e-15)


class _Loader(list):
    """A fixed list of batches with the batch_sampler hooks the engine does not need."""


def test_loss_falls_on_a_fixed_batch():
    paddle.seed(0)
    model = tiny_mae(load=False)
    args = argparse.Namespace(weight_decay=0.05, lr=1e-3, min_lr=0.0, warmup_epochs=0, epochs=100, accum_iter=1,
                              mask_ratio=0.75, print_freq=100, device="cpu", no_amp=True, amp_dtype="float16",
                              log_dir="", seed=0, on_nonfinite="stop")
    optimizer = main_pretrain.create_optimizer(model, args)
    imgs = paddle.to_tensor(np.load(golden("mae_tiny_io.npz"))["imgs"])
    loader = _Loader([(imgs, None)] * 10)
    losses = [train_one_epoch(model, loader, optimizer, e, NativeScalerWithGradNormCount(False), args=args)
              [0].meters["loss"].global_avg for e in range(4)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_accum_iter_equals_one_big_batch():
    """Two micro-batches with loss / accum_iter accumulate the gradient of their concatenation; the step
    happens only on the update iteration."""
    io = np.load(golden("mae_tiny_io.npz"))
    imgs, noise = paddle.to_tensor(io["imgs"]), paddle.to_tensor(io["noise"])
    a, b = tiny_mae(), tiny_mae()
    args = argparse.Namespace(weight_decay=0.05, lr=1e-3)
    opt_a = main_pretrain.create_optimizer(a, args)
    scaler = NativeScalerWithGradNormCount(False)
    before = a.blocks[0].attn.qkv.weight.numpy().copy()
    for i in range(2):
        loss, _, _ = a(imgs[i:i + 1], 0.75, noise[i:i + 1])
        assert scaler.backward(loss / 2, opt_a, parameters=a.parameters(), update_grad=False) is None
    assert np.array_equal(a.blocks[0].attn.qkv.weight.numpy(), before)
    loss, _, _ = b(imgs, 0.75, noise)  # equal masked counts per image: the mean of the two losses
    loss.backward()
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        if not pa.stop_gradient:
            ref = pb.grad.numpy()
            assert max_abs(pa.grad.numpy(), ref) <= 1e-5 * np.abs(ref).max(), k
    loss, _, _ = a(imgs[:1], 0.75, noise[:1])
    scaler.backward(loss, opt_a, parameters=a.parameters(), update_grad=True)
    scaler.step(opt_a)
    assert not np.array_equal(a.blocks[0].attn.qkv.weight.numpy(), before)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), classes=2, per_class=12)


def _pretrain_args(data, out, *extra):
    return ["main_pretrain.py", "--model", "mae_vit_tiny_patch4", "--data_path", data, "--batch_size", "8",
            "--epochs", "2", "--warmup_epochs", "1", "--num_workers", "0", "--output_dir", out, "--log_dir", out,
            "--save_freq", "1", "--print_freq", "1", "--device", "cpu", "--norm_pix_loss", *extra]


@pytest.mark.slow
def test_pretrain_end_to_end_and_resume(dataset, tmp_path):
    """Two epochs write checkpoints, log.txt and VisualDL scalars; resuming from epoch 0 reproduces epoch 1."""
    straight = str(tmp_path / "straight")
    out = run_script(*_pretrain_args(dataset, straight))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "effective batch size: 8" in out.stdout and "actual lr: 3.13e-05" in out.stdout
    assert sorted(f for f in os.listdir(straight) if f.endswith(".pd")) == \
        ["checkpoint-0.pd", "checkpoint-1.pd", "checkpoint-last.pd"]
    logs = [json.loads(line) for line in open(os.path.join(straight, "log.txt"))]
    assert [list(r) for r in logs] == [["train_lr", "train_loss", "epoch"]] * 2
    assert [r["epoch"] for r in logs] == [0, 1] and all(np.isfinite(r["train_loss"]) for r in logs)

    from visualdl import LogReader
    vdl = [f for f in os.listdir(straight) if f.startswith("vdlrecords")]
    reader = LogReader(file_path=os.path.join(straight, vdl[0]))
    steps = [r.id for r in reader.get_data("scalar", "train_loss")]
    assert steps == [0, 333, 666, 1000, 1333, 1666]  # epoch_1000x of 3 iterations per epoch
    assert len(reader.get_data("scalar", "lr")) == 6

    ckpt = paddle.load(os.path.join(straight, "checkpoint-1.pd"))
    assert ckpt["epoch"] == 1 and ckpt["args"]["model"] == "mae_vit_tiny_patch4"
    assert {"model", "optimizer", "epoch", "scaler", "args"} <= set(ckpt)

    resumed = str(tmp_path / "resumed")
    out = run_script(*_pretrain_args(dataset, resumed, "--resume", os.path.join(straight, "checkpoint-0.pd")))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "With optim & sched!" in out.stdout
    assert sorted(f for f in os.listdir(resumed) if f.endswith(".pd")) == ["checkpoint-1.pd", "checkpoint-last.pd"]
    a, b = state_of(os.path.join(straight, "checkpoint-1.pd")), state_of(os.path.join(resumed, "checkpoint-1.pd"))
    for k in a:
        assert max_abs(a[k], b[k]) < 1e-6, k
    assert json.loads(open(os.path.join(resumed, "log.txt")).read())["train_loss"] == logs[1]["train_loss"]

    # the same epoch-0 checkpoint in the official PyTorch format resumes to the same result
    pth = str(tmp_path / "checkpoint-0.pth")
    _save_as_official(os.path.join(straight, "checkpoint-0.pd"), pth)
    from_pth = str(tmp_path / "from_pth")
    out = run_script(*_pretrain_args(dataset, from_pth, "--resume", pth))
    assert out.returncode == 0, out.stderr[-3000:]
    c = state_of(os.path.join(from_pth, "checkpoint-1.pd"))
    for k in a:
        assert max_abs(a[k], c[k]) < 1e-6, k


def _save_as_official(pd_path, pth_path):
    """Write a checkpoint of ours as the official main_pretrain would have saved it (torch AdamW state)."""
    import math
    from torch_format import save_pth
    from util.factory import create_model
    ckpt = paddle.load(pd_path, return_numpy=True)
    with paddle.LazyGuard():
        model = create_model("mae_vit_tiny_patch4")
    names = {p.name: n for n, p in model.named_parameters()}
    order = [names[p.name] for g in param_groups_weight_decay(model, 0.05) for p in g["params"]]
    state = {}
    for i, name in enumerate(order):
        acc = ckpt["optimizer"]["state"][name]
        step = round(math.log(float(acc["beta1_pow_acc"][0])) / math.log(0.9)) - 1  # Paddle holds beta^(t+1)
        state[i] = {"step": np.array(float(step), np.float32), "exp_avg": to_torch_layout(name, acc["moment1"]),
                    "exp_avg_sq": to_torch_layout(name, acc["moment2"])}
    groups = [{"params": list(range(39)), "weight_decay": 0.0, "lr": 0.0},
              {"params": list(range(39, len(order))), "weight_decay": 0.05, "lr": 0.0}]
    model_sd = {k: np.ascontiguousarray(to_torch_layout(k, v)) for k, v in ckpt["model"].items()}
    save_pth({"model": model_sd, "optimizer": {"state": state, "param_groups": groups}, "epoch": 0,
              "scaler": {}, "args": argparse.Namespace(**ckpt["args"])}, pth_path)


@pytest.mark.slow
def test_pretrain_distributed_two_cpu_processes(dataset, tmp_path):
    """paddle.distributed.launch with 2 CPU processes (gloo) runs main_pretrain.py as its __main__."""
    out_dir, report, log_dir = str(tmp_path / "out"), str(tmp_path / "report"), str(tmp_path / "launch")
    os.makedirs(report)
    cpu_kernels.available()  # built once per machine: the ranks only load them
    args = _pretrain_args(dataset, out_dir, "--batch_size", "4")
    out = run_script("-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", log_dir,
                     os.path.join(ROOT, "tests", "dist_worker.py"), report, *args)
    assert out.returncode == 0, out.stderr[-3000:] + open(os.path.join(log_dir, "workerlog.0")).read()[-3000:]
    ranks = [json.load(open(os.path.join(report, f"rank{r}.json"))) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for epoch in ("0", "1"):
        seen = [set(r["seen"][epoch]) for r in ranks]
        assert len(seen[0]) == len(seen[1]) == 12 and not seen[0] & seen[1]  # 24 images split in halves
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"]  # reshuffled every epoch
    assert ranks[0]["params"] == ranks[1]["params"]  # gradients were averaged: replicas stayed identical
    assert ranks[1]["writes"] == [] and any(w.endswith("log.txt") for w in ranks[0]["writes"])
    assert "effective batch size: 8" in open(os.path.join(log_dir, "workerlog.0")).read()


def test_seed_readme_command_parses():
    args = main_pretrain.parse_args(
        "--accum_iter 2 --batch_size 256 --model mae_vit_base_patch16 --norm_pix_loss --mask_ratio 0.75 "
        "--epochs 1600 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05 --data_path /data/imagenet".split())
    assert (args.accum_iter, args.batch_size, args.input_size, args.norm_pix_loss) == (2, 256, 224, True)
    assert (args.epochs, args.warmup_epochs, args.blr, args.save_freq) == (1600, 40, 1.5e-4, 20)


@pytest.mark.parametrize("flags,message", [
    (["--mask_ratio", "1.0"], "--mask_ratio: must be in (0, 1)"),
    (["--mask_ratio", "0"], "--mask_ratio: must be in (0, 1)"),
    (["--batch_size", "0"], "--batch_size: must be >= 1"),
    (["--accum_iter", "0"], "--accum_iter: must be >= 1"),
    (["--model", "mae_vit_gigantic"], "valid models: mae_vit_base_patch16"),
    (["--model", "mae_vit_tiny_patch4", "--input_size", "30"], "not divisible by patch_size 4"),
])
def test_bad_flags_are_argparse_errors(flags, message):
    out = run_script("main_pretrain.py", *flags)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_missing_data_path(tmp_path):
    out = run_script(*_pretrain_args(str(tmp_path / "nowhere"), str(tmp_path / "o")))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nowhere' / 'train'}: dataset folder not found"


def test_empty_class_folder(tmp_path):
    root = make_image_folder(str(tmp_path / "d"), classes=2, per_class=2)
    os.makedirs(os.path.join(root, "train", "class_9"))
    out = run_script(*_pretrain_args(root, str(tmp_path / "o")))
    assert out.returncode == 1 and "class_9" in out.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_unreadable_image_names_the_file(tmp_path, workers):
    root = make_image_folder(str(tmp_path / "d"), classes=2, per_class=8)
    bad = os.path.join(root, "train", "class_1", "img_3.png")
    open(bad, "wb").write(b"\x89PNG\r\n\x1a\n truncated")
    out = run_script(*_pretrain_args(root, str(tmp_path / "o"), "--num_workers", workers), timeout=120)
    assert out.returncode == 1
    assert bad in out.stderr.strip().splitlines()[-1]
