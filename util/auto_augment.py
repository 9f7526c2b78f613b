"""RandAugment with the semantics of timm 0.3.2 (`rand-m9-mstd0.5-inc1` in the official fine-tuning).

Ops are applied with probability 0.5 each; two ops per image are drawn uniformly with replacement; the
magnitude is drawn from N(m, mstd) and clipped to [0, 10]; signed ops are negated with probability 0.5.
Images pass as HWC uint8 arrays or PIL images: the affine ops (rotations, shears, translations) run on arrays
through util.fast_image's copy of Pillow's transform arithmetic, the other ops on PIL images, so an image is
converted only when an op of the other kind comes.
"""
import math
import random
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from util.fast_image import affine

_MAX_LEVEL = 10.0
_FILL = (128, 128, 128)


def _as_array(img):
    return img if isinstance(img, np.ndarray) else np.asarray(img)


def _as_pil(img):
    return img if isinstance(img, Image.Image) else Image.fromarray(np.ascontiguousarray(img))


def _transform(img, matrix, fillcolor, resample):
    return affine(_as_array(img), matrix, resample, fillcolor)


def _size(img):
    return img.size if isinstance(img, Image.Image) else (img.shape[1], img.shape[0])


def shear_x(img, factor, **kw):
    return _transform(img, (1, factor, 0, 0, 1, 0), **kw)


def shear_y(img, factor, **kw):
    return _transform(img, (1, 0, 0, factor, 1, 0), **kw)


def translate_x_rel(img, pct, **kw):
    return _transform(img, (1, 0, pct * _size(img)[0], 0, 1, 0), **kw)


def translate_y_rel(img, pct, **kw):
    return _transform(img, (1, 0, 0, 0, 1, pct * _size(img)[1]), **kw)


def translate_x_abs(img, pixels, **kw):
    return _transform(img, (1, 0, pixels, 0, 1, 0), **kw)


def translate_y_abs(img, pixels, **kw):
    return _transform(img, (1, 0, 0, 0, 1, pixels), **kw)


def rotation_matrix(degrees, width, height):
    """The map from output to input pixels of Image.rotate(degrees) about the centre, in the same float
    arithmetic (cosine and sine of the negated angle rounded to 15 places)."""
    theta = -math.radians(degrees % 360.0)
    cos, sin, neg_sin = round(math.cos(theta), 15), round(math.sin(theta), 15), round(-math.sin(theta), 15)
    cx, cy = width / 2, height / 2
    return cos, sin, cos * -cx + sin * -cy + cx, neg_sin, cos, neg_sin * -cx + cos * -cy + cy


def rotate(img, degrees, fillcolor, resample):
    """Image.rotate(degrees); the multiples of 90 degrees stay with Pillow, which transposes those."""
    if degrees % 360.0 in (0.0, 90.0, 180.0, 270.0):
        return _as_pil(img).rotate(degrees, resample=resample, fillcolor=fillcolor)
    return _transform(img, rotation_matrix(degrees, *_size(img)), fillcolor, resample)


def auto_contrast(img, **_):
    return ImageOps.autocontrast(_as_pil(img))


def invert(img, **_):
    return ImageOps.invert(_as_pil(img))


def equalize(img, **_):
    return ImageOps.equalize(_as_pil(img))


def solarize(img, thresh, **_):
    return ImageOps.solarize(_as_pil(img), thresh)


def solarize_add(img, add, thresh=128, **_):
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    img = _as_pil(img)
    if img.mode not in ("L", "RGB"):
        return img
    return img.point(lut * 3 if img.mode == "RGB" else lut)


def posterize(img, bits_to_keep, **_):
    """Keep the top bits; 0 bits gives black (Pillow >= 13 refuses 0, older Pillow returned black)."""
    if bits_to_keep >= 8:
        return img
    img = _as_pil(img)
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def contrast(img, factor, **_):
    return ImageEnhance.Contrast(_as_pil(img)).enhance(factor)


def color(img, factor, **_):
    return ImageEnhance.Color(_as_pil(img)).enhance(factor)


def brightness(img, factor, **_):
    return ImageEnhance.Brightness(_as_pil(img)).enhance(factor)


def sharpness(img, factor, **_):
    return ImageEnhance.Sharpness(_as_pil(img)).enhance(factor)


def _randomly_negate(v):
    return -v if random.random() > 0.5 else v


def _rotate_arg(level, _):
    return (_randomly_negate(level / _MAX_LEVEL * 30.0),)


def _enhance_arg(level, _):
    return (level / _MAX_LEVEL * 1.8 + 0.1,)


def _enhance_increasing_arg(level, _):
    return (1.0 + _randomly_negate(level / _MAX_LEVEL * 0.9),)


def _shear_arg(level, _):
    return (_randomly_negate(level / _MAX_LEVEL * 0.3),)


def _translate_abs_arg(level, hparams):
    return (_randomly_negate(level / _MAX_LEVEL * float(hparams["translate_const"])),)


def _translate_rel_arg(level, hparams):
    return (_randomly_negate(level / _MAX_LEVEL * hparams.get("translate_pct", 0.45)),)


def _posterize_arg(level, _):
    return (int(level / _MAX_LEVEL * 4),)


def _posterize_increasing_arg(level, hparams):
    return (4 - _posterize_arg(level, hparams)[0],)


def _posterize_original_arg(level, _):
    return (int(level / _MAX_LEVEL * 4) + 4,)


def _solarize_arg(level, _):
    return (int(level / _MAX_LEVEL * 256),)


def _solarize_increasing_arg(level, hparams):
    return (256 - _solarize_arg(level, hparams)[0],)


def _solarize_add_arg(level, _):
    return (int(level / _MAX_LEVEL * 110),)


# name -> (op, magnitude-to-argument)
OPS = {
    "AutoContrast": (auto_contrast, None), "Equalize": (equalize, None), "Invert": (invert, None),
    "Rotate": (rotate, _rotate_arg),
    "Posterize": (posterize, _posterize_arg), "PosterizeIncreasing": (posterize, _posterize_increasing_arg),
    "PosterizeOriginal": (posterize, _posterize_original_arg),
    "Solarize": (solarize, _solarize_arg), "SolarizeIncreasing": (solarize, _solarize_increasing_arg),
    "SolarizeAdd": (solarize_add, _solarize_add_arg),
    "Color": (color, _enhance_arg), "ColorIncreasing": (color, _enhance_increasing_arg),
    "Contrast": (contrast, _enhance_arg), "ContrastIncreasing": (contrast, _enhance_increasing_arg),
    "Brightness": (brightness, _enhance_arg), "BrightnessIncreasing": (brightness, _enhance_increasing_arg),
    "Sharpness": (sharpness, _enhance_arg), "SharpnessIncreasing": (sharpness, _enhance_increasing_arg),
    "ShearX": (shear_x, _shear_arg), "ShearY": (shear_y, _shear_arg),
    "TranslateX": (translate_x_abs, _translate_abs_arg), "TranslateY": (translate_y_abs, _translate_abs_arg),
    "TranslateXRel": (translate_x_rel, _translate_rel_arg), "TranslateYRel": (translate_y_rel, _translate_rel_arg),
}

RAND_TRANSFORMS = ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                   "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
RAND_INCREASING_TRANSFORMS = [
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel"]


class AugmentOp:
    def __init__(self, name, prob=0.5, magnitude=10, hparams=None):
        hparams = hparams or {}
        self.name = name
        self.aug_fn, self.level_fn = OPS[name]
        self.prob, self.magnitude, self.hparams = prob, magnitude, dict(hparams)
        self.kwargs = dict(fillcolor=hparams.get("img_mean", _FILL), resample=hparams.get("interpolation"))
        self.magnitude_std = self.hparams.get("magnitude_std", 0)

    def _kwargs(self):
        kw = dict(self.kwargs)
        if kw["resample"] is None:  # timm's 'random' interpolation
            kw["resample"] = random.choice((Image.BILINEAR, Image.BICUBIC))
        return kw

    def __call__(self, img):
        if self.prob < 1.0 and random.random() > self.prob:
            return img
        magnitude = self.magnitude
        if self.magnitude_std and self.magnitude_std > 0:
            magnitude = random.gauss(magnitude, self.magnitude_std)
        magnitude = min(_MAX_LEVEL, max(0.0, magnitude))
        args = self.level_fn(magnitude, self.hparams) if self.level_fn is not None else ()
        return self.aug_fn(img, *args, **self._kwargs())

    def __repr__(self):
        return f"{self.name}(p={self.prob}, m={self.magnitude}, mstd={self.magnitude_std})"


class RandAugment:
    def __init__(self, ops, num_layers=2):
        self.ops, self.num_layers = ops, num_layers

    def __call__(self, img):
        for op in np.random.choice(self.ops, self.num_layers, replace=True):
            img = op(img)
        return img

    def __repr__(self):
        return f"RandAugment(n={self.num_layers}, ops={self.ops})"


def rand_augment_transform(config_str, hparams):
    """Parse 'rand-m{magnitude}-n{layers}-mstd{std}-inc{0|1}' as timm does (any inc value selects the
    increasing set, as timm's bool('0') is True)."""
    magnitude, num_layers, transforms = _MAX_LEVEL, 2, RAND_TRANSFORMS
    hparams = dict(hparams)
    parts = config_str.split("-")
    if parts[0] != "rand":
        raise ValueError(f"auto-augment policy '{config_str}' is not supported; use 'rand-...'")
    for c in parts[1:]:
        cs = re.split(r"(\d.*)", c)
        if len(cs) < 2:
            continue
        key, val = cs[:2]
        if key == "mstd":
            hparams.setdefault("magnitude_std", float(val))
        elif key == "inc":
            transforms = RAND_INCREASING_TRANSFORMS
        elif key == "m":
            magnitude = int(val)
        elif key == "n":
            num_layers = int(val)
        else:
            raise ValueError(f"unknown RandAugment option '{c}' in '{config_str}'")
    ops = [AugmentOp(name, prob=0.5, magnitude=magnitude, hparams=hparams) for name in transforms]
    return RandAugment(ops, num_layers)
