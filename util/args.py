"""Command-line flags shared by the training scripts, with validation."""
import argparse
import math
import os

import paddle

from util.cpu import cpu_threads
from util.nonfinite import injection
from util.errors import FlagError


def positive_int(value):
    v = int(value)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return v


def accum_iter(value):
    if value == "auto":
        return value
    try:
        return positive_int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 or 'auto', got {value!r}") from None


def non_negative_int(value):
    v = int(value)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return v


def seed(value):
    """A random seed every generator accepts, with room for the per-process offset (seed + rank)."""
    v = int(value)
    if not 0 <= v < 2 ** 31:
        raise argparse.ArgumentTypeError(f"must be in [0, 2^31), got {value}")
    return v


def non_negative_float(value):
    v = float(value)
    if not 0 <= v < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return v


def positive_float(value):
    v = float(value)
    if not 0 < v < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return v


def probability(value):
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return v


def below_one(value):
    v = float(value)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return v


def ratio(value):
    v = float(value)
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return v


def crop_fraction(value):
    v = float(value)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return v


def device(value):
    """cpu, gpu or gpu:N (cuda accepted for gpu), checked against this Paddle build and machine."""
    kind, _, index = ("gpu" if value == "cuda" else value.replace("cuda", "gpu")).partition(":")
    if kind not in ("cpu", "gpu") or (index and not index.isdigit()):
        raise argparse.ArgumentTypeError(f"must be cpu, gpu or gpu:N, got {value}")
    if kind == "cpu" and index:
        raise argparse.ArgumentTypeError(f"cpu takes no device index, got {value}")
    if kind == "gpu" and not paddle.is_compiled_with_cuda():
        raise argparse.ArgumentTypeError(f"{value}: this Paddle is built without CUDA; use cpu, or install "
                                         "paddlepaddle-gpu")
    if kind == "gpu" and index and int(index) >= paddle.device.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{value}: this machine has {paddle.device.cuda.device_count()} GPU(s)")
    return f"{kind}:{index}" if index else kind


MAX_PATCHES = 256 * 256
IGNORED = ("world_size", "local_rank", "dist_on_itp", "dist_url", "resplit")  # the official scripts' flags


def check_model_input(parser, model_name, input_size, model_names):
    """parser.error (exit 2) for an unknown model, or an input size it cannot take: not a multiple of its patch
    size, or more than MAX_PATCHES patches (checked before anything of that size is built)."""
    from util.factory import create_model

    if model_name not in model_names:
        parser.error(f"argument --model: unknown model '{model_name}'; valid models: {', '.join(model_names)}")
    if input_size is None:
        return
    with paddle.LazyGuard():
        patch = create_model(model_name).patch_embed.patch_size[0]
    if (input_size // patch) ** 2 > MAX_PATCHES:
        parser.error(f"argument --input_size: {input_size} px makes {(input_size // patch) ** 2} patches of "
                     f"{patch} px; at most {MAX_PATCHES} are supported")
    if input_size % patch:
        parser.error(f"argument --input_size: img_size {input_size} is not divisible by patch_size {patch}")


def add_cache_arg(parser):
    parser.add_argument("--cache_dir", default=None,
                        help="where released checkpoints named in place of a path are kept (default: $MAE_HOME, "
                             "else ~/.cache/mae_paddle)")


def checkpoint_file(parser, flag, value, cache=None):
    """The local file for a checkpoint flag: a path, or a released name (util.hub: fetched into the cache on
    first use). parser.error (exit 2) for neither; a failed download raises DownloadError."""
    from util.hub import resolve

    if not value:
        return value
    path = resolve(value, cache)
    if not os.path.isfile(path):
        parser.error(f"argument {flag}: {path}: " + ("is a folder, not a file" if os.path.isdir(path) else
                                                     "not found (a path, or a released name such as "
                                                     "mae_pretrain_vit_base)"))
    return path


def add_common_args(parser):
    """Flags of main_pretrain, main_finetune and main_linprobe (defaults as the official main_pretrain)."""
    parser.add_argument("--batch_size", default=64, type=positive_int,
                        help="batch size per process (effective batch = batch_size * accum_iter * processes)")
    parser.add_argument("--epochs", default=400, type=positive_int)
    parser.add_argument("--accum_iter", default=1, type=accum_iter,
                        help="accumulate gradients over this many iterations before a step; 'auto': as many as "
                             "keep the effective batch of the checkpoint a run resumes (1 for a new run)")
    parser.add_argument("--model", default="mae_vit_large_patch16", type=str, metavar="MODEL")
    parser.add_argument("--input_size", default=None, type=positive_int,
                        help="image size; default: the model's own (224 for the official models)")
    parser.add_argument("--crop_scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                        help="area range of the training crop (random resized crop); default the official's "
                             "(0.2 1 for pre-training, 0.08 1 otherwise). Small images may want a larger MIN")
    parser.add_argument("--crop_pct", type=crop_fraction, default=None,
                        help="evaluation: resize to input_size / crop_pct, then centre-crop input_size; default "
                             "the official 224/256 (1 above 224 px). 1 keeps the whole image (small images)")
    parser.add_argument("--weight_decay", type=non_negative_float, default=0.05)
    parser.add_argument("--lr", type=non_negative_float, default=None, metavar="LR",
                        help="absolute learning rate; default blr * effective batch / 256")
    parser.add_argument("--blr", type=non_negative_float, default=1e-3, metavar="LR",
                        help="base learning rate: absolute_lr = base_lr * total_batch_size / 256")
    parser.add_argument("--min_lr", type=non_negative_float, default=0.0, metavar="LR",
                        help="lower lr bound for cyclic schedulers that hit 0")
    parser.add_argument("--warmup_epochs", type=non_negative_int, default=40, metavar="N")
    parser.add_argument("--data_path", default="/datasets01/imagenet_full_size/061417/", type=str,
                        help="dataset root with train/ (and val/) in ImageFolder layout")
    parser.add_argument("--output_dir", default="./output_dir", help="where to save checkpoints and log.txt; '' = none")
    parser.add_argument("--log_dir", default="./output_dir", help="VisualDL log folder; '' = none")
    parser.add_argument("--device", default="gpu" if paddle.is_compiled_with_cuda() else "cpu", type=device,
                        help="cpu or gpu (default: gpu when Paddle is built with CUDA)")
    parser.add_argument("--no_amp", action="store_true", help="train in float32 on GPU (AMP is never used on CPU)")
    parser.add_argument("--amp_dtype", default="float16", choices=["float16", "bfloat16"],
                        help="autocast dtype on GPU; float16 uses the dynamic loss scaler")
    parser.add_argument("--recompute", action="store_true",
                        help="recompute block activations in the backward pass: less memory (ViT-L/H), more time")
    parser.add_argument("--seed", default=0, type=seed)
    parser.add_argument("--resume", default="", help="resume from checkpoint (.pd, or an official .pth)")
    add_cache_arg(parser)
    parser.add_argument("--auto_resume", action="store_true",
                        help="without --resume, continue from the newest checkpoint in --output_dir (default)")
    parser.add_argument("--no_auto_resume", action="store_false", dest="auto_resume")
    parser.set_defaults(auto_resume=True)
    parser.add_argument("--skip_bad_images", action="store_true",
                        help="replace unreadable images by other samples (logged once, counted per epoch) "
                             "instead of stopping with the file's name")
    parser.add_argument("--on_nonfinite", default="stop", choices=["stop", "rewind"],
                        help="on a NaN/inf loss or weights: stop as the official (default), or go back to "
                             "checkpoint-last.pd and leave out the optimizer step that failed")
    parser.add_argument("--max_rewinds", default=3, type=non_negative_int, metavar="N",
                        help="with --on_nonfinite rewind: stop at the failure after N rewinds in a run (default 3)")
    parser.add_argument("--start_epoch", default=0, type=non_negative_int, metavar="N")
    parser.add_argument("--num_workers", default=min(10, cpu_threads()), type=non_negative_int,
                        help="loader worker processes (default: 10 as the official, at most this process's share "
                             "of the cores)")
    parser.add_argument("--pin_mem", action="store_true",
                        help="pass batches through shared memory (faster with workers)")
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)
    parser.add_argument("--save_freq", default=1, type=positive_int, help="save a checkpoint every N epochs")
    parser.add_argument("--print_freq", default=20, type=positive_int, help="log every N iterations")
    # the official scripts' distributed flags and --resplit: accepted, and ignored with a note (IGNORED)
    parser.add_argument("--world_size", default=1, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", default=-1, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dist_on_itp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dist_url", default="env://", help=argparse.SUPPRESS)
    parser.add_argument("--resplit", action="store_true", help=argparse.SUPPRESS)
    return parser


def add_classification_args(parser, global_pool):
    """Flags main_finetune and main_linprobe share: the starting checkpoint, pooling, classes, evaluation."""
    parser.add_argument("--finetune", default="", help="start from this checkpoint (.pd or official .pth)")
    parser.add_argument("--global_pool", action="store_true",
                        help="classify the mean of the patch tokens (through fc_norm)" + (" (default)" if global_pool
                                                                                          else ""))
    parser.set_defaults(global_pool=global_pool)
    parser.add_argument("--cls_token", action="store_false", dest="global_pool",
                        help="classify the class token" + ("" if global_pool else " (default)"))
    parser.add_argument("--nb_classes", default=1000, type=positive_int, help="number of classification types")
    parser.add_argument("--eval", action="store_true", help="perform evaluation only")
    parser.add_argument("--eval_freq", default=1, type=positive_int, metavar="N",
                        help="evaluate after every N-th epoch and after the last (default 1: every epoch)")
    parser.add_argument("--dist_eval", action="store_true", default=False,
                        help="split evaluation over the processes (recommended during training for speed)")


def resolve(parser, args, model_names):
    """Check flag combinations (and the testing aid MAE_INJECT_NONFINITE), fill the model's input size;
    parser.error (exit 2) on a bad combination."""
    from util.factory import default_img_size

    check_model_input(parser, args.model, args.input_size, model_names)
    if args.input_size is None:
        args.input_size = default_img_size(args.model)
    args.resume = checkpoint_file(parser, "--resume", args.resume, args.cache_dir)
    if hasattr(args, "finetune"):
        args.finetune = checkpoint_file(parser, "--finetune", args.finetune, args.cache_dir)
    for flag in IGNORED:
        if getattr(args, flag) != parser.get_default(flag):
            print(f"--{flag} is accepted for compatibility with the official scripts and ignored "
                  "(paddle.distributed.launch sets up the processes)")
    low, high = args.crop_scale
    if not 0.0 < low <= high <= 1.0:
        parser.error(f"argument --crop_scale: needs 0 < MIN <= MAX <= 1, got {low} {high}")
    if args.warmup_epochs > args.epochs:
        parser.error(f"--warmup_epochs {args.warmup_epochs} is larger than --epochs {args.epochs}")
    if args.start_epoch >= args.epochs and not getattr(args, "eval", False):
        parser.error(f"--start_epoch {args.start_epoch} leaves no epoch to train with --epochs {args.epochs}")
    if getattr(args, "eval", False) and not args.resume:
        parser.error("--eval needs --resume CHECKPOINT (the model to evaluate)")
    if args.on_nonfinite == "rewind" and not args.output_dir:
        parser.error("--on_nonfinite rewind goes back to checkpoint-last.pd: it needs an --output_dir")
    check_environment(parser)
    return args


def check_environment(parser):
    """The environment variables a run reads later (the testing aid MAE_INJECT_NONFINITE, the native build's
    MAE_NATIVE_TIMEOUT), checked now: parser.error (exit 2) names a bad one."""
    from util import native

    try:
        injection()
        native.timeout()
    except ValueError as e:
        parser.error(str(e))


class Flags(argparse.Namespace):
    """A script's flags after parsing and validation. Read-only: what a run was asked to do stays what its
    checkpoints record and what a requeued job is given again; what changes as it trains is
    util.run_state.RunState."""

    def __setattr__(self, name, value):
        raise AttributeError(f"the flags are read-only (--{name}); a run's changing state is util.run_state.RunState")

    def __delattr__(self, name):
        self.__setattr__(name, None)

    def replace(self, **changes):
        """A copy with `changes`."""
        flags = Flags.__new__(Flags)
        flags.__dict__.update({**vars(self), **changes})
        return flags


def freeze(args):
    """The validated flags as Flags."""
    return Flags.replace(args)


def for_this_process(args, world_size, rank, accum_iter=None):
    """The flags completed with what only the started process knows: rank and number of processes, the
    accumulation --accum_iter auto stands for (`accum_iter`), and the official learning rate rule, lr = blr *
    effective batch / 256 unless --lr is given. --dist_eval needs several processes (FlagError, exit 2)."""
    if getattr(args, "dist_eval", False) and world_size == 1:
        raise FlagError("--dist_eval splits evaluation over processes; launch with python -m "
                        "paddle.distributed.launch, or drop it in a single process")
    accum_iter = accum_iter or args.accum_iter
    lr = args.lr if args.lr is not None else args.blr * args.batch_size * accum_iter * world_size / 256
    return freeze(args).replace(distributed=world_size > 1, rank=rank, world_size=world_size, lr=lr,
                                accum_iter=accum_iter)
