"""The official input pipeline (torchvision ImageFolder + transforms, timm 0.3.2 create_transform), timmed
as `benchmark.py --job data` times this project's: batches per second out of a DataLoader, up to the
normalised float32 batch the model receives. Runs in an environment with torch, torchvision and timm 0.3.2:

    python experiments/speed/data_reference.py --data_path data/jpeg_bench --transform pretrain --num_workers 2

Prints one JSON line like benchmark.py's.
"""
import argparse
import collections.abc
import json
import os
import statistics
import sys
import time
import types

import torch
from torchvision import datasets, transforms

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def official_transform(name, input_size):
    """As main_pretrain.py, and build_transform() of util/datasets.py, of the official code."""
    if name == "pretrain":
        return transforms.Compose([transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=3),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                   transforms.Normalize(mean=MEAN, std=STD)])
    if name == "finetune":
        # timm 0.3.2 imports torch._six, which newer torch no longer has (the official README's fix)
        sys.modules.setdefault("torch._six", types.SimpleNamespace(container_abcs=collections.abc,
                                                                   string_classes=(str, bytes), int_classes=int))
        from PIL import ImageOps
        posterize = ImageOps.posterize  # Pillow >= 10 refuses 0 bits, which older Pillow (and timm) took as black
        ImageOps.posterize = lambda img, bits: posterize(img, bits) if bits else img.point(lambda _: 0)
        from timm.data import create_transform
        return create_transform(input_size=input_size, is_training=True, color_jitter=None,
                                auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", re_prob=0.25,
                                re_mode="pixel", re_count=1, mean=MEAN, std=STD)
    size = int(input_size / (224 / 256)) if input_size <= 224 else input_size
    return transforms.Compose([transforms.Resize(size, interpolation=3), transforms.CenterCrop(input_size),
                               transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", required=True, help="ImageFolder root with train/")
    parser.add_argument("--transform", default="finetune", choices=["pretrain", "finetune", "eval"])
    parser.add_argument("--batch_size", default=64, type=int)
    parser.add_argument("--input_size", default=224, type=int)
    parser.add_argument("--num_workers", default=2, type=int)
    parser.add_argument("--iters", default=10, type=int)
    parser.add_argument("--warmup", default=2, type=int)
    args = parser.parse_args()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    dataset = datasets.ImageFolder(os.path.join(args.data_path, "train"),
                                   transform=official_transform(args.transform, args.input_size))
    loader = torch.utils.data.DataLoader(dataset, sampler=torch.utils.data.RandomSampler(dataset),
                                         batch_size=args.batch_size, num_workers=args.num_workers,
                                         pin_memory=torch.cuda.is_available(), drop_last=True)
    stamps = []
    for _ in loader:
        stamps.append(time.perf_counter())
        if len(stamps) >= args.warmup + args.iters + 1:
            break
    if len(stamps) < args.warmup + args.iters + 1:
        sys.exit(f"error: --data_path {args.data_path}: fewer than {args.warmup + args.iters + 1} batches")
    intervals = [b - a for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:])]
    median = statistics.median(intervals)
    print(json.dumps({"job": "data", "transform": args.transform, "batch_size": args.batch_size,
                      "num_workers": args.num_workers, "img_per_s": round(args.batch_size / median, 1),
                      "img_per_s_per_worker": round(args.batch_size / median / max(1, args.num_workers), 1),
                      "s_per_iter_median": round(median, 4)}))


if __name__ == "__main__":
    main()
