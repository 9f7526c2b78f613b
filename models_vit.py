"""Vision Transformer for fine-tuning and linear probing, with optional global average pooling."""
import warnings

import paddle
import paddle.nn as nn

from layer import Block, LayerNorm, PatchEmbed, drop_path_schedule, ones_, trunc_normal_, zeros_
from util import compat


class VisionTransformer(nn.Layer):
    """timm 0.3.2 ViT with the official MAE head: global_pool uses fc_norm on the mean of patch tokens."""

    def __init__(self, global_pool=False, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, norm_layer=None):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        norm_layer = norm_layer or LayerNorm
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = self.create_parameter([1, 1, embed_dim], default_initializer=nn.initializer.Constant(0.0))
        self.pos_embed = self.create_parameter([1, num_patches + 1, embed_dim],
                                               default_initializer=nn.initializer.Constant(0.0))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = drop_path_schedule(drop_path_rate, depth)
        self.blocks = nn.LayerList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], norm_layer)
            for i in range(depth)])
        if global_pool:
            self.fc_norm = norm_layer(embed_dim)
        else:
            self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.initialize_weights()

    def initialize_weights(self):
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.sublayers():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                ones_(m.weight)
                zeros_(m.bias)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def forward_features(self, x, pool=None):
        """[N, D] features. pool None: the official pooling (the mean of the patch tokens through fc_norm with
        global_pool, else the class token through the final norm); 'avg' (the mean through fc_norm, or the
        final norm of a class-token model) or 'cls' choose (util.features)."""
        x = self.patch_embed(x)
        cls_tokens = self.cls_token.expand([x.shape[0], -1, -1])
        x = paddle.concat([cls_tokens, x], axis=1) + self.pos_embed
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x)
        if (pool or ("avg" if self.global_pool else "cls")) == "cls":
            return self.norm(x)[:, 0]
        return (self.fc_norm if self.global_pool else self.norm)(x[:, 1:, :].mean(axis=1))

    def forward(self, x):
        return self.head(self.forward_features(x))


class BatchNorm1D(nn.BatchNorm1D):
    """BatchNorm1D whose running variance follows PyTorch's: training normalises with the biased batch
    variance (as Paddle does), but the running estimate is updated with the unbiased one (x n / (n - 1)),
    where Paddle's own layer uses the biased one."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        if x.shape[0] < 2:
            raise ValueError(f"BatchNorm needs more than one sample per batch in training, got {x.shape[0]}")
        variance, momentum = compat.batch_norm_running_variance(self)
        running_var = variance.clone()
        with warnings.catch_warnings():  # Paddle's note that training tracks the running statistics
            warnings.filterwarnings("ignore", message="When training, we now always track")
            y = super().forward(x)
        with paddle.no_grad():
            centred = x.astype("float32") - x.astype("float32").mean(axis=0)
            batch_var = (centred * centred).sum(axis=0) / (x.shape[0] - 1)
            variance.set_value(running_var * momentum + batch_var * (1.0 - momentum))
        return y


def add_bn_head(model):
    """Linear-probing head: BatchNorm1D without affine parameters (eps 1e-6) before the Linear head."""
    model.head = nn.Sequential(
        BatchNorm1D(model.head.weight.shape[0], weight_attr=False, bias_attr=False, epsilon=1e-6), model.head)
    return model


def _vit(embed_dim, depth, num_heads, kwargs):
    return VisionTransformer(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4,
                             qkv_bias=True, norm_layer=LayerNorm, **kwargs)


def vit_base_patch16(**kwargs):
    return _vit(768, 12, 12, {"patch_size": 16, **kwargs})


def vit_large_patch16(**kwargs):
    return _vit(1024, 24, 16, {"patch_size": 16, **kwargs})


def vit_huge_patch14(**kwargs):
    return _vit(1280, 32, 16, {"patch_size": 14, **kwargs})


def vit_small_patch4(**kwargs):
    """ViT-S (384-d, 12 blocks, 6 heads) for 32x32 inputs."""
    return _vit(384, 12, 6, {"patch_size": 4, "img_size": 32, **kwargs})


def vit_tiny_patch4(**kwargs):
    """ViT-Tiny (192-d, 12 blocks, 3 heads) for 32x32 inputs."""
    return _vit(192, 12, 3, {"patch_size": 4, "img_size": 32, **kwargs})


def vit_micro_patch4(**kwargs):
    """64-d, 2 blocks, 4 heads for 32x32 inputs: the configuration of tests/golden."""
    return _vit(64, 2, 4, {"patch_size": 4, "img_size": 32, **kwargs})


MODELS = ("vit_base_patch16", "vit_large_patch16", "vit_huge_patch14", "vit_small_patch4", "vit_tiny_patch4",
          "vit_micro_patch4")
