"""MAE pre-training: single process, or many with `python -m paddle.distributed.launch`."""
import argparse
import datetime
import os
import time

import models_mae
import util.misc as misc
from engine_pretrain import train_one_epoch
from util.adamw import AdamW
from util.args import add_common_args, ratio, resolve
from util.datasets import ImageFolder, train_loader
from util.dist import get_rank
from util.lr_decay import param_groups_weight_decay
from util.transforms import pretrain_transform


def get_args_parser():
    parser = argparse.ArgumentParser("MAE pre-training", add_help=True)
    add_common_args(parser)
    parser.add_argument("--mask_ratio", default=0.75, type=ratio, help="fraction of patches removed")
    parser.add_argument("--norm_pix_loss", action="store_true",
                        help="use (per-patch) normalized pixels as targets for computing loss")
    parser.set_defaults(norm_pix_loss=False, save_freq=20)
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
    return resolve(parser, parser.parse_args(argv), models_mae.MODELS)


def main(args):
    misc.start_run(args)

    dataset_train = ImageFolder(os.path.join(args.data_path, "train"), transform=pretrain_transform(args.input_size))
    print(f"Dataset: {len(dataset_train)} images in {dataset_train.root}")
    data_loader_train = train_loader(dataset_train, args)

    log_writer = misc.create_log_writer(args)

    model = getattr(models_mae, args.model)(norm_pix_loss=args.norm_pix_loss, img_size=args.input_size)
    misc.set_recompute(model, args.recompute)
    model_without_ddp = model
    model = misc.wrap_model(args, model)

    optimizer = create_optimizer(model_without_ddp, args)
    loss_scaler = misc.create_loss_scaler(args)
    misc.load_model(args, model_without_ddp, optimizer, loss_scaler)

    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        misc.seed_everything(args.seed + get_rank(), epoch)
        data_loader_train.batch_sampler.set_epoch(epoch)  # also in a single process (the official forgot)
        start_iter = args.start_iter if epoch == args.start_epoch else 0
        data_loader_train.skip_batches(start_iter)
        train_stats = train_one_epoch(model, data_loader_train, optimizer, epoch, loss_scaler,
                                      log_writer=log_writer, args=args, start_iter=start_iter)
        if misc.stopped(args, epoch, model_without_ddp, optimizer, loss_scaler):
            return
        misc.save_epoch(args, epoch, model_without_ddp, optimizer, loss_scaler)
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch}
        misc.log_stats(args, log_stats)
        if log_writer is not None:
            log_writer.flush()
        if misc.stop_after_epoch(epoch):
            return

    total_time = time.time() - start_time
    print(f"Training time {datetime.timedelta(seconds=int(total_time))}")


if __name__ == "__main__":
    args = parse_args()
    misc.run(main, args)
