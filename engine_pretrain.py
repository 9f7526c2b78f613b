"""One epoch of MAE pre-training."""
import math

import paddle

import util.lr_sched as lr_sched
import util.misc as misc


def train_one_epoch(model, data_loader, optimizer, epoch, loss_scaler, log_writer=None, args=None, start_iter=0):
    """One pass over data_loader (from batch start_iter when resuming inside the epoch)."""
    model.train()
    metric_logger = misc.MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", misc.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    accum_iter = args.accum_iter
    optimizer.clear_grad()
    if log_writer is not None:
        print(f"log_dir: {args.log_dir}")

    batches = metric_logger.log_every(data_loader, args.print_freq, header, start=start_iter)
    for data_iter_step, (samples, _) in enumerate(batches, start=start_iter):
        if data_iter_step % accum_iter == 0:  # per-iteration (not per-epoch) lr schedule
            lr_sched.adjust_learning_rate(optimizer, data_iter_step / len(data_loader) + epoch, args)

        with misc.autocast(args):
            loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise misc.NonFiniteLossError(f"Loss is {loss_value} at epoch {epoch}, iteration {data_iter_step}, "
                                     "stopping training")

        loss = loss / accum_iter
        update = (data_iter_step + 1) % accum_iter == 0
        loss_scaler(loss, optimizer, parameters=model.parameters(), update_grad=update)
        if update:
            optimizer.clear_grad()

        metric_logger.update(loss=loss_value)
        lr = optimizer.get_lr()
        metric_logger.update(lr=lr)
        loss_value_reduce = misc.all_reduce_mean(loss_value)
        if log_writer is not None and update:
            # x axis in 1000ths of an epoch, so that runs with different batch sizes line up
            epoch_1000x = int((data_iter_step / len(data_loader) + epoch) * 1000)
            log_writer.add_scalar(tag="train_loss", value=loss_value_reduce, step=epoch_1000x)
            log_writer.add_scalar(tag="lr", value=lr, step=epoch_1000x)
        if update and misc.STOP.requested():
            misc.STOP.iteration = data_iter_step + 1
            break

    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    misc.report_faults(data_loader, loss_scaler, epoch)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}
