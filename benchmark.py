"""Measure training and inference speed with the project's real code, on synthetic input.

    python benchmark.py --job pretrain --model mae_vit_base_patch16 --batch_size 8 --input_size 224 --iters 10
    python benchmark.py --job finetune --model vit_base_patch16 --batch_size 8 --iters 10
    python benchmark.py --job infer --model vit_base_patch16 --batch_size 8 --iters 10 [--backend inference]
    python benchmark.py --job data --data_path data/jpeg_bench --transform pretrain --num_workers 2 --batch_size 64

Prints one JSON line: images per second, median seconds per iteration, peak memory (RSS on CPU, allocated
on GPU), the model's FLOPs per image and achieved GFLOP/s, and next to them the GFLOP/s of a float32
2048^3 matrix product measured on the same device (the practical peak). Training jobs run the engines'
train_one_epoch (model, loss, loss scaler, optimizer groups, per-iteration lr schedule; mixup on for
finetune). FLOPs are counted analytically: 2 per multiply-add of every matrix product (patch embedding,
qkv, attention scores and mixing, projections, MLPs, heads); a training step counts 3x the forward pass.
"""
import util  # noqa: F401  (first: keeps Paddle's import-time ccache warning off the console)
import argparse
import json
import os
import statistics
import tempfile
import time

import paddle

import models_mae
import models_vit
import util.misc as misc
from layer import set_fused_attention
from util.amp import autocast, create_loss_scaler
from util.args import check_environment, check_model_input, device, non_negative_int, positive_int, ratio
from util.cpu import configure_cpu, cpu_threads
from util.errors import run
from util.factory import prepare


def get_args_parser():
    parser = argparse.ArgumentParser("MAE benchmark", add_help=True)
    parser.add_argument("--job", required=True, choices=["pretrain", "finetune", "infer", "data"])
    parser.add_argument("--model", default=None, help="default: mae_vit_base_patch16 / vit_base_patch16")
    parser.add_argument("--batch_size", default=8, type=positive_int)
    parser.add_argument("--input_size", default=224, type=positive_int)
    parser.add_argument("--iters", default=10, type=positive_int)
    parser.add_argument("--warmup", default=2, type=non_negative_int)
    parser.add_argument("--mask_ratio", default=0.75, type=ratio)
    parser.add_argument("--backend", default="dynamic", choices=["dynamic", "inference"],
                        help="infer with the dynamic model or an exported one under Paddle Inference")
    parser.add_argument("--data_path", default="", help="--job data: ImageFolder root with train/")
    parser.add_argument("--transform", default="finetune", choices=["pretrain", "finetune", "eval"])
    parser.add_argument("--num_workers", default=0, type=non_negative_int)
    parser.add_argument("--device", default="gpu" if paddle.is_compiled_with_cuda() else "cpu", type=device)
    parser.add_argument("--no_amp", action="store_true")
    parser.add_argument("--amp_dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--recompute", action="store_true", help="activation recomputation in the blocks")
    return parser


def vit_forward_flops(depth, dim, tokens, mlp_ratio=4.0):
    """Matrix-product FLOPs of `depth` transformer blocks on `tokens` tokens of width `dim`."""
    per_block = 2 * tokens * dim * dim * (3 + 1 + 2 * mlp_ratio) + 2 * 2 * tokens * tokens * dim
    return depth * per_block


def model_flops(model, job, mask_ratio):
    """Forward FLOPs per image."""
    pe = model.patch_embed
    L, p = pe.num_patches, pe.patch_size[0]
    dim = pe.proj.weight.shape[0]
    flops = 2 * L * dim * 3 * p * p
    if job == "pretrain":
        kept = int(L * (1 - mask_ratio)) + 1
        dec = model.decoder_embed.weight.shape[1]
        flops += vit_forward_flops(len(model.blocks), dim, kept) + 2 * kept * dim * dec
        flops += vit_forward_flops(len(model.decoder_blocks), dec, L + 1) + 2 * (L + 1) * dec * p * p * 3
    else:
        flops += vit_forward_flops(len(model.blocks), dim, L + 1) + 2 * dim * model.num_classes
    return flops


class TimedBatches:
    """The same synthetic batch `n` times; records when each one is taken (= when the previous step ended)."""

    def __init__(self, batch, n):
        self.batch, self.n, self.stamps = batch, n, []

    def __len__(self):
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            self.stamps.append(time.perf_counter())
            yield self.batch


def step_times(stamps, end):
    marks = stamps + [end]
    return [b - a for a, b in zip(marks[:-1], marks[1:])]


def train_args(args):
    ns = argparse.Namespace(**vars(args))
    ns.accum_iter, ns.print_freq, ns.log_dir, ns.seed, ns.on_nonfinite = 1, 10 ** 9, "", 0, "stop"
    ns.lr, ns.min_lr, ns.warmup_epochs, ns.epochs = 1e-4, 0.0, 1, 100
    ns.weight_decay, ns.layer_decay = 0.05, 0.75
    return ns


def bench_train(args, model, x, y):
    import builtins
    targs = train_args(args)
    scaler = create_loss_scaler(args)
    if args.job == "pretrain":
        import main_pretrain
        from engine_pretrain import train_one_epoch
        optimizer = main_pretrain.create_optimizer(model, targs)

        def run(loader):
            train_one_epoch(model, loader, optimizer, 0, scaler, args=targs)
    else:
        import main_finetune
        from engine_finetune import train_one_epoch
        from util.losses import SoftTargetCrossEntropy
        from util.mixup import Mixup
        optimizer = main_finetune.create_optimizer(model, targs)
        mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=model.num_classes)

        def run(loader):
            train_one_epoch(model, SoftTargetCrossEntropy(), loader, optimizer, 0, scaler, None, mixup, args=targs)
    quiet = builtins.print
    builtins.print = lambda *a, **k: None  # the engines' progress lines
    try:
        if args.warmup:
            run(TimedBatches((x, y), args.warmup))
        loader = TimedBatches((x, y), args.iters)
        run(loader)
        end = time.perf_counter()
    finally:
        builtins.print = quiet
    return step_times(loader.stamps, end)


def timed(fn, warmup, iters):
    """Seconds of each of `iters` calls of fn, after `warmup` untimed ones."""
    times = []
    for i in range(warmup + iters):
        t = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def bench_infer(args, model, x):
    model.eval()
    if args.backend == "inference":
        from main_infer import ExportedModel
        with tempfile.TemporaryDirectory() as tmp:
            prefix = os.path.join(tmp, "model")
            paddle.jit.save(model, prefix, input_spec=[paddle.static.InputSpec(
                [None, 3, args.input_size, args.input_size], "float32")])
            with open(prefix + ".info", "w") as f:
                json.dump({"input_size": args.input_size, "num_classes": model.num_classes}, f)
            runner = ExportedModel(prefix, args.device)
        xs = x.numpy()

        def forward():
            runner(xs)
    else:
        def forward():
            with paddle.no_grad(), autocast(args):
                model(x).numpy()
    return timed(forward, args.warmup, args.iters)


def bench_data(args):
    from util.datasets import ImageFolder, Loader
    from util.transforms import eval_transform, finetune_transform, pretrain_transform
    tf = {"pretrain": pretrain_transform, "finetune": finetune_transform, "eval": eval_transform}[args.transform]
    transform = tf(args.input_size)
    dataset = ImageFolder(os.path.join(args.data_path, "train"), transform=transform)
    sampler = paddle.io.BatchSampler(dataset, shuffle=True, batch_size=args.batch_size, drop_last=True)
    loader = Loader(dataset, sampler, args.num_workers)
    erasing = getattr(transform, "erasing", None)
    stamps = []
    for x, *boxes, _ in loader:
        if erasing is not None:  # as the fine-tuning step does
            erasing.fill(x, boxes[0]).numpy()
        stamps.append(time.perf_counter())
        if len(stamps) >= args.warmup + args.iters + 1:
            break
    return step_times(stamps[args.warmup:-1], stamps[-1])


def gemm_peak(n=2048, reps=5):
    """GFLOP/s of a float32 n x n x n matrix product on the current device (median of `reps`): the
    machine's practical peak, next to which the model's FLOP/s are read."""
    a, b = paddle.randn([n, n]), paddle.randn([n, n])
    times = timed(lambda: float(paddle.matmul(a, b)[0, 0]), 1, reps)  # float(): waits for the GPU too
    return 2 * n ** 3 / statistics.median(times) / 1e9


def parse_args(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.recompute and args.job in ("data", "infer"):
        parser.error(f"argument --recompute: --job {args.job} runs no backward pass, so there is nothing to recompute")
    if args.job == "data":
        if not args.data_path:
            parser.error("argument --data_path: --job data needs an ImageFolder root (with train/)")
    else:
        names = models_mae.MODELS if args.job == "pretrain" else models_vit.MODELS
        args.model = args.model or names[0]
        check_model_input(parser, args.model, args.input_size, names)
        check_environment(parser)
    return args


def main(argv=None):
    args = parse_args(argv)
    paddle.set_device(args.device)
    if args.device == "cpu":
        configure_cpu()
    paddle.seed(0)
    result = {"job": args.job, "batch_size": args.batch_size, "input_size": args.input_size, "device": args.device,
              "threads": cpu_threads() if args.device == "cpu" else None}
    if args.job == "data":
        times = bench_data(args)
        flops = None
    else:
        if args.job == "pretrain":
            model = getattr(models_mae, args.model)(img_size=args.input_size, norm_pix_loss=True)
        else:
            model = getattr(models_vit, args.model)(img_size=args.input_size, num_classes=1000, global_pool=True,
                                                    drop_path_rate=0.1 if args.job == "finetune" else 0.0)
        if args.job == "infer" and args.backend == "inference":
            set_fused_attention(model, False)  # exported as main_export.py does
        else:
            model = prepare(model, args.recompute)[0]
        result["model"] = args.model
        x = paddle.randn([args.batch_size, 3, args.input_size, args.input_size])
        y = paddle.randint(0, 1000, [args.batch_size])
        flops = model_flops(model, args.job, args.mask_ratio) * (1 if args.job == "infer" else 3)
        times = bench_infer(args, model, x) if args.job == "infer" else bench_train(args, model, x, y)
    median = statistics.median(times)
    result.update({"img_per_s": round(args.batch_size / median, 3), "s_per_iter_median": round(median, 4),
                   "peak_mem_mb": round(misc.max_memory_mb(), 1)})
    if args.job == "data":
        result.update(transform=args.transform, num_workers=args.num_workers,
                      img_per_s_per_worker=round(args.batch_size / median / max(1, args.num_workers), 1))
    if flops is not None:
        result["gflop_per_img"] = round(flops / 1e9, 3)
        result["model_gflop_per_s"] = round(flops * args.batch_size / median / 1e9, 1)
        result["gemm_peak_gflop_per_s"] = round(gemm_peak(), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    run(main)
