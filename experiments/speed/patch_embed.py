"""Side-by-side: a fine-tuning step (forward, backward, AdamW) with the CPU patch embedding of
util/cpu_layer.py against the same model with Paddle's conv, alternating blocks of steps in one process.

    python experiments/speed/patch_embed.py --model vit_micro_patch4 --input_size 28 --batch_size 128
    python experiments/speed/patch_embed.py --model vit_base_patch16 --input_size 224 --batch_size 8 --steps 3

Prints each round's seconds per step and the ratios conv / matrix product.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import util  # noqa: E402,F401  (first: keeps Paddle's import-time ccache warning off the console)
import paddle  # noqa: E402
import paddle.nn.functional as F  # noqa: E402

import models_vit  # noqa: E402
from util.adamw import AdamW  # noqa: E402
from util.args import positive_int  # noqa: E402
from util.cpu import configure_cpu  # noqa: E402
from util.cpu_layer import attach_cpu_paths  # noqa: E402


def build(args, conv):
    paddle.seed(0)
    model = attach_cpu_paths(getattr(models_vit, args.model)(img_size=args.input_size, num_classes=10))
    if conv:
        del model.patch_embed.forward  # the attached forward: the class's own (the conv) serves again
    return model, AdamW(learning_rate=1e-4, parameters=model.parameters())


def main():
    parser = argparse.ArgumentParser("patch embedding: matrix product vs conv")
    parser.add_argument("--model", default="vit_micro_patch4")
    parser.add_argument("--input_size", default=28, type=positive_int)
    parser.add_argument("--batch_size", default=128, type=positive_int)
    parser.add_argument("--steps", default=10, type=positive_int, help="steps per block")
    parser.add_argument("--rounds", default=8, type=positive_int)
    args = parser.parse_args()
    configure_cpu()
    runs = {name: build(args, name == "conv") for name in ("conv", "matmul")}
    x = paddle.randn([args.batch_size, 3, args.input_size, args.input_size])
    y = paddle.randint(0, 10, [args.batch_size])

    def steps(name):
        model, opt = runs[name]
        start = time.perf_counter()
        for _ in range(args.steps):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.clear_grad()
        return (time.perf_counter() - start) / args.steps

    for name in runs:
        steps(name)  # warm-up
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name in runs:
            times[name].append(steps(name))
    for name, t in times.items():
        print(f"{name:7s} s/step", " ".join(f"{s:.4f}" for s in t))
    ratios = sorted(a / b for a, b in zip(times["conv"], times["matmul"]))
    print(f"conv / matmul: {ratios[0]:.2f}-{ratios[-1]:.2f} (median {ratios[len(ratios) // 2]:.2f})")


if __name__ == "__main__":
    main()
