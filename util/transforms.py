"""Image transforms with torchvision/timm semantics in two halves: per sample on HWC uint8 RGB arrays
(python `random`) in the loader workers, with Pillow's pixels (crops are views; bicubic resizing and
RandAugment's affine ops are util.fast_image's copies of Pillow's arithmetic; RandAugment's other ops and
colour jitter run on PIL images); per batch in the training process, the normalisation to NCHW float32
(random erasing, which acts on normalised values, is filled in by the training step)."""
import math
import random

import numpy as np
import paddle
from PIL import Image, ImageEnhance

from util.auto_augment import rand_augment_transform
from util.fast_image import available as fast_image_available, mirror, normalize_nhwc, resize_bicubic
from util.random_erasing import RandomErasing

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def _array(img):
    return img if isinstance(img, np.ndarray) else np.asarray(img)


def _resize(img, height, width, interpolation):
    if interpolation == Image.BICUBIC:
        return resize_bicubic(img, (height, width))
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((width, height), interpolation))


class Compose:
    """The per-sample steps, from a PIL image or an HWC array; `batch` is the per-batch half that the loader
    applies in the training process."""

    def __init__(self, transforms, batch=None, erasing=None):
        self.transforms = transforms
        self.batch = batch or BatchNormalize()
        self.erasing = erasing  # its boxes are drawn per sample; the training step fills them (RandomErasing.fill)

    def __call__(self, img):
        img = _array(img)
        for t in self.transforms:
            img = t(img)
        return img


class RandomResizedCrop:
    """Crop of random area (scale) and aspect ratio (log-uniform), resized to size; 10 tries, then the
    centre crop with the ratio clamped (torchvision RandomResizedCrop = timm RandomResizedCropAndInterpolation)."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), interpolation="bicubic"):
        self.size = (size, size)
        self.scale, self.ratio = scale, ratio
        self.interpolation = _INTERPOLATION[interpolation]
        fast_image_available()  # built or loaded here, before loader workers start

    def get_params(self, img):
        height, width = img.shape[:2]
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * random.uniform(*self.scale)
            aspect_ratio = math.exp(random.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                return random.randint(0, height - h), random.randint(0, width - w), h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img):
        top, left, h, w = self.get_params(img)
        return _resize(img[top:top + h, left:left + w], *self.size, self.interpolation)


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        return mirror(img) if random.random() < self.p else img


class Resize:
    """Resize the shorter side to size, keeping the aspect ratio (torchvision Resize(int))."""

    def __init__(self, size, interpolation="bicubic"):
        self.size = size
        self.interpolation = _INTERPOLATION[interpolation]
        fast_image_available()  # built or loaded here, before loader workers start

    def __call__(self, img):
        h, w = img.shape[:2]
        if w <= h:
            ow, oh = self.size, int(self.size * h / w)
        else:
            ow, oh = int(self.size * w / h), self.size
        return img if (ow, oh) == (w, h) else _resize(img, oh, ow, self.interpolation)


class CenterCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        h, w = img.shape[:2]
        top = int(round((h - self.size) / 2.0))
        left = int(round((w - self.size) / 2.0))
        if top < 0 or left < 0:  # smaller than the crop: zero padding around it, as Pillow's crop
            padded = np.zeros((max(h, self.size), max(w, self.size), 3), np.uint8)
            padded[max(0, -top):max(0, -top) + h, max(0, -left):max(0, -left) + w] = img
            img, top, left = padded, max(0, top), max(0, left)
        return img[top:top + self.size, left:left + self.size]


class ToPIL:
    """For the steps that work on PIL images (colour jitter)."""

    def __call__(self, img):
        return Image.fromarray(np.ascontiguousarray(img))


class ToUint8Array:
    """-> contiguous HWC uint8 array: 4x less to send from a worker than float32, normalised per batch."""

    def __call__(self, img):
        return np.ascontiguousarray(img)


class BatchNormalize:
    """HWC uint8 batch -> NCHW float32 tensor (x / 255 - mean) / std on the training device, after 4x less
    host-to-device traffic than float32; mean and std are placed on the device once. Training on the CPU with
    the native code built, the same values (bit for bit) come from a 256-entry table per channel computed
    with that formula, in one pass of C."""

    def __init__(self, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        levels = np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0)
        self.table = (levels - self.mean[:, None]) / self.std[:, None]
        self._constants = {}

    def __getstate__(self):  # loader workers get the numbers, not device tensors
        return {**self.__dict__, "_constants": {}}

    def _on_device(self):
        device = paddle.device.get_device()
        if device not in self._constants:
            self._constants[device] = (paddle.to_tensor(self.mean.reshape([1, 3, 1, 1])),
                                       paddle.to_tensor(self.std.reshape([1, 3, 1, 1])))
        return self._constants[device]

    def __call__(self, images):
        if not isinstance(images, paddle.Tensor):
            images = paddle.to_tensor(np.ascontiguousarray(images))
        if images.place.is_cpu_place() and paddle.device.get_device() == "cpu" and fast_image_available():
            return normalize_nhwc(images, self.table)
        if paddle.device.get_device().startswith("gpu") and not images.place.is_gpu_place():
            images = images.cuda()  # the loader normally delivers batches on the device already
        mean, std = self._on_device()
        return (images.astype("float32").transpose([0, 3, 1, 2]) / 255.0 - mean) / std


class ColorJitter:
    """Brightness, contrast and saturation factors uniform in [max(0, 1 - v), 1 + v], in random order."""

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0):
        self.ops = [(ImageEnhance.Brightness, brightness), (ImageEnhance.Contrast, contrast),
                    (ImageEnhance.Color, saturation)]

    def __call__(self, img):
        for enhance, v in random.sample(self.ops, len(self.ops)):
            if v > 0:
                img = enhance(img).enhance(random.uniform(max(0.0, 1.0 - v), 1.0 + v))
        return img


class MaskNoise:
    """A sample's masking noise for pre-training (models_mae.random_masking keeps the patches of lowest
    noise): num_patches uniform numbers in [0, 1) on the float32 grid of 2^-24 (as torch.rand draws them),
    drawn with the sample's augmentation from (seed, epoch, sample), so that a sample is masked the same
    however the effective batch is split over processes and accumulation steps."""

    def __init__(self, num_patches):
        self.num_patches = num_patches

    def __call__(self, img):
        return img, (np.random.randint(0, 1 << 24, self.num_patches) / float(1 << 24)).astype(np.float32)


def pretrain_transform(input_size, scale=(0.2, 1.0), num_patches=None):
    """The official pre-training augmentation: random resized crop (scale 0.2-1, bicubic) and flip; with
    num_patches, each sample also carries its masking noise (MaskNoise)."""
    return Compose([RandomResizedCrop(input_size, scale=tuple(scale), interpolation="bicubic"),
                    RandomHorizontalFlip(), ToUint8Array()] + ([MaskNoise(num_patches)] if num_patches else []))


def default_crop_pct(input_size):
    """The official evaluation's share of the resized image kept by the centre crop: 224/256 up to 224 px,
    else 1."""
    return 224 / 256 if input_size <= 224 else 1.0


def eval_transform(input_size, crop_pct=None):
    """Resize to input_size / crop_pct (default_crop_pct unless given), bicubic, centre crop; crop_pct 1
    keeps the whole image (a no-op when it already has input_size)."""
    crop_pct = crop_pct or default_crop_pct(input_size)
    return Compose([Resize(int(input_size / crop_pct)), CenterCrop(input_size), ToUint8Array()])


def finetune_transform(input_size, aa="rand-m9-mstd0.5-inc1", color_jitter=None, reprob=0.25, remode="pixel",
                       recount=1, scale=(0.08, 1.0)):
    """timm create_transform(is_training=True) as the official fine-tuning calls it: random resized crop
    (0.08-1, bicubic), flip, RandAugment (or colour jitter when aa is off), normalize, random erasing."""
    tfl = [RandomResizedCrop(input_size, scale=tuple(scale), interpolation="bicubic"), RandomHorizontalFlip()]
    if aa:
        aa_params = dict(translate_const=int(input_size * 0.45),
                         img_mean=tuple(min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN),
                         interpolation=Image.BICUBIC)
        tfl.append(rand_augment_transform(aa, aa_params))
    elif color_jitter is not None:
        tfl += [ToPIL(), ColorJitter(color_jitter, color_jitter, color_jitter)]
    tfl.append(ToUint8Array())
    if reprob <= 0:
        return Compose(tfl)
    erasing = RandomErasing(reprob, mode=remode, max_count=recount)
    return Compose(tfl + [erasing], erasing=erasing)


class SingleDrawResizedCrop(RandomResizedCrop):
    """The linear-probing crop (TF/BYOL style): no retry loop, w and h from one (area, log-ratio) draw, each
    clamped to the image; uniform offsets."""

    def get_params(self, img):
        height, width = img.shape[:2]
        target_area = height * width * random.uniform(*self.scale)
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect_ratio = math.exp(random.uniform(*log_ratio))
        w = min(int(round(math.sqrt(target_area * aspect_ratio))), width)
        h = min(int(round(math.sqrt(target_area / aspect_ratio))), height)
        return random.randint(0, height - h), random.randint(0, width - w), h, w


def linprobe_transform(input_size, scale=(0.08, 1.0)):
    """The official linear-probing augmentation: one-draw random resized crop (0.08-1, bicubic) and flip."""
    return Compose([SingleDrawResizedCrop(input_size, scale=tuple(scale), interpolation="bicubic"),
                    RandomHorizontalFlip(), ToUint8Array()])
