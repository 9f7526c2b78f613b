"""Fine-tuning a pre-trained MAE encoder for classification (and --eval)."""
import util  # noqa: F401  (first: keeps Paddle's import-time ccache warning off the console)
import argparse

import models_vit
import util.misc as misc
from engine_finetune import fit
from layer import trunc_normal_
from util.adamw import AdamW
from util.amp import create_loss_scaler
from util.args import (add_classification_args, add_common_args, below_one, freeze, non_negative_float,
                       non_negative_int, positive_float, positive_int, probability, resolve)
from util.auto_augment import rand_augment_transform
from util.datasets import classification_loaders
from util.errors import FlagError, run
from util.losses import build_criterion
from util.lr_decay import param_groups_lrd
from util.mixup import Mixup
from util.transforms import eval_transform, finetune_transform
from util.weights import load_pretrained
from util.factory import prepare


def get_args_parser():
    parser = argparse.ArgumentParser("MAE fine-tuning for image classification", add_help=True)
    add_common_args(parser)
    parser.set_defaults(epochs=50, model="vit_large_patch16", blr=1e-3, min_lr=1e-6, warmup_epochs=5, save_freq=1)
    parser.add_argument("--drop_path", type=below_one, default=0.1, metavar="PCT",
                        help="drop path rate")
    parser.add_argument("--clip_grad", type=positive_float, default=None, metavar="NORM",
                        help="clip gradient norm (default: no clipping)")
    parser.add_argument("--layer_decay", type=non_negative_float, default=0.75,
                        help="layer-wise lr decay from ELECTRA/BEiT")
    parser.add_argument("--partial_blocks", type=non_negative_int, default=None, metavar="N",
                        help="partial fine-tuning (the paper's Fig. 9): train the last N blocks, the final norm "
                        "and the head, the rest frozen (default: every block)")
    parser.add_argument("--color_jitter", type=non_negative_float, default=None, metavar="PCT",
                        help="color jitter factor (enabled only when not using auto augment)")
    parser.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME",
                        help='RandAugment policy, e.g. "rand-m9-mstd0.5-inc1"; "none" turns it off')
    parser.add_argument("--smoothing", type=below_one, default=0.1, help="label smoothing")
    parser.add_argument("--reprob", type=probability, default=0.25, metavar="PCT",
                        help="random erase prob")
    parser.add_argument("--remode", type=str, default="pixel", choices=["pixel", "rand", "const"],
                        help="random erase mode")
    parser.add_argument("--recount", type=positive_int, default=1, help="random erase count")
    parser.add_argument("--mixup", type=non_negative_float, default=0, help="mixup alpha, mixup enabled if > 0")
    parser.add_argument("--cutmix", type=non_negative_float, default=0, help="cutmix alpha, cutmix enabled if > 0")
    parser.add_argument("--cutmix_minmax", type=float, nargs=2, default=None,
                        help="cutmix min/max ratio, overrides alpha and enables cutmix if set")
    parser.add_argument("--mixup_prob", type=probability, default=1.0,
                        help="probability of performing mixup or cutmix when either/both is enabled")
    parser.add_argument("--mixup_switch_prob", type=probability, default=0.5,
                        help="probability of switching to cutmix when both mixup and cutmix enabled")
    parser.add_argument("--mixup_mode", type=str, default="batch", choices=["batch", "pair", "elem"],
                        help='how to apply mixup/cutmix params: per "batch", "pair", or "elem"')
    add_classification_args(parser, global_pool=True)
    return parser


def parse_args(argv=None):
    parser = get_args_parser()
    args = resolve(parser, parser.parse_args(argv), models_vit.MODELS)
    if args.aa and args.aa.lower() == "none":
        args.aa = None
    if args.aa:
        try:
            rand_augment_transform(args.aa, {})
        except ValueError as e:
            parser.error(f"argument --aa: {e}")
    if args.cutmix_minmax is not None:
        low, high = args.cutmix_minmax
        if not 0.0 < low < high <= 1.0:
            parser.error(f"argument --cutmix_minmax: needs 0 < MIN < MAX <= 1, got {args.cutmix_minmax}")
        if int(args.input_size * low) >= int(args.input_size * high):
            parser.error(f"argument --cutmix_minmax: {low} {high} of {args.input_size} px leaves no box side to "
                         f"draw (from {int(args.input_size * low)} up to, not including, "
                         f"{int(args.input_size * high)} px)")
    if (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None) and args.batch_size % 2:
        parser.error(f"argument --batch_size: mixup/cutmix needs an even batch size, got {args.batch_size}")
    return freeze(args)


def tuned_layers(model, args):
    """The sublayers partial fine-tuning trains (None: all): the last --partial_blocks blocks, the norm the
    head reads and the head."""
    n = args.partial_blocks
    if n is None:
        return None
    if n > len(model.blocks):
        raise FlagError(f"--partial_blocks {n}: {args.model} has {len(model.blocks)} blocks")
    norm = model.fc_norm if model.global_pool else model.norm
    return [*model.blocks[len(model.blocks) - n:], norm, model.head]


def create_optimizer(model, args):
    """AdamW (default betas 0.9/0.999) on layer-wise lr decay groups; lr_scale rides in each group."""
    param_groups = param_groups_lrd(model, args.weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                    layer_decay=args.layer_decay)
    return AdamW(learning_rate=args.lr, parameters=param_groups)


def main(args):
    args = misc.start_run(args)

    train_tf = finetune_transform(args.input_size, args.aa, args.color_jitter, args.reprob, args.remode, args.recount,
                                  args.crop_scale)
    loaders = classification_loaders(args, train_tf, eval_transform(args.input_size, args.crop_pct))

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None:
        print("Mixup is activated!")
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)

    model = getattr(models_vit, args.model)(num_classes=args.nb_classes, drop_path_rate=args.drop_path,
                                            global_pool=args.global_pool, img_size=args.input_size)
    if args.finetune and not args.eval:
        print(f"Load pre-trained checkpoint from: {args.finetune}")
        print(f"Initialised (not in the checkpoint): {load_pretrained(model, args.finetune)}")
        trunc_normal_(model.head.weight, std=2e-5)
    model, model_without_ddp = prepare(model, args.recompute, args.distributed, trained=tuned_layers(model, args))
    misc.print_model(model_without_ddp, args)

    optimizer = create_optimizer(model_without_ddp, args)
    loss_scaler = create_loss_scaler(args)
    criterion = build_criterion(mixup_fn, args.smoothing)
    print(f"criterion = {criterion}")
    fit(args, model, model_without_ddp, optimizer, loss_scaler, criterion, loaders, mixup_fn, args.clip_grad,
        train_tf.erasing)


if __name__ == "__main__":
    run(lambda: main(parse_args()))
