"""RandomErasing as timm 0.3.2 applies it, on the normalized CHW float array of one image."""
import math
import random

import numpy as np


class RandomErasing:
    """With probability `probability`, erase `count` rectangles (count in [min_count, max_count]) of area
    in [min_area, max_area] / count and log-uniform aspect ratio in [min_aspect, 1 / min_aspect], 10 tries
    each. mode 'pixel': per-pixel N(0, 1); 'rand': one N(0, 1) colour per channel; 'const': zeros."""

    def __init__(self, probability=0.5, min_area=0.02, max_area=1 / 3, min_aspect=0.3, max_aspect=None,
                 mode="const", min_count=1, max_count=None):
        self.probability, self.min_area, self.max_area = probability, min_area, max_area
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.min_count, self.max_count = min_count, max_count or min_count
        mode = (mode or "const").lower()
        if mode not in ("const", "rand", "pixel"):
            raise ValueError(f"random erasing mode must be const, rand or pixel, got '{mode}'")
        self.mode = mode

    def _pixels(self, chan, h, w):
        if self.mode == "pixel":
            return np.random.standard_normal((chan, h, w)).astype(np.float32)
        if self.mode == "rand":
            return np.random.standard_normal((chan, 1, 1)).astype(np.float32)
        return np.zeros((chan, 1, 1), np.float32)

    def __call__(self, img):
        if random.random() > self.probability:
            return img
        chan, img_h, img_w = img.shape
        area = img_h * img_w
        count = self.min_count if self.min_count == self.max_count else random.randint(self.min_count, self.max_count)
        for _ in range(count):
            for _ in range(10):
                target_area = random.uniform(self.min_area, self.max_area) * area / count
                aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
                h = int(round(math.sqrt(target_area * aspect_ratio)))
                w = int(round(math.sqrt(target_area / aspect_ratio)))
                if w < img_w and h < img_h:
                    top = random.randint(0, img_h - h)
                    left = random.randint(0, img_w - w)
                    img[:, top:top + h, left:left + w] = self._pixels(chan, h, w)
                    break
        return img
