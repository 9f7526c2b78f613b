"""The study's image folders, as hard links into the prepared ImageFolder (a copy where the file system has
none): a class-balanced validation split held out from the training images, and class-balanced label
subsets of what remains. Each start checks the folders against the images they come from (from directory
entries, cheap at 60,000 images), finishes one left part-built and refuses one made from other images."""
import os
import shutil

import numpy as np

from util.errors import DataError

VAL_PER_CLASS = 500  # held out from the 6,000 training images of each class
VAL_SEED = 1000  # apart from the label draws 0, 1, 2, ...


def _class_files(train):
    return {c: sorted(os.listdir(os.path.join(train, c))) for c in sorted(os.listdir(train))}


def _draw(names, count, seed, index):
    """`count` of `names` by one seeded permutation per class, in file order."""
    order = np.random.default_rng([seed, index]).permutation(len(names))
    return [names[i] for i in sorted(order[:count])]


def _link_folder(folder, files, record):
    """folder/<dst> -> <src> for each (src, dst), and `record` (its train files, relative to folder) written
    last. A folder left part-built is finished; one holding a file that is not the image the study puts
    there (made from other images, or the images changed since) is refused: its split would be a guess."""
    wanted, present, inodes = {os.path.join(folder, dst): src for src, dst in files}, set(), {}

    def inode(path):  # from the directory entries: no stat per image
        d, name = os.path.split(path)
        if d not in inodes:
            inodes[d] = {e.name: e.inode() for e in os.scandir(d)}
        return inodes[d].get(name)

    for part in ("train", "val"):
        for d, _, names in os.walk(os.path.join(folder, part)):
            for name in names:
                dst = os.path.join(d, name)
                if name.endswith(".tmp"):  # a copy cut off
                    os.remove(dst)
                    continue
                src = wanted.get(dst)
                if src is None or inode(src) != inode(dst) and not _same_bytes(src, dst):
                    raise DataError(f"{dst}: not {src or 'an image of this split'}, so {folder} was made from "
                                    "other images; remove it and the study builds it again")
                present.add(dst)
    for dst in wanted.keys() - present:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.link(wanted[dst], dst)
        except OSError:
            shutil.copyfile(wanted[dst], dst + ".tmp")
            os.replace(dst + ".tmp", dst)
    listed = "\n".join(dst for _, dst in files if dst.startswith("train")) + "\n"
    path = os.path.join(folder, record)
    if not (os.path.isfile(path) and open(path, encoding="utf-8", errors="replace").read() == listed):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(listed)
        os.replace(path + ".tmp", path)
    return folder


def _same_bytes(src, dst):
    with open(src, "rb") as a, open(dst, "rb") as b:
        return a.read() == b.read()


def development_folder(data, per_class=VAL_PER_CLASS):
    """`{data}_dev`: train/ = the training images minus `per_class` of each class, val/ = those held out.
    Pre-training, label subsets and every choice of the study use this folder; the test set (data/val)
    is not in it."""
    files = []
    for index, (c, names) in enumerate(_class_files(os.path.join(data, "train")).items()):
        held = set(_draw(names, per_class, VAL_SEED, index))
        files += [(os.path.join(data, "train", c, n), os.path.join("val" if n in held else "train", c, n))
                  for n in names]
    return _link_folder(f"{data}_dev", files, "split.txt")


def label_fraction(names, percent):
    return max(2, round(len(names) * percent / 100))


def label_subset_folder(dev, percent, draw):
    """`{dev}_labels{percent}pct_draw{draw}`: train/ = a class-balanced `percent` of dev/train (at least 2 per
    class; a prefix of one permutation per class and draw, so a draw's 1% lies inside its 10%), val/ = dev/val."""
    if percent == 100:
        return dev
    files = []
    for index, (c, names) in enumerate(_class_files(os.path.join(dev, "train")).items()):
        order = np.random.default_rng([draw, index]).permutation(len(names))
        keep = sorted(order[:label_fraction(names, percent)])
        files += [(os.path.join(dev, "train", c, names[i]), os.path.join("train", c, names[i])) for i in keep]
    for c, names in _class_files(os.path.join(dev, "val")).items():
        files += [(os.path.join(dev, "val", c, n), os.path.join("val", c, n)) for n in names]
    return _link_folder(f"{dev}_labels{percent}pct_draw{draw}", files, "subset.txt")
