"""Vision Transformer building blocks with the semantics of timm 0.3.2 as used by the official MAE."""
import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.distributed.fleet.utils import recompute


def xavier_uniform_(param, fan_in, fan_out):
    """PyTorch xavier_uniform_ with explicit fans (Paddle's rule for 4-D weights differs)."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(param, -bound, bound)


def trunc_normal_(param, std=0.02, a=-2.0, b=2.0):
    """timm trunc_normal_: N(0, std) truncated at absolute bounds a, b."""
    nn.init.trunc_normal_(param, mean=0.0, std=std, a=a, b=b)


def normal_(param, std):
    nn.init.normal_(param, 0.0, std)


def zeros_(param):
    nn.init.zeros_(param)


def ones_(param):
    nn.init.ones_(param)


def conv_default_bias_(bias, fan_in):
    """PyTorch's Conv2d default bias init U(+-1/sqrt(fan_in)); Paddle's default is zero."""
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(bias, -bound, bound)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with timm's epsilon (1e-6)."""

    def __init__(self, normalized_shape, epsilon=1e-6, **kwargs):
        super().__init__(normalized_shape, epsilon=epsilon, **kwargs)


class PatchEmbed(nn.Layer):
    """Image to patch embedding: a p x p conv with stride p, flattened to [N, L, D]."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2D(in_chans, embed_dim, patch_size, stride=patch_size)
        conv_default_bias_(self.proj.bias, in_chans * patch_size * patch_size)

    def forward(self, x):
        H, W = x.shape[2:]
        if (H, W) != self.img_size:
            raise ValueError(f"input size ({H}x{W}) does not match the model ({self.img_size[0]}x{self.img_size[1]})")
        return self.proj(x).flatten(2).transpose([0, 2, 1])


class DropPath(nn.Layer):
    """Stochastic depth on the residual branch: keep each sample with prob 1 - p, rescale by 1 / (1 - p)."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def keep_mask(self, x):
        """One 0/1 value per sample, 1 with probability 1 - p, shaped to broadcast over x."""
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        return paddle.floor(1.0 - self.drop_prob + paddle.rand(shape, dtype=x.dtype))

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        return x / (1.0 - self.drop_prob) * self.keep_mask(x)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


class Attention(nn.Layer):
    """Multi-head self-attention. With fused_attn (the default) through F.scaled_dot_product_attention, which
    takes the flash kernel on GPUs; otherwise softmax(q k^T * scale) v written out, as timm's (exported models
    use that form)."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias_attr=None if qkv_bias else False)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_attn = True

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape([B, N, 3, self.num_heads, self.head_dim])
        if self.fused_attn:  # layout [B, N, H, hd]; its default scale is head_dim ** -0.5, and Paddle picks
            # the flash kernel only when no explicit scale is passed
            q, k, v = qkv.unbind(2)
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop, training=self.training)
        else:
            q, k, v = qkv.transpose([2, 0, 3, 1, 4]).unbind(0)  # each [B, H, N, hd]
            attn = F.softmax(paddle.matmul(q * self.scale, k, transpose_y=True), axis=-1)  # scale the smaller operand
            attn = F.dropout(attn, self.attn_drop, training=self.training)
            x = (attn @ v).transpose([0, 2, 1, 3])
        return self.proj_drop(self.proj(x.reshape([B, N, C])))


class Mlp(nn.Layer):
    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Layer):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, norm_layer=LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.recompute = False  # recompute activations in the backward pass (memory for time)

    def _forward(self, x):
        x = self.residual(x, self.attn(self.norm1(x)))
        return self.residual(x, self.mlp(self.norm2(x)))

    def residual(self, x, branch):
        """x + DropPath(branch)."""
        return x + self.drop_path(branch)

    def forward(self, x):
        if self.recompute and self.training:
            # the hook-based (non-reentrant) mode: the re-entrant PyLayer breaks DataParallel's gradient reducer
            return recompute(self._forward, x, use_reentrant=False)
        return self._forward(x)


def drop_path_schedule(drop_path_rate, depth):
    """Stochastic depth rate of each block, linearly increasing from 0."""
    if depth == 1:
        return [0.0]
    return [drop_path_rate * i / (depth - 1) for i in range(depth)]


def set_recompute(model, enabled):
    """Activation recomputation in every transformer block of the model (encoder and decoder)."""
    for layer in model.sublayers():
        if isinstance(layer, Block):
            layer.recompute = enabled


def set_fused_attention(model, enabled):
    """Attention through F.scaled_dot_product_attention (True) or written out (False) in every block."""
    for layer in model.sublayers():
        if isinstance(layer, Attention):
            layer.fused_attn = enabled
