"""The epoch loop of pre-training, fine-tuning and linear probing: resume, the epoch's batch order, stop on a
signal, evaluation, checkpoints and logs are written once here; the engines supply one epoch of training."""
import datetime
import os
import time

import paddle
import paddle.distributed as dist

from util import misc, nonfinite, run_state
from util.dist import all_gather, broadcast_buffers, get_rank, get_world_size
from util.nonfinite import NonFiniteError
from util.preempt import STOP


def train_epochs(args, model_without_ddp, optimizer, loss_scaler, data_loader, train_one_epoch, evaluate=None,
                 monitor=None):
    """Resume from --output_dir (or --resume), then for each remaining epoch: train_one_epoch(epoch, start_iter,
    log_writer, metric_logger) -> its meters; evaluate() -> test stats (keeping checkpoint-best.pd at the best
    top-1 of the whole run); monitor(epoch) -> more numbers for the log line (e.g. knn_acc1); save
    checkpoint-last.pd (and checkpoint-N.pd every --save_freq); append a log.txt line. A run stopped inside an
    epoch continues from the batch, the meters and the random draws where it stopped, so that it ends as the
    uninterrupted run would have. A non-finite loss or weights stop the run, or with --on_nonfinite rewind
    send it back to checkpoint-last.pd without the failed step (util.nonfinite)."""
    resumed = run_state.load_model(args, model_without_ddp, optimizer, loss_scaler, len(data_loader))
    if args.start_epoch >= args.epochs:
        print(f"nothing to do: {args.epochs} of {args.epochs} epochs done in {args.output_dir}")
        return
    if args.on_nonfinite == "rewind":
        run_state.save_rewind_point(args, model_without_ddp, optimizer, loss_scaler, resumed)
    log_writer = misc.create_log_writer(args)
    n_parameters = sum(p.numel().item() for p in model_without_ddp.parameters() if not p.stop_gradient)
    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    while True:
        try:
            done = run_epochs(args, model_without_ddp, optimizer, loss_scaler, data_loader, train_one_epoch,
                              evaluate, monitor, resumed, log_writer, n_parameters)
            break
        except NonFiniteError as e:
            resumed = rewind(args, e, model_without_ddp, optimizer, loss_scaler)
    if done:
        print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")


def run_epochs(args, model_without_ddp, optimizer, loss_scaler, data_loader, train_one_epoch, evaluate, monitor,
               resumed, log_writer, n_parameters):
    """The epochs from args.start_epoch (see train_epochs); False when a stop signal ended the run early."""
    best = resumed["best"]
    for epoch in range(args.start_epoch, args.epochs):
        data_loader.batch_sampler.set_epoch(epoch)  # also in a single process (the official only when distributed)
        start_iter = args.start_iter if epoch == args.start_epoch else 0
        data_loader.skip_batches(start_iter)
        metric_logger = None
        if start_iter and resumed["meters"]:
            metric_logger, _ = epoch_meters(epoch)
            metric_logger.load_state(resumed["meters"][get_rank()])
        metric_logger = train_one_epoch(epoch, start_iter, log_writer, metric_logger)
        broadcast_buffers(model_without_ddp)
        steps = STOP.iteration if STOP.iteration is not None else len(data_loader)
        nonfinite.check_weights(model_without_ddp, epoch, steps // args.accum_iter * args.accum_iter - 1)
        if STOP.iteration is not None:
            save_stop_position(args, epoch, model_without_ddp, optimizer, loss_scaler, best, metric_logger)
            return False
        train_stats = end_epoch(metric_logger, data_loader, loss_scaler, epoch)
        stats = {f"train_{k}": v for k, v in train_stats.items()}
        improved = False
        if evaluate is not None and ((epoch + 1) % args.eval_freq == 0 or epoch + 1 == args.epochs):
            test_stats = evaluate()
            improved = test_stats["acc1"] > best["acc1"]
            if improved:
                best = {"acc1": test_stats["acc1"], "epoch": epoch}
            print(f"Max accuracy: {best['acc1']:.2f}% (epoch {best['epoch']})")
            if log_writer is not None:
                for k in ("acc1", "acc5", "loss"):
                    log_writer.add_scalar(f"perf/test_{k}", test_stats[k], epoch)
            stats.update({f"test_{k}": v for k, v in test_stats.items()})
        if monitor is not None:
            for k, v in monitor(epoch).items():  # e.g. the k-NN top-1 of pre-training
                stats[k] = v
                if log_writer is not None:
                    log_writer.add_scalar(k, v, epoch)
        stats["epoch"] = epoch
        if evaluate is not None:
            stats["n_parameters"] = n_parameters
        left_out = [[first, last] for e, first, last in args.skipped if e == epoch]
        if left_out:
            stats["skipped_iterations"] = left_out
        misc.log_stats(args, stats)  # before the checkpoints: a kill in between reruns the epoch and its log line
        if improved:
            run_state.save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, best, tag="best")
        run_state.save_epoch(args, epoch, model_without_ddp, optimizer, loss_scaler, best)
        if log_writer is not None:
            log_writer.flush()
        if STOP.requested():
            print(f"Stopped after epoch {epoch}. Run the same command again to continue.")
            return False
    return True


def rewind(args, error, model_without_ddp, optimizer, loss_scaler):
    """With --on_nonfinite rewind and rewinds left: every rank loads checkpoint-last.pd and will leave out the
    optimizer step that failed (util.nonfinite.failed_step); the resumed state. Otherwise raise the error."""
    if args.on_nonfinite != "rewind" or len(args.skipped) >= args.max_rewinds:
        if args.skipped:
            raise NonFiniteError(error.what, error.epoch, error.iteration, error.loss,
                                 after=f" after {len(args.skipped)} rewind(s) (--max_rewinds {args.max_rewinds})")
        raise error
    skipped = [*args.skipped, nonfinite.failed_step(error, model_without_ddp, args.accum_iter)]
    args.resume = os.path.join(args.output_dir, "checkpoint-last.pd")
    print(f"{error.what} at epoch {error.epoch}, iteration {error.iteration}: rewinding to {args.resume} "
          f"(rewind {len(skipped)} of --max_rewinds {args.max_rewinds})")
    resumed = run_state.load_model(args, model_without_ddp, optimizer, loss_scaler)
    args.skipped = skipped
    epoch, first, last = skipped[-1]
    print(f"Continuing at epoch {args.start_epoch}, iteration {args.start_iter}, without iteration(s) {first}-{last} "
          f"of epoch {epoch}")
    return resumed


def save_stop_position(args, epoch, model_without_ddp, optimizer, loss_scaler, best, metric_logger):
    """A signal broke the epoch off: save checkpoint-last.pd with the position inside it and every rank's
    meters of the epoch so far, and say so."""
    meters = all_gather(metric_logger.state())
    run_state.save_model(args, epoch - 1, model_without_ddp, optimizer, loss_scaler, best, tag="last",
                         iteration=STOP.iteration, meters=meters)
    where = os.path.join(args.output_dir, "checkpoint-last.pd") if args.output_dir else "nowhere (no --output_dir)"
    print(f"Stopped in epoch {epoch} after iteration {STOP.iteration}; saved {where}. "
          "Run the same command again to continue from there.")


def epoch_meters(epoch, metric_logger=None):
    """The meters of a training epoch (lr first, as the official log keys; new unless resumed) and its log
    header."""
    if metric_logger is None:
        metric_logger = misc.MetricLogger(delimiter="  ")
        metric_logger.add_meter("lr", misc.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    return metric_logger, f"Epoch: [{epoch}]"


def read_step(loss, update, every_step=False):
    """(the step's loss as a number, whether any rank asked to stop): the one value a step reads from the
    device, which the official non-finite check needs every step. With several processes, update steps
    first sum [loss, stop flag] over the ranks on the device (one collective, one read): the loss is then
    the mean over ranks, so that every rank sees a non-finite loss of any rank; other micro-steps
    communicate nothing unless every_step (--on_nonfinite rewind, where all ranks must fail at the same
    iteration)."""
    if get_world_size() == 1 or not (update or every_step):
        return loss.item(), update and STOP.local_flag() > 0
    both = paddle.stack([loss.detach().astype("float32").reshape([]),
                         paddle.full([], STOP.local_flag() if update else 0, "float32")])
    dist.all_reduce(both)
    loss_sum, stop = both.tolist()
    return loss_sum / get_world_size(), stop > 0


def log_step(metric_logger, log_writer, loss_value, lr, step, steps, epoch, update, stop, loss_tag="loss"):
    """Meters and VisualDL scalars of one iteration (numbers already on the host); True when a stop signal
    (read_step) ends the epoch here."""
    metric_logger.update(loss=loss_value)
    metric_logger.update(lr=lr)
    if not update:
        return False
    if log_writer is not None:
        # x axis in 1000ths of an epoch, so that runs with different batch sizes line up
        epoch_1000x = int((step / steps + epoch) * 1000)
        log_writer.add_scalar(tag=loss_tag, value=loss_value, step=epoch_1000x)
        log_writer.add_scalar(tag="lr", value=lr, step=epoch_1000x)
    if stop and step + 1 < steps:  # at the last step the epoch simply ends
        STOP.iteration = step + 1
        return True
    return False


def end_epoch(metric_logger, data_loader, loss_scaler, epoch):
    """Average the meters over ranks, print them and the fault counts; the epoch's stats."""
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    if getattr(data_loader, "skipped", 0):
        print(f"Skipped {data_loader.skipped} unreadable image(s) in epoch {epoch}")
    if loss_scaler.skipped_steps:
        print(f"AMP: {loss_scaler.skipped_steps} step(s) skipped for non-finite gradients so far (scale lowered)")
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}
