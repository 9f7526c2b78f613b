"""Writes timm_rand_augment.npz: timm 0.3.2's RandAugment (`rand-m9-mstd0.5-inc1`, the official fine-tuning
policy, bicubic, fill = the ImageNet mean) applied to crops of the demo photos, one seed per image, for
tests/test_augment.py. Needs a Python with torch and timm 0.3.2 (not a dependency of the project):

    python -m venv /tmp/tv && /tmp/tv/bin/pip install torch torchvision timm==0.3.2 numpy
    /tmp/tv/bin/python tests/reference/make_timm_rand_augment.py
"""
import collections.abc
import os
import random
import sys
import types

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = [os.path.join(HERE, "..", "..", "demo", p) for p in ("chelsea.png", "coffee.png", "rocket.jpg")]
POLICY, SIZE, COUNT = "rand-m9-mstd0.5-inc1", 40, 96
HPARAMS = dict(translate_const=int(SIZE * 0.45), img_mean=(124, 116, 104), interpolation=Image.BICUBIC)


def inputs():
    """COUNT square crops of the photos, resized (bicubic) to SIZE px: uint8 COUNT x SIZE x SIZE x 3."""
    photos = [Image.open(p).convert("RGB") for p in PHOTOS]
    out = []
    for i in range(COUNT):
        img = photos[i % 3]
        rng = np.random.RandomState(i)
        side = int(rng.randint(SIZE, min(img.size)))
        left, top = int(rng.randint(0, img.size[0] - side + 1)), int(rng.randint(0, img.size[1] - side + 1))
        out.append(np.asarray(img.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.BICUBIC)))
    return np.stack(out)


def main():
    # timm 0.3.2 on today's torch and Pillow: the official README's torch._six fix, and 0-bit posterize as
    # older Pillow gave it (black)
    sys.modules.setdefault("torch._six", types.SimpleNamespace(container_abcs=collections.abc,
                                                               string_classes=(str, bytes), int_classes=int))
    from PIL import ImageOps
    posterize = ImageOps.posterize
    ImageOps.posterize = lambda img, bits: posterize(img, bits) if bits else img.point(lambda _: 0)
    from timm.data.auto_augment import rand_augment_transform
    augment = rand_augment_transform(POLICY, dict(HPARAMS))
    outputs = []
    for i, img in enumerate(inputs()):
        random.seed(i)
        np.random.seed(i)
        outputs.append(np.asarray(augment(Image.fromarray(img))))
    np.savez_compressed(os.path.join(HERE, "timm_rand_augment.npz"), outputs=np.stack(outputs))


if __name__ == "__main__":
    main()
