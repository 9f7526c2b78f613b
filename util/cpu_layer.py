"""The CPU fast paths of the ViT blocks, attached from outside to a built model that runs on the CPU: linear
layers whose bias enters through addmm, attention written out (Paddle's fused attention is plain math on
the CPU), and, when the native kernels (util/cpu_kernels.py) could be built, fused bias + GELU, layer norm,
attention layouts and softmax, and residual branches under stochastic depth. Each attached forward computes
what the block's own forward does (tested against it) and hands over to it outside dynamic-mode float32 CPU
tensors, so that an attached model still exports; GPU runs and exports never attach."""
import types

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from layer import Attention, Block, DropPath, LayerNorm, Mlp, set_fused_attention
from util import compat, cpu_kernels


def attach_cpu_paths(model):
    """On the CPU, give model's layers their CPU forwards (a no-op on other devices); returns model."""
    if paddle.get_device() != "cpu":
        return model
    native = cpu_kernels.available()
    set_fused_attention(model, False)
    for layer in model.sublayers(include_self=True):
        if isinstance(layer, nn.Linear) and layer.bias is not None:
            _attach(layer, "forward", _linear)
        elif not native:
            continue
        elif isinstance(layer, LayerNorm):
            _attach(layer, "forward", _layer_norm)
        elif isinstance(layer, Attention):
            _attach(layer, "forward", _attention)
        elif isinstance(layer, Mlp):
            _attach(layer, "forward", _mlp)
        elif isinstance(layer, Block):
            _attach(layer, "residual", _residual)
    return model


def _attach(layer, name, fast):
    own = getattr(layer, name)
    setattr(layer, name, types.MethodType(lambda self, *args: fast(self, own, *args), layer))


def _cpu_float32(x):
    return paddle.in_dynamic_mode() and x.place.is_cpu_place() and x.dtype == paddle.float32


class CPULinear(PyLayer):
    """x @ W + b on CPU: the bias enters through addmm, and its gradient is the matrix product ones @ dy.
    Paddle's own CPU linear adds the bias and sums its gradient in single-threaded loops (~30x slower)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.needs_grad = [not t.stop_gradient for t in (x, weight, bias)]
        y = paddle.addmm(bias.unsqueeze(0), x.reshape([-1, x.shape[-1]]), weight)
        return y.reshape([*x.shape[:-1], weight.shape[1]])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensor()
        dy2 = dy.reshape([-1, dy.shape[-1]])
        needs_x, needs_w, needs_b = ctx.needs_grad  # None for a frozen input
        dx = paddle.matmul(dy2, weight, transpose_y=True).reshape(x.shape) if needs_x else None
        dw = paddle.matmul(x.reshape([-1, x.shape[-1]]), dy2, transpose_x=True) if needs_w else None
        db = paddle.matmul(paddle.ones([1, dy2.shape[0]], dy2.dtype), dy2).reshape([-1]) if needs_b else None
        return dx, dw, db


def _linear(layer, own, x):
    if not _cpu_float32(x):
        return own(x)
    return CPULinear.apply(x, layer.weight, layer.bias)


def _layer_norm(layer, own, x):
    shape, epsilon = compat.layer_norm_config(layer)
    if layer.weight is None or layer.bias is None or len(shape) != 1 or not _cpu_float32(x):
        return own(x)
    return cpu_kernels.layer_norm(x, layer.weight, layer.bias, epsilon)


def _attention(layer, own, x):
    if not _cpu_float32(x):
        return own(x)
    B, N, C = x.shape
    q, k, v = cpu_kernels.split_heads(layer.qkv(x), layer.num_heads, layer.scale)
    attn = cpu_kernels.softmax(paddle.matmul(q, k, transpose_y=True))
    attn = F.dropout(attn, layer.attn_drop, training=layer.training)
    return layer.proj_drop(layer.proj(cpu_kernels.merge_heads(attn @ v)))


def _mlp(layer, own, x):
    if layer.fc1.bias is None or not _cpu_float32(x):
        return own(x)
    x = cpu_kernels.bias_gelu(paddle.matmul(x, layer.fc1.weight), layer.fc1.bias)
    return layer.drop(layer.fc2(layer.drop(x)))


def _residual(block, own, x, branch):
    dp = block.drop_path
    if not (isinstance(dp, DropPath) and dp.training and dp.drop_prob > 0.0 and _cpu_float32(x)):
        return own(x, branch)
    return cpu_kernels.residual_drop_path(x, branch, dp.keep_mask(x), 1.0 - dp.drop_prob)
