"""Encoder features of a folder of images, without masking, into one .npz file.

    python main_extract.py --model vit_base_patch16 --finetune mae_pretrain_vit_base --data_path DATA/val \
        --output val_features.npz [--pool avg|cls] [--input_size 224] [--batch_size 64]
    python -m paddle.distributed.launch --nproc_per_node 2 main_extract.py ...   # the ranks share the images

--data_path is a folder of class folders (labels are their sorted indices) or a folder of images (labels -1);
a dataset root (train/ and val/ of class folders) needs --split train or --split val (another split's class
folders must be train/'s, so that a label means one class in both). Images beside folders are refused. Every
image appears once, in the order of ImageFolder (class folders) or sorted by name.
--finetune takes our pre-training, fine-tuning or linear-probing checkpoints, an official .pth, or a released
name. The file holds `features` (float32, [N, D]), `labels` (int64), `paths` and `class_names`; every rank
writes its rows as they are computed, rank 0 the .npz. A stop signal (SIGTERM, SIGINT, SIGHUP) ends it with
one line and no output. From Python: util.features.extract and the models' forward_features.
"""
import util  # noqa: F401  (first: keeps Paddle's import-time ccache warning off the console)
import argparse
import os
import signal

import numpy as np
import paddle

import models_vit
from util.args import (add_cache_arg, check_environment, check_model_input, checkpoint_file, crop_fraction, device,
                       non_negative_int, positive_int)
from util.cpu import configure_cpu
from util.datasets import STOP_SIGNALS, ImageFolder
from util.dist import all_gather, check_launch_environment, get_rank, init_distributed_mode, is_main_process
from util.factory import checkpoint_img_size, prepare
from util.image_index import IMG_EXTENSIONS, SampleIndex, class_folders
from util.features import POOLS, feature_batches, loaders_over, rank_share
from util.run_dir import check_writable
from util.transforms import eval_transform
from util.errors import DataError, WriteError, run
from util.weights import load_checkpoint, load_pretrained
from util.files import atomic_write


def get_args_parser():
    parser = argparse.ArgumentParser("Extract MAE encoder features", add_help=True)
    parser.add_argument("--model", default="vit_base_patch16", choices=models_vit.MODELS)
    parser.add_argument("--finetune", required=True, help="checkpoint (.pd, official .pth) or a released name")
    parser.add_argument("--data_path", required=True,
                        help="a folder of class folders, a folder of images, or a dataset root with --split")
    parser.add_argument("--split", default=None,
                        help="the sub-folder of --data_path to extract (e.g. train or val of a dataset root)")
    parser.add_argument("--output", required=True, help="the .npz file to write")
    parser.add_argument("--pool", default="avg", choices=POOLS,
                        help="avg: mean of the patch tokens through the final norm (default); cls: the class token")
    parser.add_argument("--input_size", default=None, type=positive_int, help="default: the model's")
    parser.add_argument("--crop_pct", default=None, type=crop_fraction,
                        help="resize to input_size / crop_pct, centre-crop; default the official 224/256 (1 above "
                             "224 px); 1 keeps the whole image")
    parser.add_argument("--batch_size", default=64, type=positive_int)
    parser.add_argument("--num_workers", default=2, type=non_negative_int)
    parser.add_argument("--device", default="gpu" if paddle.is_compiled_with_cuda() else "cpu", type=device)
    parser.add_argument("--no_amp", action="store_true", help="extract in float32 on GPU (CPU always is)")
    parser.add_argument("--amp_dtype", default="float16", choices=["float16", "bfloat16"],
                        help="autocast dtype on GPU, as in training")
    add_cache_arg(parser)
    return parser


class ImageList(ImageFolder):
    """Given image files without class folders (label -1), read as ImageFolder reads its samples."""

    def __init__(self, paths, root, transform=None):
        self.root, self.transform, self.replaced, self.seed = root, transform, None, 0
        self.classes, self.class_to_idx = [], {}
        self.samples = SampleIndex(paths, np.full(len(paths), -1))


SPLITS = ("train", "val")


def dataset_of(data_path, split, transform):
    """The images to extract, by one rule: --split NAME takes DATA/NAME; a dataset root (train/ or val/
    holding folders) needs --split; a folder of class folders gives each image its class folder's sorted
    index (another split's must be DATA/train's, so that a label means one class in both); a folder of
    images gives -1. Images beside folders are refused: neither rule covers them all."""
    folder = os.path.join(data_path, split) if split else data_path
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: folder not found")
    if not split:
        roots = [s for s in SPLITS if os.path.isdir(os.path.join(folder, s)) and
                 any(e.is_dir() for e in os.scandir(os.path.join(folder, s)))]
        if roots:
            raise DataError(f"{folder}: a dataset root ({', '.join(r + '/' for r in roots)} of class folders); "
                            f"choose the images with {' or '.join('--split ' + r for r in roots)} (or --data_path "
                            f"{os.path.join(folder, roots[0])})")
    entries = list(os.scandir(folder))
    images = sorted(e.path for e in entries if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
    folders = [e for e in entries if e.is_dir()]
    if images and folders:
        raise DataError(f"{folder}: {len(images)} image file(s) beside {len(folders)} folder(s); extraction takes "
                        "a folder of class folders or a folder of images, not both")
    if folders:
        train = os.path.join(data_path, "train")
        other_split = split not in (None, "train") and os.path.isdir(train)
        classes = [name for name, _ in class_folders(train)] if other_split else []
        if classes:  # labels mean train/'s classes, as in training
            return ImageFolder(folder, transform=transform, classes=classes, classes_from=train)
        return ImageFolder(folder, transform=transform)
    if not images:
        raise DataError(f"{folder}: no image files ({', '.join(IMG_EXTENSIONS)}) and no class folders")
    return ImageList(images, folder, transform=transform)


def encoder(args):
    """The ViT encoder of the checkpoint, with the norm --pool needs (avg: fc_norm, from the pre-trained final
    norm where the checkpoint has none), at --input_size or the checkpoint's own."""
    size = args.input_size or checkpoint_img_size(args.model, load_checkpoint(args.finetune)["model"], args.finetune)
    model = getattr(models_vit, args.model)(num_classes=0, global_pool=args.pool == "avg", img_size=size)
    load_pretrained(model, args.finetune, fc_norm_from_norm=True)
    model.eval()
    return prepare(model)[0]


class Stopped(Exception):
    """A stop signal arrived: the extraction ends without output."""


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def write_features(args, model, data):
    """Every rank writes the features of its rank_share into one [N, D] float32 .npy beside --output as they
    are computed (with pwrite: a full disk is an OSError, where a memory map would die of SIGBUS; peak memory
    independent of N); then rank 0 streams that file into the .npz, renamed into place when complete.
    Nothing partial is left under either name."""
    count, dim = len(data), model.cls_token.shape[-1]
    stem = args.output[:-len(".npz")]
    rows_path = stem + ".rows.tmp.npy"
    rank = get_rank()

    def create():
        if rank == 0:
            with open(rows_path, "wb") as f:
                np.lib.format.write_array_header_2_0(f, {"descr": "<f4", "fortran_order": False, "shape": (count, dim)})
                f.truncate(f.tell() + count * dim * 4)

    def write_rows():
        if not os.path.isfile(rows_path):
            raise DataError(f"{rows_path}: not found by rank {rank}; --output must be in a folder that every "
                            "process sees")
        with open(rows_path, "r+b") as rows:
            np.lib.format.read_magic(rows)
            np.lib.format.read_array_header_2_0(rows)
            offset, mine, done = rows.tell(), rank_share(count), 0
            loader = loaders_over(data, args.batch_size, args.num_workers)(mine)
            amp = args.amp_dtype if args.device.startswith("gpu") and not args.no_amp else None
            for feats in feature_batches(model, loader, args.pool, label="extracting", amp_dtype=amp):
                for row in feats:
                    os.pwrite(rows.fileno(), row.tobytes(), offset + mine[done] * dim * 4)
                    done += 1

    try:
        agree(create, rows_path)
        agree(write_rows, rows_path)
        if rank == 0:
            with atomic_write(args.output, suffix=".npz") as tmp:
                np.savez(tmp, features=np.load(rows_path, mmap_mode="r"), labels=data.samples.labels,
                         paths=np.array([p for p, _ in data.samples]), class_names=np.array(data.classes))
            print(f"wrote {args.output}: features {[count, dim]}")
    except OSError as e:
        raise WriteError(f"cannot write {args.output}: {e.strerror or e}") from None
    finally:
        if rank == 0 and os.path.exists(rows_path):
            os.remove(rows_path)


def agree(step, path):
    """step() on every rank; when it fails on any (a DataError, or an OSError writing `path`), every rank
    stops with the first failing rank's error."""
    try:
        step()
        failure = None
    except DataError as e:
        failure = str(e)
    except OSError as e:
        failure = f"cannot write {path}: {e.strerror or e}"
    failures = [f for f in all_gather(failure) if f]
    if failures:
        raise DataError(failures[0])


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_model_input(parser, args.model, args.input_size, models_vit.MODELS)
    check_environment(parser)
    if not args.output.endswith(".npz") or os.path.isdir(args.output):
        parser.error(f"argument --output: {args.output!r} is not a .npz file path")
    args.finetune = checkpoint_file(parser, "--finetune", args.finetune, args.cache_dir)
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the file-size limit fails, not the process
    try:
        check_launch_environment()
        if args.device == "cpu":
            configure_cpu()
        init_distributed_mode(args.device)
        if is_main_process():
            check_writable(os.path.dirname(os.path.abspath(args.output)), "--output")
        model = encoder(args)
        data = dataset_of(args.data_path, args.split, eval_transform(model.patch_embed.img_size[0], args.crop_pct))
        print(f"{len(data)} images in {data.root}; {args.pool} features of {args.model}")
        write_features(args, model, data)
    except Stopped as e:
        raise WriteError(f"stopped by {e}; {args.output} not written") from None
    except OSError as e:
        raise WriteError(f"cannot write {args.output}: {e.strerror or e}") from None


if __name__ == "__main__":
    run(main)
