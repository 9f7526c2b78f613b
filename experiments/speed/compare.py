"""Side-by-side speed: benchmark.py against torch_reference.py (model steps) or, with --data_path, against
data_reference.py (the official input pipeline), alternating, on this machine.

    python experiments/speed/compare.py --torch_python /path/to/venv-with-torch/bin/python [--rounds 2]
    python experiments/speed/compare.py --torch_python PYTHON --data_path data/jpeg_bench --num_workers 2

Each round runs every job once in each framework, one after the other, so both see the same machine
load; the ratio of each pair is reported (the machine's load moves absolute figures, much less ratios).
Prints a Markdown table.
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
from util.args import positive_int
JOBS = [("inference, dynamic graph", ["--job", "infer"], "infer"),
        ("inference, Paddle Inference", ["--job", "infer", "--backend", "inference"], "infer"),
        ("MAE pre-training step", ["--job", "pretrain"], "pretrain"),
        ("fine-tuning step", ["--job", "finetune"], "finetune")]
DATA_JOBS = [("input pipeline, pre-training transform", "pretrain", None),
             ("input pipeline, fine-tuning transform", "finetune", None),
             ("input pipeline, eval transform", "eval", None)]


def run(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    except OSError as e:
        sys.exit(f"error: cannot run {cmd[0]}: {e.strerror}")
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])["img_per_s"]
    except (IndexError, ValueError, KeyError):
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"error: {' '.join(cmd)} gave no result (exit {out.returncode}): {last}")


def span(values, fmt="{:.2f}"):
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def main():
    parser = argparse.ArgumentParser("side-by-side speed")
    parser.add_argument("--torch_python", required=True, help="a python that can import torch")
    parser.add_argument("--rounds", default=2, type=positive_int)
    parser.add_argument("--sdpa", action="store_true", help="torch with fused attention (recent timm)")
    parser.add_argument("--data_path", default=None, help="time the input pipelines on this ImageFolder instead")
    parser.add_argument("--num_workers", default=2, type=positive_int, help="loader workers (--data_path)")
    parser.add_argument("--jobs", nargs="+", default=None, choices=["infer", "pretrain", "finetune"],
                        help="only these model jobs (default: all)")
    args = parser.parse_args()
    if not os.access(args.torch_python, os.X_OK) or os.path.isdir(args.torch_python):
        sys.exit(f"error: --torch_python {args.torch_python}: not an executable file")
    jobs = [j for j in JOBS if args.jobs is None or j[2] in args.jobs]
    rows = {name: ([], []) for name, _, _ in (DATA_JOBS if args.data_path else jobs)}
    common = ["--batch_size", "8", "--iters", "3", "--warmup", "3"]  # steady state: the heap grows in the first steps
    for _ in range(args.rounds):
        if args.data_path:
            # 64-image batches; the first 4 intervals are left out: they drain the batches prefetched at start
            common = ["--data_path", args.data_path, "--num_workers", str(args.num_workers), "--batch_size", "64",
                      "--iters", "24", "--warmup", "4"]
            for name, transform, _ in DATA_JOBS:
                rows[name][0].append(run([sys.executable, "benchmark.py", "--job", "data", "--transform", transform,
                                          *common]))
                rows[name][1].append(run([args.torch_python, os.path.join(HERE, "data_reference.py"),
                                          "--transform", transform, *common]))
            continue
        for name, flags, job in jobs:
            rows[name][0].append(run([sys.executable, "benchmark.py", *flags, *common]))
            rows[name][1].append(run([args.torch_python, os.path.join(HERE, "torch_reference.py"), "--job", job,
                                      *common, *(["--sdpa"] if args.sdpa else [])]))
    print("| job | this project (img/s) | official / PyTorch reference (img/s) | ratio |")
    print("|---|---|---|---|")
    for name, (ours, ref) in rows.items():
        print(f"| {name} | {span(ours)} | {span(ref)} | {span([a / b for a, b in zip(ours, ref)])} |")
    print()
    for name, (ours, ref) in rows.items():
        print(f"{name}, ratio of each pair in order: " + ", ".join(f"{a / b:.2f}" for a, b in zip(ours, ref)))


if __name__ == "__main__":
    main()
