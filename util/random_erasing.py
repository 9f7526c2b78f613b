"""RandomErasing as timm 0.3.2 applies it, split in two: the boxes are drawn per sample (in the loader
worker, from the sample's seeded stream), the normalised pixels are replaced per batch (training process)."""
import math
import random

import numpy as np
import paddle


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

    def draw(self, img_h, img_w):
        """The boxes for one image: rows (top, left, h, w, noise seed), h = 0 for none, max_count rows."""
        boxes = np.zeros((self.max_count, 5), np.int64)
        if random.random() > self.probability:
            return boxes
        area = img_h * img_w
        count = self.min_count if self.min_count == self.max_count else random.randint(self.min_count, self.max_count)
        for i in range(count):
            for _ in range(10):
                target_area = random.uniform(self.min_area, self.max_area) * area / count
                aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
                h = int(round(math.sqrt(target_area * aspect_ratio)))
                w = int(round(math.sqrt(target_area / aspect_ratio)))
                if w < img_w and h < img_h:
                    boxes[i, :4] = random.randint(0, img_h - h), random.randint(0, img_w - w), h, w
                    break
        boxes[:, 4] = random.getrandbits(31)  # after every decision, so that the boxes are timm's draws
        return boxes

    def __call__(self, img):
        """Per-sample step on an HWC array: (img, its boxes)."""
        return img, self.draw(*img.shape[:2])

    def fill(self, x, boxes):
        """Erase in place the boxes (N, max_count, 5) of the NCHW float32 batch x (array or tensor)."""
        for i, sample in enumerate(boxes):
            rng = np.random.default_rng(int(sample[0, 4]))
            for top, left, h, w, _ in sample:
                if h == 0:
                    continue
                chan = x.shape[1]
                if self.mode == "pixel":
                    noise = rng.standard_normal((chan, h, w), dtype=np.float32)
                elif self.mode == "rand":
                    noise = np.broadcast_to(rng.standard_normal((chan, 1, 1), dtype=np.float32), (chan, h, w))
                else:
                    noise = np.zeros((chan, h, w), np.float32)
                x[i, :, top:top + h, left:left + w] = noise if isinstance(x, np.ndarray) else paddle.to_tensor(noise)
