"""Write Fashion-MNIST (the IDX files) as an ImageFolder dataset of PNG files.

    python demo/prepare_fashion_mnist.py --src /usr/share/datasets/fashion-mnist --out data/fashion_mnist
    python demo/prepare_fashion_mnist.py --out demo/fashion_mnist_small --train_per_class 200 --val_per_class 50

OUT/train/<class>/ holds the training set (60k) and OUT/val/<class>/ the test set (10k), or the first N images
of each class with --train_per_class / --val_per_class. Debian's package dataset-fashion-mnist installs the
files at the default --src. OUT is written as OUT.part and renamed when whole, so a stopped run leaves no
OUT that looks prepared; an OUT that is not empty is refused (remove it to prepare it again).
"""
import argparse
import gzip
import os
import shutil

import numpy as np
from PIL import Image

CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]


def read_idx(path):
    """IDX file (optionally gzipped) -> uint8 array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated ({array.size} values for shape {shape})")
    return array.reshape(shape)


def check_pair(images, labels, paths):
    """What is wrong with an images and labels pair read from `paths`, or None: one label per image, each a
    class, images 2-D."""
    if images.ndim != 3 or labels.ndim != 1:
        return f"{paths[0]} and {paths[1]}: shapes {list(images.shape)} and {list(labels.shape)}, not images and labels"
    if len(images) != len(labels):
        return f"{paths[0]} has {len(images)} images, {paths[1]} {len(labels)} labels"
    if labels.size and labels.max() >= len(CLASSES):
        return f"{paths[1]}: label {labels.max()}, where the classes are 0 to {len(CLASSES) - 1}"
    return None


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"needs a whole number >= 1, got {text}")
    return int(text)


def write_split(images, labels, folder, per_class=None):
    counts = np.zeros(len(CLASSES), int)
    for i, (img, label) in enumerate(zip(images, labels)):
        if per_class is not None and counts[label] >= per_class:
            continue
        counts[label] += 1
        d = os.path.join(folder, f"{label}_{CLASSES[label]}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(img, mode="L").save(os.path.join(d, f"{i:05d}.png"), optimize=True)
    return int(counts.sum())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default="/usr/share/datasets/fashion-mnist", help="folder of the IDX files")
    parser.add_argument("--out", required=True, help="output folder (ImageFolder layout)")
    parser.add_argument("--train_per_class", type=positive_int, default=None)
    parser.add_argument("--val_per_class", type=positive_int, default=None)
    args = parser.parse_args(argv)
    out, part = os.path.normpath(args.out), os.path.normpath(args.out) + ".part"
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        parser.error(f"argument --out: {out} exists and is not an empty folder; remove it to prepare it again")
    shutil.rmtree(part, ignore_errors=True)  # left by a stopped run
    for split, prefix, per_class in (("train", "train", args.train_per_class), ("val", "t10k", args.val_per_class)):
        paths = [os.path.join(args.src, f"{prefix}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1")]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            parser.error(f"argument --src: {missing[0]} not found (apt-get install dataset-fashion-mnist, or pass "
                         "another --src)")
        try:
            images, labels = read_idx(paths[0]), read_idx(paths[1])
        except (ValueError, OSError, EOFError) as e:
            parser.error(f"argument --src: {e}")
        problem = check_pair(images, labels, paths)
        if problem:
            parser.error(f"argument --src: {problem}")
        try:
            n = write_split(images, labels, os.path.join(part, split), per_class)
        except OSError as e:
            parser.exit(1, f"error: cannot write {e.filename or part} ({e.strerror or e}); {out} is not made\n")
        print(f"{split}: {n} images in {os.path.join(out, split)}")
    try:
        os.replace(part, out)
    except OSError as e:
        parser.error(f"argument --out: cannot rename {part} to {out} ({e.strerror or e})")


if __name__ == "__main__":
    main()
