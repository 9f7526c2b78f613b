"""The index of an ImageFolder: its class folders and image files found from directory entries alone (no
stat per image; links resolved), kept in NumPy arrays that loader workers share."""
import os
import sys

import numpy as np

from util.errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class SampleIndex:
    """The (path, label) pairs of a dataset in three NumPy arrays (the encoded paths, each ended by a NUL,
    where each starts, the labels) rather than a list of tuples: loader workers read them without touching a
    reference count, so the forked pages stay shared (a list of 1.28M tuples is copied into every worker
    page by page as it is read)."""

    def __init__(self, paths, labels):
        self.buffer = np.frombuffer(("\0".join(paths) + "\0").encode(sys.getfilesystemencoding(), "surrogateescape"),
                                    np.uint8) if paths else np.zeros(0, np.uint8)
        self.offsets = np.concatenate([[0], np.flatnonzero(self.buffer == 0) + 1]).astype(np.int64)
        self.labels = np.asarray(labels, np.int64).reshape(len(paths))

    @classmethod
    def from_arrays(cls, buffer, offsets, labels):
        index = cls.__new__(cls)
        index.buffer, index.offsets, index.labels = buffer, offsets, labels
        return index

    def __len__(self):
        return len(self.labels)

    def path(self, i):
        return os.fsdecode(self.buffer[self.offsets[i]:self.offsets[i + 1] - 1].tobytes())

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.path(i), int(self.labels[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def scan_image_folder(root, classes=None, classes_from=None):
    """ImageFolder's index of root: {'classes', and the SampleIndex arrays 'buffer', 'offsets', 'labels'};
    DataError naming what is wrong. Reads directory entries only: a file's type comes from its entry,
    and only links are resolved (no stat per image)."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: dataset folder not found")
    found = class_folders(root)
    names = [name for name, _ in found]
    if not names:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    if classes is not None and names != list(classes):
        raise DataError(f"{root}: class folders differ from those of {classes_from}: "
                        f"{class_difference(names, classes)}")
    seen = {os.path.realpath(root)} | {real for _, real in found}
    paths, labels, empty = [], [], []
    for label, (name, real) in enumerate(found):
        files = _image_files(os.path.join(root, name), real, seen)
        if not files:
            empty.append(os.path.join(root, name))
        paths += files
        labels += [label] * len(files)
    if empty:
        raise DataError(f"no image files ({', '.join(IMG_EXTENSIONS)}) in class folder(s): {', '.join(empty)}")
    index = SampleIndex(paths, labels)
    return {"classes": names, "buffer": index.buffer, "offsets": index.offsets, "labels": index.labels}


def _entries(folder):
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError as e:
        raise DataError(f"{folder}: cannot read the folder ({e.strerror or e})") from None


def class_difference(names, classes, shown=5):
    """How class folders `names` differ from the expected `classes`, in a few words (a few names of each kind)."""
    def some(kind, items):
        more = f" ({len(items)} in all)" if len(items) > shown else ""
        return f"{kind} {', '.join(items[:shown])}{', ...' if more else ''}{more}" if items else ""

    have, expected = set(names), set(classes)
    missing, extra = [c for c in classes if c not in have], [c for c in names if c not in expected]
    parts = [p for p in (some("missing", missing), some("extra", extra)) if p]
    return "; ".join(parts) or "the same names in another order"


def class_folders(root):
    """[(name, real path)] of root's class folders, sorted by name. A link to a folder already in the dataset
    (another class, anything inside root, or a folder around it) would be a duplicate class: it is skipped
    with a warning; a link to a folder elsewhere is a class. Only links are resolved: a folder's real path is
    its parent's and its name."""
    real_root = os.path.realpath(root)
    entries = sorted((e for e in _entries(root) if e.is_dir()), key=lambda e: (e.is_symlink(), e.name))
    found, reals = [], [real_root]  # real folders first: they are inside root by definition

    def overlaps(real):
        return any(real == r or real.startswith(r + os.sep) or r.startswith(real + os.sep) for r in reals)

    for e in entries:
        if not e.is_symlink():
            found.append((e.name, os.path.join(real_root, e.name)))
            continue
        real = os.path.realpath(e.path)
        if overlaps(real):
            print(f"Warning: skipping class folder {e.path}: a link to {real}, already in the dataset")
            continue
        found.append((e.name, real))
        reals.append(real)
    return sorted(found)


def _image_files(folder, real_folder, seen):
    """Image files below a class folder, sorted by folder then name, following links but never into a folder
    already in the dataset (a link to a parent or to another class would loop or mislabel: it is skipped
    with a warning). Entries that are not regular files (pipes, sockets, devices) are skipped with a warning:
    reading one could hang; a dangling link is kept (reading it names it)."""
    found, stack = [], [(folder, real_folder)]
    while stack:
        dirpath, real_dir = stack.pop()
        files, subdirs, odd = [], [], []
        for e in _entries(dirpath):
            if e.is_dir():
                subdirs.append(e)
            elif e.name.lower().endswith(IMG_EXTENSIONS):
                if e.is_file() or (e.is_symlink() and not os.path.exists(e.path)):
                    files.append(e.path)
                else:
                    odd.append(e.path)
        for path in sorted(odd):
            print(f"Warning: skipping {path}: not a regular file")
        below = []
        for d in sorted(subdirs, key=lambda e: e.name):
            real = os.path.realpath(d.path) if d.is_symlink() else os.path.join(real_dir, d.name)
            if real in seen or real_folder.startswith(real + os.sep):
                print(f"Warning: skipping {d.path}: a link to a folder already in the dataset")
            else:
                seen.add(real)
                below.append((d.path, real))
        stack += reversed(below)
        files.sort()  # one folder's paths: sorted by name
        found.append((dirpath, files))
    return [path for _, files in sorted(found) for path in files]
