"""One epoch of MAE pre-training."""
import util.lr_sched as lr_sched
import util.misc as misc
from util import nonfinite
from util.amp import autocast
from util.dist import get_rank, grad_sync
from util.epochs import epoch_meters, log_step, read_step


def train_one_epoch(model, data_loader, optimizer, epoch, loss_scaler, log_writer=None, args=None, start_iter=0,
                    left_out=(), metric_logger=None):
    """One pass over data_loader (from batch start_iter when resuming inside the epoch, continuing its
    meters; passing over the iterations in left_out, which rewinds left out); returns (the meters, for
    util.epochs.end_epoch; the iteration a stop signal ended the epoch after, or None). Each sample's mask
    comes with it from the loader (util.transforms.MaskNoise: drawn from seed, epoch and sample), so that a
    resumed run, or one that splits the batch otherwise, masks what the uninterrupted one did; batches
    without it draw the mask from (seed, rank, epoch, step)."""
    model.train()
    metric_logger, header = epoch_meters(epoch, metric_logger)
    optimizer.clear_grad()
    accum_iter = args.accum_iter

    batches = metric_logger.log_every(data_loader, args.print_freq, header, start=start_iter)
    for data_iter_step, (samples, *noise, _) in enumerate(batches, start=start_iter):
        if data_iter_step in left_out:  # left out by a rewind (--on_nonfinite rewind)
            continue
        misc.seed_everything(args.seed + get_rank(), epoch, data_iter_step)
        if data_iter_step % accum_iter == 0:  # per-iteration (not per-epoch) lr schedule
            lr_sched.adjust_learning_rate(optimizer, data_iter_step / len(data_loader) + epoch, args)

        update = (data_iter_step + 1) % accum_iter == 0
        with grad_sync(model, update):
            with autocast(args):
                loss, _, _ = model(samples, mask_ratio=args.mask_ratio, noise=noise[0] if noise else None)
            found_inf = loss_scaler.backward(loss / accum_iter, optimizer, parameters=model.parameters(),
                                             update_grad=update)
            loss_value, stop, skip = read_step(nonfinite.through_hooks(loss, epoch, data_iter_step), update,
                                               every_step=args.on_nonfinite == "rewind", found_inf=found_inf)
            nonfinite.check_loss(loss_value, epoch, data_iter_step)
            if update:
                loss_scaler.step(optimizer, skip)
        if update:
            optimizer.clear_grad()

        if log_step(metric_logger, log_writer, loss_value, optimizer.get_lr(), data_iter_step, len(data_loader),
                    epoch, update, stop, loss_tag="train_loss"):
            return metric_logger, data_iter_step + 1
    return metric_logger, None
