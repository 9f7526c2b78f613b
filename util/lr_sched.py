"""Per-iteration learning rate: linear warmup, then half-cycle cosine down to min_lr."""
import math

from util import compat


def lr_at(epoch, args):
    """Learning rate at a fractional epoch."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer, epoch, args):
    """Set the optimizer's lr for this iteration; each group runs at lr x its lr_scale.

    Groups carry lr_scale as Paddle's per-group 'learning_rate' multiplier (see util.lr_decay), so
    setting the base lr here applies layer-wise decay on every iteration, as the official code does.
    """
    lr = lr_at(epoch, args)
    optimizer.set_lr(lr)
    return lr


def group_lrs(optimizer):
    """The lr each parameter group runs at: base lr x lr_scale."""
    return [optimizer.get_lr() * scale for _, scale in compat.param_groups(optimizer)]
