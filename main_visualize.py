"""MAE reconstructions as in the official demo: original | masked | prediction | prediction + visible, under
a row of headings that name the columns.

    python main_visualize.py --model mae_vit_large_patch16 --resume mae_visualize_vit_large.pth \\
        --img_path demo/chelsea.png --output recon.png

Each image is resized to the model's input size; one row per image. --seed fixes the mask (same seed, same
mask). For norm_pix_loss models the prediction of a patch is in units of that patch's own mean and std,
which a removed patch does not reveal: here they are estimated from the visible patches around it.
"""
import util  # noqa: F401  (first: keeps Paddle's import-time ccache warning off the console)
import argparse
import os

import numpy as np
import paddle
from PIL import Image

import models_mae
from util.args import (add_cache_arg, check_environment, check_model_input, checkpoint_file, positive_int, ratio,
                       seed)
from util.classifier import image_paths
from util.datasets import load_image
from util.factory import checkpoint_img_size, prepare
from util.cpu import configure_cpu
from util.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from util.errors import CheckpointError, WriteError, run
from util.weights import check_state_dict, load_checkpoint, match_dtypes
from util.checkpoint import recorded_flags
from util.files import atomic_write


def get_args_parser():
    parser = argparse.ArgumentParser("MAE reconstruction visualisation", add_help=True)
    parser.add_argument("--img_path", nargs="+", required=True, help="image files and/or folders of images")
    parser.add_argument("--model", default="mae_vit_large_patch16", choices=models_mae.MODELS)
    parser.add_argument("--resume", required=True,
                        help="MAE checkpoint with its decoder (.pd, or an official mae_visualize_*.pth / *_full.pth)")
    parser.add_argument("--output", default="mae_reconstruction.png", help="PNG file to write")
    parser.add_argument("--mask_ratio", default=0.75, type=ratio)
    parser.add_argument("--seed", default=2, type=seed, help="the same seed gives the same mask")
    parser.add_argument("--input_size", default=None, type=positive_int, help="default: the checkpoint's")
    parser.add_argument("--scale", default=1, type=positive_int,
                        help="enlarge every panel this many times (nearest neighbour), so that patches and masks of "
                             "small images can be seen")
    parser.add_argument("--norm_pix_loss", action="store_true",
                        help="the model was trained with norm_pix_loss (read from our checkpoints' args)")
    add_cache_arg(parser)
    return parser


def load_mae(args):
    ckpt = load_checkpoint(args.resume)
    state = ckpt["model"]
    if not any(k.startswith("decoder_") for k in state):
        raise CheckpointError(f"{args.resume}: no decoder weights (the released mae_pretrain_vit_*.pth are encoder "
                              "only; use mae_visualize_vit_*.pth or mae_pretrain_vit_*_full.pth)")
    norm_pix = args.norm_pix_loss or bool(recorded_flags(ckpt).get("norm_pix_loss", False))
    size = args.input_size or checkpoint_img_size(args.model, state, args.resume)
    model = getattr(models_mae, args.model)(img_size=size, norm_pix_loss=norm_pix)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.endswith("pos_embed") and list(np.shape(v)) != own[k].shape)}
    check_state_dict(model, state, args.resume, allow_missing=("pos_embed", "decoder_pos_embed"))
    model.set_state_dict(match_dtypes(model, state, args.resume))  # sin-cos tables: rebuilt for another size
    model.eval()
    return prepare(model)[0], norm_pix


def unnormalise_patches(pred, target, mask, grid):
    """Map norm-pix predictions back to the input scale with each removed patch's neighbours' statistics."""
    mean = target.mean(-1)
    std = np.sqrt(target.var(-1, ddof=1) + 1e-6)
    out = pred.copy()
    visible = mask.reshape(grid, grid) == 0
    means, stds = mean.reshape(grid, grid), std.reshape(grid, grid)
    for i in range(grid * grid):
        r, c = divmod(i, grid)
        if visible[r, c]:
            m, s = mean[i], std[i]
        else:
            for radius in range(1, grid):
                win = (slice(max(r - radius, 0), r + radius + 1), slice(max(c - radius, 0), c + radius + 1))
                if visible[win].any():
                    m, s = means[win][visible[win]].mean(), stds[win][visible[win]].mean()
                    break
        out[i] = pred[i] * s + m
    return out


def to_uint8(chw):
    mean = np.asarray(IMAGENET_DEFAULT_MEAN).reshape(3, 1, 1)
    std = np.asarray(IMAGENET_DEFAULT_STD).reshape(3, 1, 1)
    return np.clip((chw * std + mean) * 255, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def reconstruct(model, imgs, mask_ratio, seed, norm_pix):
    """Rows of [original, masked, reconstruction, reconstruction + visible] as uint8 HWC arrays."""
    n, num_patches = imgs.shape[0], model.patch_embed.num_patches
    noise = paddle.to_tensor(np.random.RandomState(seed).rand(n, num_patches).astype(np.float32))
    x = paddle.to_tensor(imgs)
    with paddle.no_grad():
        _, pred, mask = model(x, mask_ratio=mask_ratio, noise=noise)
    pred, mask = pred.numpy(), mask.numpy()
    if norm_pix:
        target = model.patchify(x).numpy()
        grid = model.patch_embed.grid_size[0]
        pred = np.stack([unnormalise_patches(pred[i], target[i], mask[i], grid) for i in range(n)])
    p = model.patch_embed.patch_size[0]
    y = model.unpatchify(paddle.to_tensor(pred)).numpy()
    m = model.unpatchify(paddle.to_tensor(np.repeat(mask[:, :, None], p * p * 3, axis=2))).numpy()
    rows = []
    for i in range(n):
        panels = [imgs[i], imgs[i] * (1 - m[i]), y[i], imgs[i] * (1 - m[i]) + y[i] * m[i]]
        rows.append([to_uint8(panel) for panel in panels])
    return rows


HEADINGS = ("original", "masked", "prediction", "prediction + visible")


def heading_height(panel):
    """Pixels of the band that names the columns above panels `panel` pixels wide."""
    return max(12, panel // 8)


def with_headings(grid, panel):
    """The picture with a white band on top naming its four columns (black text, as large as fits)."""
    from PIL import ImageDraw, ImageFont

    height = heading_height(panel)
    band = Image.new("RGB", (grid.shape[1], height), "white")
    draw = ImageDraw.Draw(band)
    for i, text in enumerate(HEADINGS):
        size = int(height * 0.8)
        font = ImageFont.load_default(size=size)
        while size > 6 and draw.textlength(text, font=font) > panel - 2:
            size -= 1
            font = ImageFont.load_default(size=size)
        width = draw.textlength(text, font=font)
        draw.text((i * panel + (panel - width) / 2, height / 2), text, fill="black", font=font, anchor="lm")
    return np.concatenate([np.asarray(band), grid], axis=0)


def write_png(pixels, path):
    """Atomically (util.files.atomic_write)."""
    if os.path.isdir(path):
        raise IsADirectoryError(21, "is a folder", path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, suffix=".png") as tmp:
        Image.fromarray(pixels).save(tmp)


def check_picture(parser, args, rows, patch_embed):
    """parser.error (exit 2) for a mask ratio that leaves no visible patch, or a picture larger than Pillow
    opens (its decompression-bomb limit), before any work."""
    if int(patch_embed.num_patches * (1 - args.mask_ratio)) < 1:
        parser.error(f"argument --mask_ratio: {args.mask_ratio} of {patch_embed.num_patches} patches leaves no "
                     "visible patch")
    side = patch_embed.img_size[0] * args.scale
    height = rows * side + heading_height(side)
    if 4 * side * height > Image.MAX_IMAGE_PIXELS:
        parser.error(f"argument --scale: {args.scale} makes a {4 * side}x{height} px picture, more than the "
                     f"{Image.MAX_IMAGE_PIXELS} pixels an image viewer (Pillow) opens; use a smaller --scale or fewer "
                     "images")


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_model_input(parser, args.model, args.input_size, models_mae.MODELS)
    check_environment(parser)
    args.resume = checkpoint_file(parser, "--resume", args.resume, args.cache_dir)
    paddle.set_device("cpu")
    configure_cpu()
    paths = image_paths(args.img_path)
    model, norm_pix = load_mae(args)
    check_picture(parser, args, len(paths), model.patch_embed)
    size = model.patch_embed.img_size[0]
    imgs = np.stack([
        (np.asarray(load_image(p).resize((size, size), Image.BICUBIC), np.float32).transpose(2, 0, 1) / 255.0
         - np.asarray(IMAGENET_DEFAULT_MEAN, np.float32).reshape(3, 1, 1))
        / np.asarray(IMAGENET_DEFAULT_STD, np.float32).reshape(3, 1, 1) for p in paths])
    if norm_pix:
        print("norm_pix_loss model: removed patches are un-normalised with the mean and std of nearby visible patches")
    rows = reconstruct(model, imgs, args.mask_ratio, args.seed, norm_pix)
    grid = np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0)
    grid = grid.repeat(args.scale, axis=0).repeat(args.scale, axis=1)
    grid = with_headings(grid, model.patch_embed.img_size[0] * args.scale)
    try:
        write_png(grid, args.output)
    except OSError as e:
        raise WriteError(f"--output {args.output}: cannot write there ({e.strerror or e})") from None
    print(f"wrote {args.output}: {len(rows)} image(s) x [{' | '.join(HEADINGS)}] under a row of headings, "
          f"{grid.shape[1]}x{grid.shape[0]} px")


if __name__ == "__main__":
    run(main)
