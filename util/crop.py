"""The linear-probing crop: one draw of area and aspect ratio, clamped to the image (TF/BYOL style)."""
import math
import random

from util.transforms import RandomResizedCrop as _RandomResizedCrop


class RandomResizedCrop(_RandomResizedCrop):
    """No retry loop: w, h from one (area, log-ratio) draw, each clamped to the image; uniform offsets."""

    def get_params(self, img):
        width, height = img.size
        target_area = height * width * random.uniform(*self.scale)
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect_ratio = math.exp(random.uniform(*log_ratio))
        w = min(int(round(math.sqrt(target_area * aspect_ratio))), width)
        h = min(int(round(math.sqrt(target_area / aspect_ratio))), height)
        return random.randint(0, height - h), random.randint(0, width - w), h, w
