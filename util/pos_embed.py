"""2-D sine-cosine position embeddings (MoCo v3 / official MAE layout) and their interpolation."""
import numpy as np
import paddle
import paddle.nn.functional as F


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """[grid_size**2 (+1), embed_dim] float64 table; a zero row is prepended for the cls token."""
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first, as in the official code
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    assert embed_dim % 2 == 0
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """All sines first, then all cosines (not interleaved)."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def interpolate_pos_embed(model, checkpoint_model):
    """Resize checkpoint_model['pos_embed'] in place to the model's patch grid (bicubic, cls token kept)."""
    if "pos_embed" not in checkpoint_model:
        return
    pos_embed_checkpoint = paddle.to_tensor(checkpoint_model["pos_embed"], dtype="float32")
    embedding_size = pos_embed_checkpoint.shape[-1]
    num_patches = model.patch_embed.num_patches
    num_extra_tokens = model.pos_embed.shape[-2] - num_patches
    orig_size = int(round((pos_embed_checkpoint.shape[-2] - num_extra_tokens) ** 0.5))
    new_size = int(round(num_patches ** 0.5))
    if orig_size == new_size:
        return
    print(f"Position interpolate from {orig_size}x{orig_size} to {new_size}x{new_size}")
    extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]
    pos_tokens = pos_embed_checkpoint[:, num_extra_tokens:]
    pos_tokens = pos_tokens.reshape([-1, orig_size, orig_size, embedding_size]).transpose([0, 3, 1, 2])
    pos_tokens = F.interpolate(pos_tokens, size=(new_size, new_size), mode="bicubic", align_corners=False)
    pos_tokens = pos_tokens.transpose([0, 2, 3, 1]).flatten(1, 2)
    checkpoint_model["pos_embed"] = paddle.concat([extra_tokens, pos_tokens], axis=1)
