"""Image transforms on PIL images (python `random`), with torchvision/timm semantics, ending in CHW float32."""
import math
import random

import numpy as np
from PIL import Image, ImageEnhance

from util.auto_augment import rand_augment_transform
from util.random_erasing import RandomErasing

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, img):
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

    def get_params(self, img):
        width, height = img.size
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
        return img.crop((left, top, left + w, top + h)).resize(self.size, self.interpolation)


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        return img.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < self.p else img


class Resize:
    """Resize the shorter side to size, keeping the aspect ratio (torchvision Resize(int))."""

    def __init__(self, size, interpolation="bicubic"):
        self.size = size
        self.interpolation = _INTERPOLATION[interpolation]

    def __call__(self, img):
        w, h = img.size
        if w <= h:
            ow, oh = self.size, int(self.size * h / w)
        else:
            ow, oh = int(self.size * w / h), self.size
        return img if (ow, oh) == (w, h) else img.resize((ow, oh), self.interpolation)


class CenterCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        w, h = img.size
        top = int(round((h - self.size) / 2.0))
        left = int(round((w - self.size) / 2.0))
        return img.crop((left, top, left + self.size, top + self.size))


class ToNormalizedArray:
    """PIL RGB -> CHW float32 in [0, 1], then (x - mean) / std."""

    def __init__(self, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
        self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(3, 1, 1)

    def __call__(self, img):
        x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (x - self.mean) / self.std


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


def pretrain_transform(input_size):
    """The official pre-training augmentation: random resized crop (scale 0.2-1, bicubic) and flip."""
    return Compose([RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation="bicubic"),
                    RandomHorizontalFlip(), ToNormalizedArray()])


def eval_transform(input_size):
    """Resize to input_size / crop_pct (crop_pct 224/256 up to 224 px, else 1), bicubic, centre crop."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return Compose([Resize(int(input_size / crop_pct)), CenterCrop(input_size), ToNormalizedArray()])


def finetune_transform(input_size, aa="rand-m9-mstd0.5-inc1", color_jitter=None, reprob=0.25, remode="pixel",
                       recount=1):
    """timm create_transform(is_training=True) as the official fine-tuning calls it: random resized crop
    (0.08-1, bicubic), flip, RandAugment (or colour jitter when aa is off), normalize, random erasing."""
    tfl = [RandomResizedCrop(input_size, scale=(0.08, 1.0), interpolation="bicubic"), RandomHorizontalFlip()]
    if aa:
        aa_params = dict(translate_const=int(input_size * 0.45),
                         img_mean=tuple(min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN),
                         interpolation=Image.BICUBIC)
        tfl.append(rand_augment_transform(aa, aa_params))
    elif color_jitter is not None:
        tfl.append(ColorJitter(color_jitter, color_jitter, color_jitter))
    tfl.append(ToNormalizedArray())
    if reprob > 0:
        tfl.append(RandomErasing(reprob, mode=remode, max_count=recount))
    return Compose(tfl)


class SingleDrawResizedCrop(RandomResizedCrop):
    """The linear-probing crop (TF/BYOL style): no retry loop, w and h from one (area, log-ratio) draw, each
    clamped to the image; uniform offsets."""

    def get_params(self, img):
        width, height = img.size
        target_area = height * width * random.uniform(*self.scale)
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect_ratio = math.exp(random.uniform(*log_ratio))
        w = min(int(round(math.sqrt(target_area * aspect_ratio))), width)
        h = min(int(round(math.sqrt(target_area / aspect_ratio))), height)
        return random.randint(0, height - h), random.randint(0, width - w), h, w


def linprobe_transform(input_size):
    """The official linear-probing augmentation: one-draw random resized crop (bicubic) and flip."""
    return Compose([SingleDrawResizedCrop(input_size, interpolation="bicubic"), RandomHorizontalFlip(),
                    ToNormalizedArray()])
