"""Linear probing of a pre-trained MAE encoder: BatchNorm (no affine) + Linear head trained with LARS."""
import util  # noqa: F401  (first: keeps Paddle's import-time ccache warning off the console)
import argparse


import models_vit
import util.misc as misc
from engine_finetune import fit
from layer import trunc_normal_
from util.amp import create_loss_scaler
from util.args import add_classification_args, add_common_args, freeze, resolve
from util.datasets import classification_loaders
from util.errors import run
from util.lars import LARS
from util.losses import CrossEntropyLoss
from util.transforms import eval_transform, linprobe_transform
from util.weights import load_pretrained
from util.factory import prepare


def get_args_parser():
    parser = argparse.ArgumentParser("MAE linear probing for image classification", add_help=True)
    add_common_args(parser)
    parser.set_defaults(batch_size=512, epochs=90, model="vit_large_patch16", weight_decay=0.0, blr=0.1,
                        min_lr=0.0, warmup_epochs=10, save_freq=1)
    add_classification_args(parser, global_pool=False)
    return parser


def parse_args(argv=None):
    parser = get_args_parser()
    args = resolve(parser, parser.parse_args(argv), models_vit.MODELS)
    if args.batch_size < 2:
        parser.error("argument --batch_size: the BatchNorm head needs at least 2 samples per batch")
    if args.recompute:
        parser.error("argument --recompute: linear probing keeps no encoder activations for the backward pass "
                     "(the encoder is frozen), so there is nothing to recompute")
    return freeze(args)


def build_model(args):
    """ViT whose head is BatchNorm1D(affine off, eps 1e-6) + Linear (the only trained layer: prepare's
    `trained`)."""
    model = getattr(models_vit, args.model)(num_classes=args.nb_classes, global_pool=args.global_pool,
                                            img_size=args.input_size)
    if args.finetune and not args.eval:
        print(f"Load pre-trained checkpoint from: {args.finetune}")
        print(f"Initialised (not in the checkpoint): {load_pretrained(model, args.finetune, fc_norm_from_norm=True)}")
        trunc_normal_(model.head.weight, std=0.01)  # MoCo v3
    models_vit.add_bn_head(model)
    return model


def main(args):
    args = misc.start_run(args)

    loaders = classification_loaders(args, linprobe_transform(args.input_size, args.crop_scale),
                                     eval_transform(args.input_size, args.crop_pct))

    model = build_model(args)
    model, model_without_ddp = prepare(model, distributed=args.distributed, trained=[model.head])
    misc.print_model(model_without_ddp, args)

    optimizer = LARS(model_without_ddp.head.parameters(), learning_rate=args.lr, weight_decay=args.weight_decay)
    print(optimizer)
    loss_scaler = create_loss_scaler(args)
    fit(args, model, model_without_ddp, optimizer, loss_scaler, CrossEntropyLoss(), loaders)


if __name__ == "__main__":
    run(lambda: main(parse_args()))
