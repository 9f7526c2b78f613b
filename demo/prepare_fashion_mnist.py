"""Write Fashion-MNIST (the IDX files) as an ImageFolder dataset of PNG files.

    python demo/prepare_fashion_mnist.py --src /usr/share/datasets/fashion-mnist --out data/fashion_mnist
    python demo/prepare_fashion_mnist.py --out demo/fashion_mnist_small --train_per_class 200 --val_per_class 50

OUT/train/<class>/ holds the training set (60k) and OUT/val/<class>/ the test set (10k), or the first N images
of each class with --train_per_class / --val_per_class. Debian's package dataset-fashion-mnist installs the
files at the default --src.
"""
import argparse
import gzip
import os

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
    parser.add_argument("--train_per_class", type=int, default=None)
    parser.add_argument("--val_per_class", type=int, default=None)
    args = parser.parse_args(argv)
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
        n = write_split(images, labels, os.path.join(args.out, split), per_class)
        print(f"{split}: {n} images in {os.path.join(args.out, split)}")


if __name__ == "__main__":
    main()
