"""Fine-tuning and linear probing against the official outputs: LLRD groups, one AdamW step, LARS."""
import argparse
import json

import numpy as np
import paddle

import main_finetune
import main_linprobe
from conftest import golden
from helpers import head_before_step, max_abs, set_grads, to_torch_layout
from models_vit import BatchNorm1D, vit_micro_patch4
from util.lars import LARS
from util.lr_decay import param_groups_lrd
from util.weights import load_pretrained


def _finetune_start(vit_io):
    model = vit_micro_patch4(img_size=48, num_classes=10, global_pool=True)
    load_pretrained(model, golden("mae_tiny.pth"))
    model.eval()
    weight, bias = head_before_step(model.forward_features(paddle.to_tensor(vit_io["imgs48"])).numpy(), vit_io)
    model.head.weight.set_value(np.ascontiguousarray(weight.T))
    model.head.bias.set_value(bias)
    return model


def test_layer_decay_groups_match_official():
    model = vit_micro_patch4(img_size=48, num_classes=10, global_pool=True)
    groups = param_groups_lrd(model, 0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.75)
    names = {p.name: n for n, p in model.named_parameters()}
    got = {names[p.name]: {"lr_scale": g["learning_rate"], "weight_decay": g["weight_decay"]}
           for g in groups for p in g["params"]}
    assert got == json.load(open(golden("optim_groups.json")))["finetune_lrd_vit_tiny_48"]


def _official_gradients(model, after, lr=1e-3, eps=1e-8):
    """The gradients the official step used, recovered from its result with the official group settings.

    The first AdamW step is p1 = p0 * (1 - lr_g * wd_g) - lr_g * g / (|g| + eps), with lr_g = lr * lr_scale.
    Gradients near eps make p1 hinge on float32 noise in g, so comparing parameters after a step computed
    from our own backward pass cannot hold 1e-6; the step itself is checked from the official gradients.
    """
    groups = json.load(open(golden("optim_groups.json")))["finetune_lrd_vit_tiny_48"]
    grads = {}
    for name, p in model.named_parameters():
        lr_g, wd = lr * groups[name]["lr_scale"], groups[name]["weight_decay"]
        p0 = to_torch_layout(name, p.numpy()).astype(np.float64)
        u = np.clip((p0 * (1 - lr_g * wd) - after[name]) / lr_g, -1 + 1e-7, 1 - 1e-7)
        grads["grad/" + name] = (eps * u / (1 - np.abs(u))).astype(np.float32)
    return grads


def test_one_finetune_step_matches_official(vit_io):
    model = _finetune_start(vit_io)
    model.train()
    loss = paddle.nn.functional.cross_entropy(model(paddle.to_tensor(vit_io["imgs48"])),
                                              paddle.to_tensor(vit_io["labels48"]))
    assert abs(loss.item() - float(vit_io["loss48"])) < 1e-5
    after = np.load(golden("vit_tiny_48_adamw_step.npz"))
    assert sorted(after.files) == sorted(model.state_dict())
    args = argparse.Namespace(weight_decay=0.05, layer_decay=0.75, lr=1e-3)
    optimizer = main_finetune.create_optimizer(model, args)
    set_grads(model, _official_gradients(model, after))
    optimizer.step()
    for name, value in model.state_dict().items():
        assert max_abs(to_torch_layout(name, value.numpy()), after[name]) <= 1e-6, name


def test_lars_three_steps_match_official():
    ref = np.load(golden("lars_steps.npz"))
    w = paddle.create_parameter([10, 64], "float32")
    b = paddle.create_parameter([10], "float32")
    w.set_value(ref["w0"])
    b.set_value(ref["b0"])
    opt = LARS([w, b], learning_rate=float(ref["lr"]), weight_decay=float(ref["weight_decay"]),
               momentum=float(ref["momentum"]), trust_coefficient=float(ref["trust_coefficient"]))
    for k in range(3):
        ((w * paddle.to_tensor(ref[f"gw{k}"])).sum() + (b * paddle.to_tensor(ref[f"gb{k}"])).sum()).backward()
        opt.step()
        opt.clear_grad()
        assert max_abs(w.numpy(), ref[f"w{k + 1}"]) <= 1e-6 and max_abs(b.numpy(), ref[f"b{k + 1}"]) <= 1e-6, k


def test_batchnorm_running_variance_is_pytorchs():
    """Training normalises with the biased batch variance; the running estimate takes the unbiased one
    (PyTorch's update, momentum 0.1), where Paddle's own BatchNorm1D would take the biased one."""
    bn = BatchNorm1D(8, weight_attr=False, bias_attr=False, epsilon=1e-6)
    rng = np.random.RandomState(0)
    mean, var = np.zeros(8), np.ones(8)
    for n in (16, 5, 64):
        x = (rng.randn(n, 8) * rng.uniform(0.1, 3, 8) + rng.randn(8)).astype(np.float32)
        y = bn(paddle.to_tensor(x)).numpy()
        assert max_abs(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-6)) < 1e-5
        mean, var = 0.9 * mean + 0.1 * x.mean(0), 0.9 * var + 0.1 * x.var(0, ddof=1)
        assert max_abs(bn._mean.numpy(), mean) < 1e-6 and max_abs(bn._variance.numpy(), var) < 1e-6


def test_linprobe_head_statistics_through_lars_steps():
    """main_linprobe's model, three LARS steps on random images: the head's running statistics follow the
    PyTorch formula on the features that entered it."""
    args = main_linprobe.parse_args(["--model", "vit_micro_patch4", "--nb_classes", "4", "--data_path", "x"])
    paddle.seed(0)
    model = main_linprobe.build_model(args)
    model.train()
    opt = LARS(model.head.parameters(), learning_rate=0.1)
    mean, var = np.zeros(64), np.ones(64)
    for step in range(3):
        images = paddle.randn([8, 3, 32, 32])
        features = model.forward_features(images).numpy()
        loss = paddle.nn.functional.cross_entropy(model(images), paddle.to_tensor(np.arange(8) % 4))
        loss.backward()
        opt.step()
        opt.clear_grad()
        mean, var = 0.9 * mean + 0.1 * features.mean(0), 0.9 * var + 0.1 * features.var(0, ddof=1)
    assert max_abs(model.head[0]._mean.numpy(), mean) < 1e-6
    assert max_abs(model.head[0]._variance.numpy(), var) < 1e-5 * np.abs(var).max()
