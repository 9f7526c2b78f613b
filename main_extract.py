"""Encoder features of a folder of images, without masking, into one .npz file.

    python main_extract.py --model vit_base_patch16 --finetune mae_pretrain_vit_base --data_path DATA/val \
        --output val_features.npz [--pool avg|cls] [--input_size 224] [--batch_size 64]
    python -m paddle.distributed.launch --nproc_per_node 2 main_extract.py ...   # the ranks share the images

--data_path is a folder of class folders (labels are their sorted indices) or a folder of images (labels -1).
--finetune takes our pre-training, fine-tuning or linear-probing checkpoints, an official .pth, or a released
name. The file holds `features` (float32, [N, D]), `labels` (int64), `paths` and `class_names`; rank 0
writes it. From Python: util.features.extract and util.features.encoder_features.
"""
import util  # noqa: F401  (first: keeps Paddle's import-time ccache warning off the console)
import argparse
import os
import sys

import numpy as np
import paddle

import models_vit
from util.args import add_cache_arg, check_model_input, checkpoint_file, device, non_negative_int, positive_int
from util.checkpoint import CheckpointError, load_checkpoint, load_pretrained
from util.classifier import image_paths
from util.cpu import configure_cpu
from util.cpu_layer import attach_cpu_paths
from util.datasets import DataError, ImageFolder, _class_folders
from util.dist import LaunchError, check_launch_environment, init_distributed_mode, is_main_process
from util.factory import checkpoint_img_size
from util.features import POOLS, extract, loaders_over
from util.run_dir import RunDirError, check_writable
from util.transforms import eval_transform


def get_args_parser():
    parser = argparse.ArgumentParser("Extract MAE encoder features", add_help=True)
    parser.add_argument("--model", default="vit_base_patch16", choices=models_vit.MODELS)
    parser.add_argument("--finetune", required=True, help="checkpoint (.pd, official .pth) or a released name")
    parser.add_argument("--data_path", required=True, help="a folder of class folders, or of images")
    parser.add_argument("--output", required=True, help="the .npz file to write")
    parser.add_argument("--pool", default="avg", choices=POOLS,
                        help="avg: mean of the patch tokens through the final norm (default); cls: the class token")
    parser.add_argument("--input_size", default=None, type=positive_int, help="default: the model's")
    parser.add_argument("--batch_size", default=64, type=positive_int)
    parser.add_argument("--num_workers", default=2, type=non_negative_int)
    parser.add_argument("--device", default="gpu" if paddle.is_compiled_with_cuda() else "cpu", type=device)
    add_cache_arg(parser)
    return parser


class ImageList(ImageFolder):
    """Given image files without class folders (label -1), read as ImageFolder reads its samples."""

    def __init__(self, paths, root, transform=None):
        self.root, self.transform, self.replaced, self.seed = root, transform, None, 0
        self.classes, self.class_to_idx = [], {}
        self.samples = [(p, -1) for p in paths]


def dataset_of(folder, transform):
    """ImageFolder when `folder` holds class folders, else its images with label -1."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: folder not found")
    if _class_folders(folder):
        return ImageFolder(folder, transform=transform)
    return ImageList(image_paths([folder]), folder, transform=transform)


def encoder(args):
    """The ViT encoder of the checkpoint, with the norm --pool needs (avg: fc_norm, from the pre-trained final
    norm where the checkpoint has none), at --input_size or the checkpoint's own."""
    size = args.input_size or checkpoint_img_size(args.model, load_checkpoint(args.finetune)["model"], args.finetune)
    model = getattr(models_vit, args.model)(num_classes=0, global_pool=args.pool == "avg", img_size=size)
    load_pretrained(model, args.finetune, fc_norm_from_norm=True)
    model.eval()
    return attach_cpu_paths(model)


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_model_input(parser, args.model, args.input_size, models_vit.MODELS)
    if not args.output.endswith(".npz") or os.path.isdir(args.output):
        parser.error(f"argument --output: {args.output!r} is not a .npz file path")
    args.finetune = checkpoint_file(parser, "--finetune", args.finetune, args.cache_dir)
    try:
        check_launch_environment()
        if args.device == "cpu":
            configure_cpu()
        init_distributed_mode(args)
        if is_main_process():
            check_writable(os.path.dirname(os.path.abspath(args.output)), "--output")
        model = encoder(args)
        data = dataset_of(args.data_path, eval_transform(model.patch_embed.img_size[0]))
        print(f"{len(data)} images in {args.data_path}; {args.pool} features of {args.model}")
        features = extract(model, loaders_over(data, args.batch_size, args.num_workers), len(data), args.pool,
                           label="extracting")
        if is_main_process():
            tmp = args.output[:-len(".npz")] + ".tmp.npz"
            np.savez(tmp, features=features, labels=np.array([t for _, t in data.samples], np.int64),
                     paths=np.array([p for p, _ in data.samples]), class_names=np.array(data.classes))
            os.replace(tmp, args.output)
            print(f"wrote {args.output}: features {list(features.shape)}")
    except (CheckpointError, DataError, LaunchError, RunDirError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: cannot write {args.output}: {e.strerror or e}")


if __name__ == "__main__":
    main()
