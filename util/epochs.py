"""The epoch loop of pre-training, fine-tuning and linear probing: resume, the epoch's batch order, stop on a
signal, evaluation, checkpoints and logs are written once here; the engines supply one epoch of training."""
import datetime
import time

import paddle
import paddle.distributed as dist

from util import misc, nonfinite, run_state
from util.dist import all_gather, broadcast_buffers, get_rank, get_world_size
from util.errors import NonFiniteError
from util.preempt import STOP


def train_epochs(flags, model_without_ddp, optimizer, loss_scaler, data_loader, train_one_epoch, evaluate=None,
                 monitor=None, classes=None):
    """Resume from --output_dir (or --resume), then for each remaining epoch: train_one_epoch(epoch, start_iter,
    left_out, log_writer, metric_logger) -> (its meters, the iteration a stop signal broke it off after or None);
    evaluate() -> test stats (keeping checkpoint-best.pd at the best top-1 of the whole run); monitor(epoch) -> more
    numbers for the log line (e.g. knn_acc1); save checkpoint-last.pd (and checkpoint-N.pd every --save_freq; they
    record the training set's size and a classifier's `classes`); append a log.txt line. A run stopped inside an
    epoch continues from the batch, the meters and the random draws where it stopped, so that it ends as the
    uninterrupted run would have. A non-finite loss or weights stop the run, or with --on_nonfinite rewind send it
    back to checkpoint-last.pd without the failed step (util.nonfinite). The run's state (util.run_state.RunState)
    lives here, from the checkpoint it resumes to the last it saves."""
    parts = (model_without_ddp, optimizer, loss_scaler)
    record = {"samples": len(data_loader.dataset), **({"classes": list(classes)} if classes is not None else {})}
    state = run_state.resume(flags, *parts, iterations=len(data_loader), samples=record["samples"], classes=classes,
                             classes_from=None if classes is None else data_loader.dataset.root)
    if state.epoch >= flags.epochs:
        print(f"nothing to do: {flags.epochs} of {flags.epochs} epochs done in {flags.output_dir}")
        return
    if flags.on_nonfinite == "rewind":
        run_state.save_rewind_point(flags, *parts, state, record)
    log_writer = misc.create_log_writer(flags)
    n_parameters = sum(p.numel().item() for p in model_without_ddp.parameters() if not p.stop_gradient)
    print(f"Start training for {flags.epochs} epochs")
    start_time = time.time()
    while True:
        try:
            done = run_epochs(flags, parts, state, record, data_loader, train_one_epoch, evaluate, monitor,
                              log_writer, n_parameters)
            break
        except NonFiniteError as e:
            state = rewind(flags, e, state, parts)
    if done:
        print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")


def run_epochs(flags, parts, state, record, data_loader, train_one_epoch, evaluate, monitor, log_writer,
               n_parameters):
    """The epochs from state.epoch (see train_epochs), advancing `state`; False when a stop signal ended the
    run early."""
    model_without_ddp = parts[0]
    for epoch in range(state.epoch, flags.epochs):
        data_loader.batch_sampler.set_epoch(epoch)  # also in a single process (the official only when distributed)
        start_iter = state.iteration
        data_loader.skip_batches(start_iter)
        metric_logger = None
        if start_iter and state.meters:
            metric_logger, _ = epoch_meters(epoch)
            metric_logger.load_state(state.meters[get_rank()])
        metric_logger, stopped_at = train_one_epoch(epoch, start_iter, state.left_out(epoch), log_writer,
                                                    metric_logger)
        broadcast_buffers(model_without_ddp)
        steps = stopped_at if stopped_at is not None else len(data_loader)
        nonfinite.check_weights(model_without_ddp, epoch, steps // flags.accum_iter * flags.accum_iter - 1)
        if stopped_at is not None:
            data_loader.end_pass()
            state.iteration, state.meters = stopped_at, all_gather(metric_logger.state())
            run_state.save(flags, "last", *parts, state, record)
            where = run_state.checkpoint_path(flags, "last") if flags.output_dir else "nowhere (no --output_dir)"
            print(f"Stopped in epoch {epoch} after iteration {stopped_at}; saved {where}. "
                  "Run the same command again to continue from there.")
            return False
        train_stats = end_epoch(metric_logger, data_loader, parts[2], epoch)
        state.epoch, state.iteration, state.meters = epoch + 1, 0, None
        stats = {f"train_{k}": v for k, v in train_stats.items()}
        improved = False
        if evaluate is not None and ((epoch + 1) % flags.eval_freq == 0 or epoch + 1 == flags.epochs):
            test_stats = evaluate()
            improved = test_stats["acc1"] > state.best["acc1"]
            if improved:
                state.best = {"acc1": test_stats["acc1"], "epoch": epoch}
            print(f"Max accuracy: {state.best['acc1']:.2f}% (epoch {state.best['epoch']})")
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
        left_out = [[first, last] for e, first, last in state.skipped if e == epoch]
        if left_out:
            stats["skipped_iterations"] = left_out
        misc.log_stats(flags, stats)  # before the checkpoints: a kill in between reruns the epoch and its log line
        if improved:
            run_state.save(flags, "best", *parts, state, record)
        run_state.save_epoch(flags, epoch, *parts, state, record)
        if log_writer is not None:
            log_writer.flush()
        if STOP.requested():
            print(f"Stopped after epoch {epoch}. Run the same command again to continue.")
            return False
    return True


def rewind(flags, error, state, parts):
    """With --on_nonfinite rewind and rewinds left: every rank loads checkpoint-last.pd and will leave out the
    optimizer step that failed (util.nonfinite.failed_step); the state to continue from. Otherwise raise the
    error."""
    if flags.on_nonfinite != "rewind" or len(state.skipped) >= flags.max_rewinds:
        if state.skipped:
            raise NonFiniteError(error.what, error.epoch, error.iteration, error.loss,
                                 after=f" after {len(state.skipped)} rewind(s) (--max_rewinds {flags.max_rewinds})")
        raise error
    skipped = [*state.skipped, nonfinite.failed_step(error, parts[0], flags.accum_iter)]
    last = run_state.checkpoint_path(flags, "last")
    print(f"{error.what} at epoch {error.epoch}, iteration {error.iteration}: rewinding to {last} "
          f"(rewind {len(skipped)} of --max_rewinds {flags.max_rewinds})")
    state = run_state.resume(flags, *parts, path=last)
    state.skipped = skipped
    epoch, first, last = skipped[-1]
    print(f"Continuing at epoch {state.epoch}, iteration {state.iteration}, without iteration(s) {first}-{last} "
          f"of epoch {epoch}")
    return state


def epoch_meters(epoch, metric_logger=None):
    """The meters of a training epoch (lr first, as the official log keys; new unless resumed) and its log
    header."""
    if metric_logger is None:
        metric_logger = misc.MetricLogger(delimiter="  ")
        metric_logger.add_meter("lr", misc.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    return metric_logger, f"Epoch: [{epoch}]"


def read_step(loss, update, every_step=False, found_inf=None):
    """(the step's loss as a number, whether any rank asked to stop, whether the float16 loss scaler found
    non-finite gradients): the one read a step makes from the device, which the official non-finite check
    needs every step; the scaler's flag (`found_inf`, a device tensor after the backward pass) travels in it.
    With several processes, update steps first sum [loss, stop flag, found_inf] over the ranks on the device
    (one collective, one read): the loss is then the mean over ranks, so that every rank sees a non-finite
    loss of any rank; other micro-steps communicate nothing unless every_step (--on_nonfinite rewind, where
    all ranks must fail at the same iteration)."""
    collective = get_world_size() > 1 and (update or every_step)
    if not collective and found_inf is None:
        return loss.item(), update and STOP.local_flag() > 0, False
    parts = [loss.detach().astype("float32").reshape([]),
             paddle.full([], STOP.local_flag() if update else 0, "float32")]
    if found_inf is not None:
        parts.append(found_inf.astype("float32").reshape([]))
    values = paddle.stack(parts)
    if collective:
        dist.all_reduce(values)
    values = values.tolist()
    return values[0] / (get_world_size() if collective else 1), values[1] > 0, len(values) > 2 and values[2] > 0


def log_step(metric_logger, log_writer, loss_value, lr, step, steps, epoch, update, stop, loss_tag="loss"):
    """Meters and VisualDL scalars of one iteration (numbers already on the host); True when a stop signal
    (read_step) ends the epoch after this iteration."""
    metric_logger.update(loss=loss_value)
    metric_logger.update(lr=lr)
    if not update:
        return False
    if log_writer is not None:
        # x axis in 1000ths of an epoch, so that runs with different batch sizes line up
        epoch_1000x = int((step / steps + epoch) * 1000)
        log_writer.add_scalar(tag=loss_tag, value=loss_value, step=epoch_1000x)
        log_writer.add_scalar(tag="lr", value=lr, step=epoch_1000x)
    return stop and step + 1 < steps  # at the last step the epoch simply ends


def end_epoch(metric_logger, data_loader, loss_scaler, epoch):
    """Average the meters over ranks, print them and the fault counts; the epoch's stats."""
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    if getattr(data_loader, "skipped", 0):
        print(f"Skipped {data_loader.skipped} unreadable image(s) in epoch {epoch}")
    if loss_scaler.skipped_steps:
        print(f"AMP: {loss_scaler.skipped_steps} step(s) skipped for non-finite gradients so far (scale lowered)")
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}
