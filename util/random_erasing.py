"""RandomErasing as timm 0.3.2 applies it, split in two: the boxes are drawn per sample (in the loader
worker, from the sample's seeded stream, as timm's decisions), and the normalised pixels are replaced on the
training device by batched operations, with values drawn from Paddle's generator in the training step."""
import math
import random

import numpy as np
import paddle

from util import fast_image


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
        """The boxes for one image: max_count rows (top, left, h, w), h = 0 for none."""
        boxes = np.zeros((self.max_count, 4), np.int64)
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
                    boxes[i] = random.randint(0, img_h - h), random.randint(0, img_w - w), h, w
                    break
        return boxes

    def __call__(self, img):
        """Per-sample step on an HWC array: (img, its boxes)."""
        return img, self.draw(*img.shape[:2])

    def fill(self, x, boxes):
        """The NCHW float32 batch tensor x with the boxes (N x max_count x 4 int64 tensor) erased: per-pixel
        N(0, 1) noise ('pixel'), one N(0, 1) colour per channel and box ('rand') or zeros ('const'), drawn
        from Paddle's generator. Whole-batch operations on x's device: no per-sample loop, nothing read back.
        On the CPU with the native code, the boxes alone are filled in place in x, with normals from a
        stream seeded by python's `random` (seeded by the step as Paddle's generator is)."""
        if x.place.is_cpu_place() and boxes.place.is_cpu_place() and fast_image.available():
            return fast_image.erase_boxes(x, boxes, self.mode, random.getrandbits(64))
        n, c, h, w = x.shape
        rows = paddle.arange(h, dtype=boxes.dtype).reshape([1, 1, h, 1])
        cols = paddle.arange(w, dtype=boxes.dtype).reshape([1, 1, 1, w])
        top, left, height, width = (b.reshape([n, -1, 1, 1]) for b in boxes.unbind(-1))
        inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)  # N x K x H x W
        if self.mode == "rand":
            colours = paddle.randn([n, inside.shape[1], c, 1, 1], dtype=x.dtype)
            for k in range(inside.shape[1]):  # a later box covers an earlier one, as in timm's loop
                x = paddle.where(inside[:, k:k + 1], colours[:, k], x)
            return x
        erased = inside.any(axis=1, keepdim=True)
        values = paddle.randn(x.shape, dtype=x.dtype) if self.mode == "pixel" else paddle.zeros_like(x)
        return paddle.where(erased, values, x)
