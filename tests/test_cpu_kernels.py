"""The fused CPU kernels against Paddle's own ops, the blocks with and without them, the fallback, and
configure_cpu's malloc setting."""
import resource
import types

import numpy as np
import paddle
import pytest
import paddle.nn.functional as F

import util.adamw
from helpers import tiny_vit
from layer import set_fused_attention
from util import cpu_kernels
from util.cpu_layer import attach_cpu_paths
from util.adamw import AdamW
from util.cpu import cpu_has_avx512f
from util.lr_decay import param_groups_lrd


@pytest.fixture(autouse=True)
def loaded_kernels():
    """The kernels loaded first, as attach_cpu_paths and AdamW do before they call them (whichever test of
    this file a pytest-xdist worker runs first)."""
    assert cpu_kernels.available()


def forward_and_grads(fn, inputs, dy):
    for t in inputs:
        t.stop_gradient = False
    y = fn(*inputs)
    return [y.numpy()] + [g.numpy() for g in paddle.grad(y, inputs, dy)]


def assert_same(fused, plain, tol=1e-5):
    for a, b in zip(fused, plain):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())


def test_kernels_are_built_here():
    assert cpu_kernels.available()


def test_bias_gelu_matches_paddle():
    paddle.seed(0)
    h, b, dy = paddle.randn([3, 17, 96]) * 3, paddle.randn([96]), paddle.randn([3, 17, 96])
    assert_same(forward_and_grads(cpu_kernels.bias_gelu, [h, b], dy),
                forward_and_grads(lambda h, b: F.gelu(h + b), [h, b], dy))


def test_layer_norm_matches_paddle():
    paddle.seed(0)
    x, w, b = paddle.randn([2, 9, 64]) * 4 + 2, paddle.randn([64]), paddle.randn([64])
    dy = paddle.randn([2, 9, 64])
    assert_same(forward_and_grads(lambda x, w, b: cpu_kernels.layer_norm(x, w, b, 1e-6), [x, w, b], dy),
                forward_and_grads(lambda x, w, b: F.layer_norm(x, [64], w, b, 1e-6), [x, w, b], dy))


def test_softmax_matches_paddle():
    paddle.seed(0)
    x, dy = paddle.randn([2, 3, 17, 17]) * 5, paddle.randn([2, 3, 17, 17])
    assert_same(forward_and_grads(cpu_kernels.softmax, [x], dy),
                forward_and_grads(lambda x: F.softmax(x, axis=-1), [x], dy))


def test_split_and_merge_heads_match_transposes():
    paddle.seed(0)
    B, N, H, D = 2, 5, 3, 4
    qkv, dy = paddle.randn([B, N, 3 * H * D]), paddle.randn([B, N, H * D])

    def attention(split, merge):
        def run(qkv):
            q, k, v = split(qkv)
            return merge(F.softmax(paddle.matmul(q, k, transpose_y=True), axis=-1) @ v)
        return run

    def split(qkv):
        q, k, v = qkv.reshape([B, N, 3, H, D]).transpose([2, 0, 3, 1, 4]).unbind(0)
        return q * 0.5, k, v

    fused = attention(lambda t: cpu_kernels.split_heads(t, H, 0.5), cpu_kernels.merge_heads)
    plain = attention(split, lambda t: t.transpose([0, 2, 1, 3]).reshape([B, N, H * D]))
    assert_same(forward_and_grads(fused, [qkv], dy), forward_and_grads(plain, [qkv], dy))


def test_residual_drop_path_matches_paddle():
    paddle.seed(0)
    x, y, dy = paddle.randn([4, 5, 8]), paddle.randn([4, 5, 8]), paddle.randn([4, 5, 8])
    mask = paddle.to_tensor([1.0, 0.0, 1.0, 1.0]).reshape([4, 1, 1])
    assert_same(forward_and_grads(lambda x, y: cpu_kernels.residual_drop_path(x, y, mask, 0.8), [x, y], dy),
                forward_and_grads(lambda x, y: x + y / 0.8 * mask, [x, y], dy))


def test_kernels_read_strided_input():
    """A transposed view (as with Paddle's strided kernels on) is read in logical order."""
    x = paddle.randn([4, 6, 10])
    paddle.set_flags({"FLAGS_use_stride_kernel": True})
    try:
        view = x.transpose([1, 0, 2])
        assert not view.is_contiguous()
        fused = cpu_kernels.softmax(view).numpy()
    finally:
        paddle.set_flags({"FLAGS_use_stride_kernel": False})
    assert np.allclose(fused, F.softmax(x, axis=-1).numpy().transpose(1, 0, 2), atol=1e-6)


def test_vit_with_and_without_the_cpu_layer():
    """A training step's loss and gradients are the same through the attached CPU layer (fused kernels) and
    through the model's own blocks (attention written out, and fused)."""
    paddle.seed(0)
    model = tiny_vit(drop_path_rate=0.3)
    model.train()
    x = paddle.randn([2, 3, 32, 32])

    def step(model):
        paddle.seed(1)  # same drop-path draws
        loss = model(x).square().mean()
        loss.backward()
        grads = [p.grad.numpy().copy() for p in model.parameters()]
        model.clear_gradients()
        return [loss.numpy()] + grads

    plain = step(model)
    set_fused_attention(model, False)
    written_out = step(model)
    assert_same(plain, written_out)
    fast = tiny_vit(drop_path_rate=0.3)
    fast.set_state_dict(model.state_dict())
    attach_cpu_paths(fast).train()
    assert any(isinstance(layer.__dict__.get("forward"), types.MethodType) for layer in fast.sublayers())
    assert_same(written_out, step(fast))


def _adamw_steps(optimizer_class):
    """Three fine-tuning steps (layer-wise lr groups, no-decay group, changing lr): parameters and state."""
    paddle.seed(0)
    model = tiny_vit()
    groups = param_groups_lrd(model, 0.05, model.no_weight_decay(), layer_decay=0.75)
    opt = optimizer_class(learning_rate=1e-3, parameters=groups, beta1=0.9, beta2=0.95)
    for i in range(3):
        paddle.seed(10 + i)
        model(paddle.randn([2, 3, 32, 32])).square().mean().backward()
        opt.set_lr(1e-3 * (i + 1))
        opt.step()
        opt.clear_grad()
    return model.state_dict(), opt.state_dict()


def test_adamw_kernel_matches_paddle_bit_for_bit(monkeypatch):
    """The fused AdamW (forced here) against paddle.optimizer.AdamW: identical parameters and optimizer state
    where Paddle runs its element-wise CPU kernel (no AVX-512), the fused kernel's arithmetic. With AVX-512
    Paddle runs a JIT kernel that rounds differently: there within the golden tolerance of a step (1e-6 for
    parameters; accumulators within 1e-5 of their largest value)."""
    calls = []
    fused_step = cpu_kernels.adamw_
    monkeypatch.setattr(cpu_kernels, "adamw_", lambda *a: calls.append(1) or fused_step(*a))
    monkeypatch.setattr(util.adamw, "cpu_has_avx512f", lambda: False)
    (params, state), (ref_params, ref_state) = _adamw_steps(AdamW), _adamw_steps(paddle.optimizer.AdamW)
    assert len(calls) == 3 * len(params)

    def same(a, b, tol):
        if cpu_has_avx512f():
            assert np.abs(a - b).max() <= tol
        else:
            assert np.array_equal(a, b)

    assert params.keys() == ref_params.keys()
    for k in params:
        same(params[k].numpy(), ref_params[k].numpy(), 1e-6)
    # accumulators are named after each model's layers ("linear_8.w_0_moment1_0"): compare them in order
    tensors = [(k, v) for k, v in state.items() if isinstance(v, paddle.Tensor)]
    ref_tensors = [(k, v) for k, v in ref_state.items() if isinstance(v, paddle.Tensor)]
    assert len(tensors) == len(ref_tensors) == 4 * len(params)
    for (k, v), (ref_k, ref_v) in zip(tensors, ref_tensors):
        assert k.split(".")[-1] == ref_k.split(".")[-1]
        same(v.numpy(), ref_v.numpy(), 1e-5 * np.abs(ref_v.numpy()).max())


def test_adamw_takes_paddles_kernel_on_avx512(monkeypatch):
    """With AVX-512 the AdamW class routes every parameter to Paddle's own (vectorized) step."""
    calls = []
    fused_step = cpu_kernels.adamw_
    monkeypatch.setattr(cpu_kernels, "adamw_", lambda *a: calls.append(1) or fused_step(*a))
    monkeypatch.setattr(util.adamw, "cpu_has_avx512f", lambda: True)
    (params, _), (ref_params, _) = _adamw_steps(AdamW), _adamw_steps(paddle.optimizer.AdamW)
    assert calls == [] and all(np.array_equal(params[k].numpy(), ref_params[k].numpy()) for k in params)


def test_malloc_keeps_freed_memory():
    """After configure_cpu (conftest), a freed 64 MB tensor's memory is reused, not mapped
    afresh (16385 page faults each time without it)."""
    def faults_to_fill(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = paddle.ones([n])
        del block
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_to_fill(1 << 24)
    assert faults_to_fill(1 << 24) < 1000
