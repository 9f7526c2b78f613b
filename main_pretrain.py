"""MAE pre-training: single process, or many with `python -m paddle.distributed.launch`."""
import util  # noqa: F401  (first: keeps Paddle's import-time ccache warning off the console)
import argparse
import os

import paddle

import models_mae
import util.misc as misc
from engine_pretrain import train_one_epoch
from util.adamw import AdamW
from util.amp import create_loss_scaler
from util.args import add_common_args, freeze, non_negative_int, positive_float, positive_int, ratio, resolve
from util.datasets import ImageFolder, train_loader
from util.errors import run
from util.epochs import train_epochs
from util.factory import create_model, prepare
from util.features import knn_monitor
from util.lr_decay import param_groups_weight_decay
from util.transforms import pretrain_transform


def get_args_parser():
    parser = argparse.ArgumentParser("MAE pre-training", add_help=True)
    add_common_args(parser)
    parser.add_argument("--mask_ratio", default=0.75, type=ratio, help="fraction of patches removed")
    parser.add_argument("--norm_pix_loss", action="store_true",
                        help="use (per-patch) normalized pixels as targets for computing loss")
    parser.add_argument("--knn_freq", default=0, type=non_negative_int, metavar="N",
                        help="every N epochs and at the last, the k-NN top-1 of val/ against train/ features "
                        "(0: off)")
    parser.add_argument("--knn_k", default=20, type=positive_int, help="neighbours of the k-NN monitor")
    parser.add_argument("--knn_t", default=0.07, type=positive_float, help="temperature of its vote weights")
    parser.add_argument("--knn_train_per_class", default=None, type=non_negative_int, metavar="K",
                        help="k-NN monitor: K training images per class (default 50, or a smaller class whole; "
                             "0: all)")
    parser.set_defaults(norm_pix_loss=False, save_freq=20, crop_scale=(0.2, 1.0))
    return parser


def create_optimizer(model, args):
    """AdamW(betas 0.9/0.95, eps 1e-8) on timm's weight-decay groups: [no decay (1-D, biases), decay]."""
    param_groups = param_groups_weight_decay(model, args.weight_decay)
    optimizer = AdamW(learning_rate=args.lr, parameters=param_groups, beta1=0.9, beta2=0.95, epsilon=1e-8)
    print("AdamW(betas=(0.9, 0.95), eps=1e-8): " + ", ".join(
        f"{len(g['params'])} params with weight_decay {g['weight_decay']}" for g in param_groups))
    return optimizer


def parse_args(argv=None):
    parser = get_args_parser()
    args = resolve(parser, parser.parse_args(argv), models_mae.MODELS)
    with paddle.LazyGuard():
        patches = create_model(args.model, img_size=args.input_size).patch_embed.num_patches
    if int(patches * (1 - args.mask_ratio)) < 1:
        parser.error(f"argument --mask_ratio: {args.mask_ratio} of {patches} patches leaves no visible patch")
    return freeze(args)


def main(args):
    args = misc.start_run(args)

    model, model_without_ddp = prepare(
        getattr(models_mae, args.model)(norm_pix_loss=args.norm_pix_loss, img_size=args.input_size),
        args.recompute, args.distributed)
    transform = pretrain_transform(args.input_size, args.crop_scale, model_without_ddp.patch_embed.num_patches)
    dataset_train = ImageFolder(os.path.join(args.data_path, "train"), transform=transform)
    print(f"Dataset: {len(dataset_train)} images in {dataset_train.root}")
    data_loader_train = train_loader(dataset_train, args)
    misc.print_model(model_without_ddp, args)

    optimizer = create_optimizer(model_without_ddp, args)
    loss_scaler = create_loss_scaler(args)
    monitor = knn_monitor(model_without_ddp, args) if args.knn_freq else None

    def train_epoch(epoch, start_iter, left_out, log_writer, metric_logger):
        return train_one_epoch(model, data_loader_train, optimizer, epoch, loss_scaler, log_writer=log_writer,
                               args=args, start_iter=start_iter, left_out=left_out, metric_logger=metric_logger)

    train_epochs(args, model_without_ddp, optimizer, loss_scaler, data_loader_train, train_epoch, monitor=monitor)


if __name__ == "__main__":
    run(lambda: main(parse_args()))
