"""ImageFolder datasets, image decoding with clear errors, and data loaders."""
import contextlib
import ctypes
import io
import multiprocessing
import os
import random
import signal
import threading

import numpy as np
import paddle
import simplejpeg
from PIL import Image, UnidentifiedImageError

from util import compat
from util.dist import made_on_main_process
from util.errors import DataError
from util.image_index import SampleIndex, scan_image_folder
from util.sampler import EffectiveBatchSampler

PR_SET_PDEATHSIG = 1  # Linux prctl option


def _decode_jpeg(data):
    """RGB array of a baseline or progressive JPEG by libjpeg-turbo (the decoder inside Pillow, with the same
    settings: accurate integer IDCT, smooth chroma upsampling), without Pillow's 4-byte-per-pixel unpacking:
    ~40% faster. None where Pillow should decide: CMYK, any libjpeg warning (a truncated file), or more
    pixels than Pillow's decompression-bomb limit."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        if Image.MAX_IMAGE_PIXELS and height * width > Image.MAX_IMAGE_PIXELS:
            return None
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)
    except ValueError:
        return None


def load_image(path):
    """Decode an image file to an 8-bit RGB PIL image."""
    return Image.fromarray(read_rgb(path))


def read_rgb(path):
    """Decode an image file to an HWC uint8 RGB array (grayscale, palette, RGBA, CMYK and 16-bit inputs are
    converted)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:3] == b"\xff\xd8\xff":
            rgb = _decode_jpeg(data)
            if rgb is not None:
                return rgb
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(img, dtype=np.float64)
                scale = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
                img = Image.fromarray(np.clip(a / scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
            elif img.mode == "F":
                img = Image.fromarray(np.clip(np.asarray(img) * 255.0 + 0.5, 0, 255).astype(np.uint8))
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


class ImageFolder(paddle.io.Dataset):
    """root/class_x/xxx.png layout; classes sorted by name, labels are their indices. With `classes` (another
    split's), the folder must hold exactly those classes, so that a label means the same class in both.
    Under paddle.distributed.launch rank 0 scans the folder and the other ranks receive its index."""

    def __init__(self, root, transform=None, classes=None, classes_from=None):
        self.root, self.transform, self.replaced, self.seed = root, transform, None, 0
        found = made_on_main_process(lambda: scan_image_folder(root, classes, classes_from))
        self.classes = found["classes"]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = SampleIndex.from_arrays(found["buffer"], found["offsets"], found["labels"])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        """(image, label) of `index` or `(epoch, index)`. The augmentation's random draws are seeded from
        (self.seed, epoch, index), so that a sample is augmented the same whichever worker or resumed run
        produces it. An unreadable file is replaced by the next readable sample and its index is sent to
        self.replaced (a queue that also crosses worker processes), so that the loader can report or skip it
        without a per-batch marker travelling to the device."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        for offset in range(min(len(self), 100)):
            i = (index + offset) % len(self)
            path, target = self.samples[i]
            try:
                img = read_rgb(path)
            except DataError:
                continue
            if offset and self.replaced is not None:
                self.replaced.put(index)
            if self.transform is not None:
                with sample_random_state(self.seed, epoch, index):
                    img = self.transform(img)
            return img, np.int64(target)
        raise DataError(f"{self.samples[index][0]} and the {min(len(self), 100) - 1} files after it are unreadable")


@contextlib.contextmanager
def sample_random_state(seed, epoch, index):
    """Python's and NumPy's random streams seeded from (seed, epoch, index) inside; in the training process
    (no loader workers) as they were outside afterwards. Workers own their streams: saving NumPy's state
    would cost ~70 us per image there."""
    in_worker = paddle.io.get_worker_info() is not None
    saved = None if in_worker else (random.getstate(), np.random.get_state())
    s = ((seed * 1000003 + epoch) * 1000003 + index) % (2 ** 32)
    random.seed(s)
    np.random.seed(s)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])


def _collate(batch):
    """(images, labels), or (images, erasing boxes, labels) when the transform ends in random erasing."""
    imgs, targets = zip(*batch)
    if isinstance(imgs[0], tuple):
        return (*(np.stack(part) for part in zip(*imgs)), np.stack(targets))
    return np.stack(imgs), np.stack(targets)


class _Skippable:
    """A batch sampler of (epoch, index) keys whose next pass leaves out its first `skip` batches (resuming
    inside an epoch)."""

    def __init__(self, batch_sampler):
        self.batch_sampler, self.skip, self.epoch = batch_sampler, 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.batch_sampler.set_epoch(epoch)

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        for i, indices in enumerate(self.batch_sampler):
            if i >= skip:
                yield [(self.epoch, index) for index in indices]


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WORKER_EXIT_S = 10


def _serve_through_stop_signals():
    """Launchers, SLURM (every process of a job step), Ctrl-C (the process group) and `pkill -f` send the stop
    signals to the workers as well as to the training process, which finishes its iteration and saves (see
    util.preempt) while its workers keep loading; only the training process's own SIGTERM (multiprocessing's
    shutdown of its workers) ends a worker."""
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == os.getppid():
            os._exit(0)


def _init_worker(worker_id):
    """Each worker takes its stop signals in a thread of its own (see _serve_through_stop_signals); they are
    blocked from before the fork (see Loader._batches), so none arrives in between. A worker dies with the
    training process (Linux's parent-death signal), so that a killed run leaves none behind."""
    threading.Thread(target=_serve_through_stop_signals, daemon=True).start()
    try:
        ctypes.CDLL("libc.so.6").prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() == 1:  # the parent died before the call above
        os._exit(1)


class Loader:
    """Batches of (images, labels) from a batch sampler: built in this process with num_workers 0 (an error
    surfaces at once, nothing can hang), else by paddle.io.DataLoader workers. An unreadable file stops the
    run with its path, or with skip_bad is replaced by another sample, logged once and counted."""

    def __init__(self, dataset, batch_sampler, num_workers=0, pin_mem=True, skip_bad=False):
        self.dataset, self.skip_bad = dataset, skip_bad
        dataset.replaced = multiprocessing.SimpleQueue()
        self.batch_sampler = _Skippable(batch_sampler)
        self.bad_files, self.skipped = set(), 0
        self.loader = self.running = None  # running: the pass under way (its paddle.io.DataLoader iterator)
        if num_workers > 0:
            self.loader = paddle.io.DataLoader(dataset, batch_sampler=self.batch_sampler, num_workers=num_workers,
                                               collate_fn=_collate, worker_init_fn=_init_worker,
                                               use_shared_memory=pin_mem)

    def __len__(self):
        return len(self.batch_sampler)

    def end_pass(self):
        """End the pass under way now (a stop signal broke it off, or it is closed or done): its workers exit
        here, each waited for at most WORKER_EXIT_S seconds, rather than whenever Paddle's iterator is
        collected, which may be at the interpreter's exit, where multiprocessing terminates them under the
        iterator's reader thread."""
        if self.running is not None:
            self._end(self.running)

    def _end(self, batches):
        compat.end_loader_workers(batches, WORKER_EXIT_S)
        if self.running is batches:
            self.running = None

    def skip_batches(self, n):
        """Leave out the first n batches of the next pass."""
        self.batch_sampler.skip = n

    def _batches(self):
        if self.loader is not None:
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # inherited by the forked workers
            try:
                self.running = batches = iter(self.loader)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            try:
                yield from batches
            finally:  # this pass's own iterator: a pass closed late must not end the one under way
                self._end(batches)
        else:
            for indices in self.batch_sampler:
                yield tuple(paddle.to_tensor(part) for part in _collate([self.dataset[i] for i in indices]))

    def _check_replaced(self):
        """Stop naming the first unreadable file, or (skip_bad) count and log the replaced ones."""
        while not self.dataset.replaced.empty():
            path = self.dataset.samples[self.dataset.replaced.get()][0]
            if not self.skip_bad:
                load_image(path)  # raises the DataError naming the file
                raise DataError(f"{path}: could not be read in a data loader worker")
            self.skipped += 1
            if path not in self.bad_files:
                self.bad_files.add(path)
                try:
                    load_image(path)
                except DataError as e:
                    print(f"skipping unreadable image: {e}")

    def __iter__(self):
        """(normalised NCHW float32 images, labels), with the random erasing boxes in between when the
        transform draws them (for RandomErasing.fill in the training step): the transform's per-batch half
        runs here."""
        self.skipped = 0
        finish = self.dataset.transform.batch
        for images, *boxes, targets in self._batches():
            self._check_replaced()
            yield (finish(images), *boxes, targets)
        self._check_replaced()


def train_loader(dataset, args):
    """Shuffled, drop_last batches of batch_size per rank, the same samples per optimizer step however the
    effective batch is split (util.sampler); call .batch_sampler.set_epoch(epoch) every epoch."""
    sampler = EffectiveBatchSampler(len(dataset), args.batch_size, args.accum_iter, args.world_size, args.rank)
    dataset.seed = args.seed
    if getattr(args, "eval", False):  # evaluation only: the training images are not loaded
        return Loader(dataset, sampler, args.num_workers, args.pin_mem, args.skip_bad_images)
    if len(dataset) < args.batch_size * args.world_size:
        raise DataError(f"{dataset.root}: {len(dataset)} images are fewer than one batch "
                        f"(batch_size {args.batch_size} x {args.world_size} processes)")
    if len(sampler) == 0:
        raise DataError(f"--accum_iter {args.accum_iter} is more than the "
                        f"{len(dataset) // (args.batch_size * args.world_size)} iteration(s) per epoch of "
                        f"{dataset.root} (batch_size {args.batch_size} x {args.world_size} processes): the "
                        "optimizer would never step")
    return Loader(dataset, sampler, args.num_workers, args.pin_mem, args.skip_bad_images)


def classification_loaders(args, train_transform, eval_transform):
    """ImageFolder train/ and val/ loaders; val is sequential on every rank unless --dist_eval splits it."""
    dataset_train = ImageFolder(os.path.join(args.data_path, "train"), transform=train_transform)
    dataset_val = ImageFolder(os.path.join(args.data_path, "val"), transform=eval_transform,
                              classes=dataset_train.classes, classes_from=dataset_train.root)
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
            Loader(dataset_val, sampler_val, args.num_workers, args.pin_mem, args.skip_bad_images))
