"""An ImageNet-like JPEG test set for the input-pipeline timing, made from the photos shipped in demo/.

    python experiments/speed/make_jpegs.py --out data/jpeg_bench --count 2048

Each image is a random crop of one of the photos (area 30-100%, aspect 3:4 to 16:9), resized to a width of
400-520 px (ImageNet's typical size), randomly flipped, saved as baseline JPEG at quality 90 with 4:2:0
chroma subsampling (what most cameras and ImageNet's files use), in OUT/train/<photo>/ and OUT/val/<photo>/.
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "demo")
PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")


def make_image(photo, rng):
    w, h = photo.size
    area = rng.uniform(0.3, 1.0) * w * h
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(16 / 9))))
    cw, ch = min(w, int(round(np.sqrt(area * aspect)))), min(h, int(round(np.sqrt(area / aspect))))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out_w = int(rng.integers(400, 521))
    out_h = max(1, int(round(out_w * ch / cw)))
    img = photo.crop((left, top, left + cw, top + ch)).resize((out_w, out_h), Image.BICUBIC)
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=2048, help="training images (val gets a quarter)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    photos = [Image.open(os.path.join(DEMO, p)).convert("RGB") for p in PHOTOS]
    for split, count in (("train", args.count), ("val", max(1, args.count // 4))):
        for i in range(count):
            k = i % len(photos)
            folder = os.path.join(args.out, split, os.path.splitext(PHOTOS[k])[0])
            os.makedirs(folder, exist_ok=True)
            make_image(photos[k], rng).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90, subsampling="4:2:0")
    print(f"wrote {args.count} + {max(1, args.count // 4)} JPEGs in {args.out}/train and {args.out}/val")


if __name__ == "__main__":
    sys.exit(main())
