"""ImageFolder datasets, image decoding with clear errors, and data loaders."""
import os
import random

import numpy as np
import paddle
from PIL import Image, UnidentifiedImageError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(RuntimeError):
    """A dataset folder or image file cannot be used; the message names it."""


def load_image(path):
    """Decode an image file to 8-bit RGB (grayscale, palette, RGBA, CMYK and 16-bit inputs are converted)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(img, dtype=np.float64)
                scale = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
                img = Image.fromarray(np.clip(a / scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
            elif img.mode == "F":
                img = Image.fromarray(np.clip(np.asarray(img) * 255.0 + 0.5, 0, 255).astype(np.uint8))
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


class ImageFolder(paddle.io.Dataset):
    """root/class_x/xxx.png layout; classes sorted by name, labels are their indices."""

    def __init__(self, root, transform=None):
        if not os.path.isdir(root):
            raise DataError(f"{root}: dataset folder not found")
        self.root, self.transform = root, transform
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise DataError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = []
        empty = []
        for c in self.classes:
            files = []
            for dirpath, _, names in sorted(os.walk(os.path.join(root, c), followlinks=True)):
                files += [os.path.join(dirpath, n) for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
            if not files:
                empty.append(os.path.join(root, c))
            self.samples += [(f, self.class_to_idx[c]) for f in files]
        if empty:
            raise DataError(f"no image files ({', '.join(IMG_EXTENSIONS)}) in class folder(s): {', '.join(empty)}")
        self.targets = [s[1] for s in self.samples]

    def __len__(self):
        return len(self.samples)

    defer_errors = False  # set in loader workers: a bad file is reported by the main process (see CheckedLoader)

    def __getitem__(self, index):
        path, target = self.samples[index]
        try:
            img = load_image(path)
        except DataError:
            if not self.defer_errors:
                raise
            img, _ = self[(index + 1) % len(self)]  # any sample of the right shape; the label marks the error
            return img, np.int64(-1 - index)
        if self.transform is not None:
            img = self.transform(img)
        return img, np.int64(target)


def _collate(batch):
    imgs, targets = zip(*batch)
    return np.stack(imgs), np.stack(targets)


class InProcessLoader:
    """Batches built in the calling process (num_workers 0): errors surface at once, nothing can hang."""

    def __init__(self, dataset, batch_sampler):
        self.dataset, self.batch_sampler = dataset, batch_sampler

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        for indices in self.batch_sampler:
            imgs, targets = _collate([self.dataset[i] for i in indices])
            yield paddle.to_tensor(imgs), paddle.to_tensor(targets)


def _seed_worker(worker_id):
    """Workers fork with the parent's (per-epoch seeded) state: give each its own stream."""
    seed = (random.getrandbits(31) + worker_id * 7919) % (2 ** 31)
    random.seed(seed)
    np.random.seed(seed)


class CheckedLoader:
    """paddle.io.DataLoader with workers, where an exception inside a worker only surfaces as a generic
    SystemError: workers mark a bad sample by a negative label and this loader raises its DataError here."""

    def __init__(self, dataset, batch_sampler, num_workers, pin_mem):
        dataset.defer_errors = True
        self.dataset, self.batch_sampler = dataset, batch_sampler
        self.loader = paddle.io.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                                           collate_fn=_collate, worker_init_fn=_seed_worker, use_shared_memory=pin_mem)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for imgs, targets in self.loader:
            bad = np.flatnonzero(targets.numpy() < 0)
            if bad.size:
                path = self.dataset.samples[-1 - int(targets.numpy()[bad[0]])][0]
                load_image(path)  # raises the DataError naming the file
                raise DataError(f"{path}: could not be read in a data loader worker")
            yield imgs, targets


def build_loader(dataset, batch_sampler, num_workers, pin_mem=True):
    if num_workers == 0:
        return InProcessLoader(dataset, batch_sampler)
    return CheckedLoader(dataset, batch_sampler, num_workers, pin_mem)


def train_loader(dataset, args):
    """Shuffled, drop_last batches of batch_size per rank; call .batch_sampler.set_epoch(epoch) every epoch."""
    sampler = paddle.io.DistributedBatchSampler(dataset, args.batch_size, num_replicas=args.world_size,
                                                rank=args.rank, shuffle=True, drop_last=True)
    if len(sampler) == 0:
        raise DataError(f"{dataset.root}: {len(dataset)} images are fewer than one batch "
                        f"(batch_size {args.batch_size} x {args.world_size} processes)")
    return build_loader(dataset, sampler, args.num_workers, args.pin_mem)


def classification_loaders(args, train_transform, eval_transform):
    """ImageFolder train/ and val/ loaders; val is sequential on every rank unless --dist_eval splits it."""
    dataset_train = ImageFolder(os.path.join(args.data_path, "train"), transform=train_transform)
    dataset_val = ImageFolder(os.path.join(args.data_path, "val"), transform=eval_transform)
    for ds in (dataset_train, dataset_val):
        if len(ds.classes) > args.nb_classes:
            raise DataError(f"{ds.root}: {len(ds.classes)} class folders but --nb_classes is {args.nb_classes}")
    print(f"Dataset: {len(dataset_train)} train images in {dataset_train.root}, "
          f"{len(dataset_val)} val images in {dataset_val.root}")
    if args.dist_eval:
        if len(dataset_val) % args.world_size != 0:
            print("Warning: Enabling distributed evaluation with an eval dataset not divisible by process number. "
                  "This will slightly alter validation results as extra duplicate entries are added to achieve "
                  "equal num of samples per-process.")
        sampler_val = paddle.io.DistributedBatchSampler(dataset_val, args.batch_size, num_replicas=args.world_size,
                                                        rank=args.rank, shuffle=True, drop_last=False)
    else:
        sampler_val = paddle.io.BatchSampler(dataset_val, shuffle=False, batch_size=args.batch_size, drop_last=False)
    return (train_loader(dataset_train, args),
            build_loader(dataset_val, sampler_val, args.num_workers, args.pin_mem))
