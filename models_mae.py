"""Masked autoencoder with a ViT encoder and a light ViT decoder (He et al., 2021)."""

import paddle
import paddle.nn as nn

from layer import Block, LayerNorm, PatchEmbed, normal_, ones_, xavier_uniform_, zeros_
from util.pos_embed import get_2d_sincos_pos_embed


class MaskedAutoencoderViT(nn.Layer):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_layer=nn.LayerNorm, norm_pix_loss=False):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.in_chans = in_chans
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches

        self.cls_token = self.create_parameter([1, 1, embed_dim], default_initializer=nn.initializer.Constant(0.0))
        self.pos_embed = self.create_parameter([1, num_patches + 1, embed_dim],
                                               default_initializer=nn.initializer.Constant(0.0))
        self.pos_embed.stop_gradient = True  # fixed sin-cos
        self.blocks = nn.LayerList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                    for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = self.create_parameter([1, 1, decoder_embed_dim],
                                                default_initializer=nn.initializer.Constant(0.0))
        self.decoder_pos_embed = self.create_parameter([1, num_patches + 1, decoder_embed_dim],
                                                       default_initializer=nn.initializer.Constant(0.0))
        self.decoder_pos_embed.stop_gradient = True
        self.decoder_blocks = nn.LayerList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)

        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    def initialize_weights(self):
        grid = self.patch_embed.grid_size[0]
        for pos_embed in (self.pos_embed, self.decoder_pos_embed):
            table = get_2d_sincos_pos_embed(pos_embed.shape[-1], grid, cls_token=True)
            nn.initializer.Assign(table[None].astype("float32"))(pos_embed)
        w = self.patch_embed.proj.weight  # xavier on the [D, C*p*p] view, as the official
        xavier_uniform_(w, fan_in=w.shape[1] * w.shape[2] * w.shape[3], fan_out=w.shape[0])
        normal_(self.cls_token, std=0.02)
        normal_(self.mask_token, std=0.02)
        for m in self.sublayers():
            if isinstance(m, nn.Linear):
                xavier_uniform_(m.weight, *m.weight.shape)
                if m.bias is not None:
                    zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                ones_(m.weight)
                zeros_(m.bias)

    def patchify(self, imgs):
        """[N, C, H, W] -> [N, L, p*p*C], channel fastest within a patch."""
        p = self.patch_embed.patch_size[0]
        assert imgs.shape[2] == imgs.shape[3] and imgs.shape[2] % p == 0
        h = w = imgs.shape[2] // p
        x = imgs.reshape([imgs.shape[0], self.in_chans, h, p, w, p])
        x = x.transpose([0, 2, 4, 3, 5, 1])
        return x.reshape([imgs.shape[0], h * w, p * p * self.in_chans])

    def unpatchify(self, x):
        """[N, L, p*p*C] -> [N, C, H, W]."""
        p = self.patch_embed.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1]
        x = x.reshape([x.shape[0], h, w, p, p, self.in_chans])
        x = x.transpose([0, 5, 1, 3, 2, 4])
        return x.reshape([x.shape[0], self.in_chans, h * p, h * p])

    def random_masking(self, x, mask_ratio, noise=None):
        """Keep the len_keep patches with the smallest noise. Returns kept tokens, mask (1 = removed), ids_restore."""
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = paddle.rand([N, L])
        ids_shuffle = paddle.argsort(noise, axis=1)
        ids_restore = paddle.argsort(ids_shuffle, axis=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = paddle.take_along_axis(x, ids_keep.unsqueeze(-1), axis=1, broadcast=True)
        mask = paddle.ones([N, L], dtype=x.dtype)
        mask[:, :len_keep] = 0
        mask = paddle.take_along_axis(mask, ids_restore, axis=1)
        return x_masked, mask, ids_restore

    def forward_encoder(self, x, mask_ratio, noise=None):
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        return self.norm(self.forward_blocks(x)), mask, ids_restore

    def forward_blocks(self, x):
        """The class token (with its position) before the patch tokens x, through the encoder's blocks."""
        cls_tokens = (self.cls_token + self.pos_embed[:, :1, :]).expand([x.shape[0], -1, -1])
        x = paddle.concat([cls_tokens, x], axis=1)
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward_features(self, imgs, pool="avg"):
        """[N, D] encoder features with every patch visible (no masking), for the k-NN monitor and feature
        extraction: 'avg', the mean of the patch tokens through the final norm (every patch token is trained
        through the reconstruction); 'cls', the class token through it."""
        x = self.forward_blocks(self.patch_embed(imgs) + self.pos_embed[:, 1:, :])
        return self.norm(x)[:, 0] if pool == "cls" else self.norm(x[:, 1:, :].mean(axis=1))

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        N, L = ids_restore.shape
        mask_tokens = self.mask_token.expand([N, L + 1 - x.shape[1], -1])
        x_ = paddle.concat([x[:, 1:, :], mask_tokens], axis=1)
        x_ = paddle.take_along_axis(x_, ids_restore.unsqueeze(-1), axis=1, broadcast=True)  # unshuffle
        x = paddle.concat([x[:, :1, :], x_], axis=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error on the removed patches; per-patch normalised target with norm_pix_loss."""
        target = self.patchify(imgs).astype("float32")
        pred = pred.astype("float32")  # under float16 autocast the loss is still computed in float32
        if self.norm_pix_loss:
            mean = target.mean(axis=-1, keepdim=True)
            var = paddle.square(target - mean).sum(axis=-1, keepdim=True) / (target.shape[-1] - 1)  # unbiased
            target = (target - mean) / paddle.sqrt(var + 1.0e-6)
        loss = paddle.square(pred - target).mean(axis=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


def _mae(embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth, decoder_num_heads, kwargs):
    return MaskedAutoencoderViT(
        embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads,
        mlp_ratio=4, norm_layer=LayerNorm, **kwargs)


def mae_vit_base_patch16_dec512d8b(**kwargs):
    return _mae(768, 12, 12, 512, 8, 16, {"patch_size": 16, **kwargs})


def mae_vit_large_patch16_dec512d8b(**kwargs):
    return _mae(1024, 24, 16, 512, 8, 16, {"patch_size": 16, **kwargs})


def mae_vit_huge_patch14_dec512d8b(**kwargs):
    return _mae(1280, 32, 16, 512, 8, 16, {"patch_size": 14, **kwargs})


def mae_vit_small_patch4_dec256d4b(**kwargs):
    """ViT-S encoder (384-d, 12 blocks, 6 heads) for 32x32 inputs, 256-d 4-block decoder."""
    return _mae(384, 12, 6, 256, 4, 8, {"patch_size": 4, "img_size": 32, **kwargs})


def mae_vit_tiny_patch4_dec128d4b(**kwargs):
    """ViT-Tiny encoder (192-d, 12 blocks, 3 heads) for 32x32 inputs, 128-d 4-block decoder."""
    return _mae(192, 12, 3, 128, 4, 4, {"patch_size": 4, "img_size": 32, **kwargs})


def mae_vit_micro_patch4_dec32d2b(**kwargs):
    """64-d, 2 blocks, 4 heads for 32x32 inputs, 32-d 2-block decoder: the configuration of tests/golden."""
    return _mae(64, 2, 4, 32, 2, 4, {"patch_size": 4, "img_size": 32, **kwargs})


mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b  # decoder: 512 dim, 8 blocks
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b
mae_vit_small_patch4 = mae_vit_small_patch4_dec256d4b
mae_vit_tiny_patch4 = mae_vit_tiny_patch4_dec128d4b
mae_vit_micro_patch4 = mae_vit_micro_patch4_dec32d2b

MODELS = ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14",
          "mae_vit_small_patch4", "mae_vit_tiny_patch4", "mae_vit_micro_patch4")
