"""Small ImageFolder datasets written by the tests: real PNG files of several modes."""
import os

import shutil

import numpy as np
from PIL import Image

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "fashion_mnist_small")


def make_image_folder(root, classes=2, per_class=12, size=32, split="train", seed=0, modes=True):
    """root/split/class_k/img_i.png with smooth colour patterns; one grayscale and one RGBA image if modes."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c in range(classes):
        folder = os.path.join(root, split, f"class_{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            f = rng.uniform(1, 4, size=3)
            phase = rng.uniform(0, 6.28, size=3)
            img = np.stack([np.sin(f[k] * (xx if (c + k) % 2 else yy) * 6.28 + phase[k]) for k in range(3)], -1)
            img = ((img * 0.5 + 0.5) * 255).astype(np.uint8)
            pil = Image.fromarray(img)
            if modes and c == 0 and i == 0:
                pil = pil.convert("L")
            elif modes and c == 0 and i == 1:
                pil = pil.convert("RGBA")
            pil.save(os.path.join(folder, f"img_{i}.png"))
    return root


def make_train_val(root, classes, train_per_class, val_per_class):
    """root/train and root/val with the same classes (val drawn with another seed)."""
    make_image_folder(root, classes=classes, per_class=train_per_class, split="train")
    make_image_folder(root, classes=classes, per_class=val_per_class, split="val", seed=1)
    return root


def demo_subset(dst, per_split):
    """dst/SPLIT/CLASS with the first per_split[SPLIT] images of each class of the shipped Fashion-MNIST
    subset (real data, no download)."""
    for split, n in per_split.items():
        src = os.path.join(DEMO, split)
        for c in sorted(os.listdir(src)):
            os.makedirs(os.path.join(dst, split, c))
            for f in sorted(os.listdir(os.path.join(src, c)))[:n]:
                shutil.copy(os.path.join(src, c, f), os.path.join(dst, split, c, f))
    return str(dst)
