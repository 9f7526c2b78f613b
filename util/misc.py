"""Distributed setup, logging meters, the AMP loss scaler and training checkpoints."""
import datetime
import json
import math
import os
import random
import resource
import signal
import sys
import threading
import time
from collections import defaultdict, deque

import numpy as np
import paddle

from util import checkpoint
from util.cpu import configure_cpu
from util.dist import all_gather, all_reduce_sum, from_main_process, get_rank, get_world_size, init_distributed_mode, is_main_process
from util.datasets import DataError


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


def run(main, args):
    """Run a script's main; data, checkpoint and numeric faults end with a one-line error and exit 1."""
    try:
        main(args)
    except (DataError, checkpoint.CheckpointError, NonFiniteLossError) as e:
        sys.exit(f"error: {e}")


class SmoothedValue:
    """Track a series of values; smoothed over a window, or the global average."""

    def __init__(self, window_size=20, fmt=None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        """Sum count and total over ranks (the deque stays local)."""
        count, self.total = all_reduce_sum([self.count, self.total])
        self.count = int(count)

    @property
    def median(self):
        return float(np.median(list(self.deque)))

    @property
    def avg(self):
        return float(np.mean(list(self.deque)))

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def max(self):
        return max(self.deque)

    @property
    def value(self):
        return self.deque[-1]

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


def max_memory_mb():
    if paddle.is_compiled_with_cuda() and "gpu" in paddle.get_device():
        return paddle.device.cuda.max_memory_allocated() / 1024.0 ** 2
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # peak RSS, kB on Linux


class MetricLogger:
    def __init__(self, delimiter="  "):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for k, v in kwargs.items():
            if v is None:
                continue
            if isinstance(v, paddle.Tensor):
                v = v.item()
            self.meters[k].update(float(v))

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def __getattr__(self, attr):
        if attr in self.__dict__.get("meters", {}):
            return self.meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable, print_freq, header="", start=0):
        """Yield from iterable, printing every print_freq iterations (counted from start, when resuming)."""
        i = start
        start_time = end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        n = len(iterable)
        space_fmt = ":" + str(len(str(n))) + "d"
        log_msg = self.delimiter.join([header, "[{0" + space_fmt + "}/{1}]", "eta: {eta}", "{meters}",
                                       "time: {time}", "data: {data}", "max mem: {memory:.0f}"])
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == n - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (n - i)))
                print(log_msg.format(i, n, eta=eta, meters=str(self), time=str(iter_time), data=str(data_time),
                                     memory=max_memory_mb()))
            i += 1
            end = time.time()
        total = time.time() - start_time
        print(f"{header} Total time: {datetime.timedelta(seconds=int(total))} ({total / max(n - start, 1):.4f} s / it)")


def start_run(args):
    """Distributed init, the run's flags on the console, seeds; makes --output_dir (rank 0)."""
    if args.device.startswith("cpu"):
        configure_cpu()
    init_distributed_mode(args)
    if threading.current_thread() is threading.main_thread():
        STOP.install()
    print(f"job dir: {os.path.dirname(os.path.realpath(sys.argv[0]))}")
    print(f"{args}".replace(", ", ",\n"))
    seed_everything(args.seed + get_rank())
    if is_main_process() and args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)


def check_loss(loss_value, epoch, step):
    """The official stop on a non-finite loss, naming where it happened."""
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(f"Loss is {loss_value} at epoch {epoch}, iteration {step}, stopping training")


def seed_everything(seed, epoch=0):
    """Seed paddle, numpy and python's random from (seed, epoch), so that a resumed epoch draws the same."""
    s = (seed * 1000003 + epoch) % (2 ** 31)
    paddle.seed(s)
    np.random.seed(s)
    random.seed(s)


class NativeScalerWithGradNormCount:
    """scale -> backward -> (on update steps) unscale -> optional clip -> step -> update.

    Settings of the official GradScaler: initial scale 65536, growth 2 every 2000 finite steps, backoff 0.5.
    Disabled (plain backward and step) unless AMP float16 runs on a GPU.
    """

    def __init__(self, enabled=True):
        self.enabled = enabled
        self._scaler = paddle.amp.GradScaler(enable=enabled, init_loss_scaling=65536.0, incr_ratio=2.0,
                                             decr_ratio=0.5, incr_every_n_steps=2000, decr_every_n_nan_or_inf=1)
        self._skipped = 0

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, update_grad=True):
        self._scaler.scale(loss).backward()
        if not update_grad:
            return None
        self._scaler.unscale_(optimizer)
        norm = None
        if clip_grad is not None:
            norm = paddle.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], clip_grad)
        self._scaler.step(optimizer)
        if self.enabled:  # non-finite gradients: the step was skipped (and the scale backs off in update)
            found_inf = self._scaler._found_inf  # set by unscale_
            self._skipped = self._skipped + (found_inf.astype("int64") if isinstance(found_inf, paddle.Tensor)
                                             else int(found_inf))
        self._scaler.update()
        return norm

    @property
    def skipped_steps(self):
        """Steps skipped for non-finite gradients so far (read from the device only when asked)."""
        return int(self._skipped.item() if isinstance(self._skipped, paddle.Tensor) else self._skipped)

    def state_dict(self):
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict):
        if self.enabled and state_dict:
            if "growth_factor" in state_dict:  # PyTorch GradScaler
                state_dict = {"scale": np.array([state_dict["scale"]], np.float32),
                              "incr_ratio": state_dict["growth_factor"], "decr_ratio": state_dict["backoff_factor"],
                              "incr_every_n_steps": state_dict["growth_interval"], "decr_every_n_nan_or_inf": 1,
                              "incr_count": state_dict["_growth_tracker"], "decr_count": 0,
                              "use_dynamic_loss_scaling": True}
            self._scaler.load_state_dict(state_dict)


def set_recompute(model, enabled):
    """Activation recomputation in every transformer block of the model (encoder and decoder)."""
    for layer in model.sublayers():
        if hasattr(layer, "recompute"):
            layer.recompute = enabled


def wrap_model(args, model):
    """Print the model, its trainable size and the learning rate; wrap it for data parallelism."""
    from util.args import effective_lr

    n_parameters = sum(p.numel().item() for p in model.parameters() if not p.stop_gradient)
    print(f"Model = {model}")
    print(f"number of params (M): {n_parameters / 1.e6:.2f}")
    effective_lr(args)
    return paddle.DataParallel(model) if args.distributed else model


def create_loss_scaler(args):
    return NativeScalerWithGradNormCount(enabled=amp_enabled(args) and args.amp_dtype == "float16")


def train_logger(epoch, optimizer, log_writer, args):
    """The meters of a training epoch (lr first, as the official log keys), with gradients cleared."""
    metric_logger = MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    optimizer.clear_grad()
    if log_writer is not None:
        print(f"log_dir: {args.log_dir}")
    return metric_logger, f"Epoch: [{epoch}]"


def amp_enabled(args):
    return args.device.startswith("gpu") and not args.no_amp


def autocast(args):
    return paddle.amp.auto_cast(enable=amp_enabled(args), dtype=args.amp_dtype, level="O1")


def save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, tag=None, iteration=0):
    """Rank 0 writes {output_dir}/checkpoint-{tag or epoch}.pd: model, optimizer, epoch (the last complete
    one), iteration (batches done in the next epoch, when stopped inside it), scaler, args."""
    if not (args.output_dir and is_main_process()):
        return
    path = os.path.join(args.output_dir, f"checkpoint-{tag if tag is not None else epoch}.pd")
    checkpoint.save_file({
        "model": model_without_ddp.state_dict(),
        "optimizer": checkpoint.optimizer_state(optimizer, model_without_ddp),
        "epoch": epoch,
        "iteration": iteration,
        "scaler": loss_scaler.state_dict(),
        "args": vars(args),
    }, path)


def save_epoch(args, epoch, model_without_ddp, optimizer, loss_scaler):
    """checkpoint-{epoch}.pd every --save_freq epochs and at the end; checkpoint-last.pd every epoch."""
    if epoch % args.save_freq == 0 or epoch + 1 == args.epochs:
        save_model(args, epoch, model_without_ddp, optimizer, loss_scaler)
    save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, tag="last")


def newest_checkpoint(output_dir):
    """The newest readable training checkpoint in output_dir (a corrupt one is reported and passed over)."""
    if not output_dir or not os.path.isdir(output_dir):
        return None, None
    names = [n for n in os.listdir(output_dir) if n.startswith("checkpoint-") and n.endswith(".pd")]
    for name in sorted(names, key=lambda n: os.path.getmtime(os.path.join(output_dir, n)), reverse=True):
        path = os.path.join(output_dir, name)
        try:
            ckpt = checkpoint.load_checkpoint(path)
        except checkpoint.CheckpointError as e:
            print(f"Warning: skipping unreadable checkpoint: {e}")
            continue
        if "optimizer" in ckpt and "epoch" in ckpt:
            return path, ckpt
    return None, None


def load_model(args, model_without_ddp, optimizer, loss_scaler):
    """--resume (or, with --auto_resume, the newest checkpoint in --output_dir as rank 0 sees it): load the
    model strictly; with optimizer and epoch (and not --eval), continue training where it stopped."""
    args.start_iter = 0
    path, ckpt = args.resume, None
    if not path and getattr(args, "auto_resume", False) and not getattr(args, "eval", False):
        path, ckpt = newest_checkpoint(args.output_dir) if is_main_process() else (None, None)
        path = from_main_process(path)
        if path:
            print(f"Auto-resume from {path}")
    if not path:
        return
    args.resume = path
    ckpt = read_on_every_rank(path, ckpt)
    checkpoint.load_model_weights(model_without_ddp, ckpt["model"], path)
    print(f"Resume checkpoint {path}")
    if "optimizer" in ckpt and "epoch" in ckpt and not getattr(args, "eval", False):
        checkpoint.load_optimizer_state(optimizer, model_without_ddp, ckpt, path)
        args.start_epoch = int(ckpt["epoch"]) + 1
        args.start_iter = int(ckpt.get("iteration", 0))
        if "scaler" in ckpt:
            loss_scaler.load_state_dict(ckpt["scaler"])
        print("With optim & sched!" + (f" Continuing epoch {args.start_epoch} at iteration {args.start_iter}."
                                       if args.start_iter else ""))
        truncate_log(args, args.start_epoch)


def read_on_every_rank(path, ckpt=None):
    """Read the checkpoint on every rank and check that all ranks read the same training position, so that
    no rank starts elsewhere (e.g. a node-local --output_dir that other nodes do not see)."""
    error = None
    if ckpt is None:
        try:
            ckpt = checkpoint.load_checkpoint(path)
        except checkpoint.CheckpointError as e:
            error = str(e)
    if get_world_size() == 1:
        if error:
            raise checkpoint.CheckpointError(error)
        return ckpt
    errors = all_gather(error)
    failed = [str(r) for r, e in enumerate(errors) if e]
    if failed:
        raise checkpoint.CheckpointError(
            f"rank(s) {', '.join(failed)} cannot read the checkpoint rank 0 resumes from ({errors[int(failed[0])]}); "
            "--output_dir must be a folder every node sees (a shared filesystem)")
    positions = all_gather((int(ckpt.get("epoch", -1)), int(ckpt.get("iteration", 0))))
    if len(set(positions)) > 1:
        raise checkpoint.CheckpointError(
            f"{path}: the ranks read different checkpoints under this name (epoch, iteration by rank: {positions}); "
            "--output_dir must be one folder that every node shares")
    return ckpt


def truncate_log(args, start_epoch):
    """Drop log.txt lines of epochs that will run again, so that every epoch appears once."""
    path = os.path.join(args.output_dir, "log.txt") if args.output_dir else ""
    if not (path and os.path.isfile(path) and is_main_process()):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    keep = [line for line in lines if json.loads(line).get("epoch", -1) < start_epoch]
    if len(keep) != len(lines):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


def log_step(metric_logger, log_writer, loss_value, lr, step, steps, epoch, update, loss_tag="loss"):
    """Meters and VisualDL scalars of one iteration; True when a stop signal ends the epoch here.

    On update steps one all-reduce carries the loss (for VisualDL) and the stop request together; other
    micro-steps communicate nothing."""
    metric_logger.update(loss=loss_value)
    metric_logger.update(lr=lr)
    if not update:
        return False
    loss_sum, stop = all_reduce_sum([loss_value, STOP.local_flag()])
    if log_writer is not None:
        # x axis in 1000ths of an epoch, so that runs with different batch sizes line up
        epoch_1000x = int((step / steps + epoch) * 1000)
        log_writer.add_scalar(tag=loss_tag, value=loss_sum / get_world_size(), step=epoch_1000x)
        log_writer.add_scalar(tag="lr", value=lr, step=epoch_1000x)
    if stop > 0 and step + 1 < steps:  # at the last step the epoch simply ends
        STOP.iteration = step + 1
        return True
    return False


def end_epoch(metric_logger, data_loader, loss_scaler, epoch):
    """Average the meters over ranks, print them and the fault counts; the epoch's stats."""
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    report_faults(data_loader, loss_scaler, epoch)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


def report_faults(data_loader, loss_scaler, epoch):
    """Per-epoch count of skipped unreadable images and of AMP steps skipped for non-finite gradients."""
    if getattr(data_loader, "skipped", 0):
        print(f"Skipped {data_loader.skipped} unreadable image(s) in epoch {epoch}")
    if loss_scaler.skipped_steps:
        print(f"AMP: {loss_scaler.skipped_steps} step(s) skipped for non-finite gradients so far (scale lowered)")


class StopSignal:
    """SIGTERM / SIGINT (as SLURM and Kubernetes send before killing a job) ask training to stop at the
    next optimizer step; all ranks agree through an all-reduce. A second SIGINT interrupts at once."""

    def __init__(self):
        self.signum = None
        self.iteration = None

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"Received {signal.Signals(signum).name}: stopping after this iteration", force=True)

    def local_flag(self):
        """1.0 when this process received a stop signal."""
        return 1.0 if self.signum is not None else 0.0

    def requested(self):
        """Whether any rank received a stop signal (a collective: every rank calls it)."""
        return all_reduce_sum([self.local_flag()])[0] > 0


STOP = StopSignal()


def stop_after_epoch(epoch):
    """A signal that came during the epoch's last step: the epoch is saved and logged; stop here."""
    if not STOP.requested():
        return False
    print(f"Stopped after epoch {epoch}. Run the same command again to continue.")
    return True


def stopped(args, epoch, model_without_ddp, optimizer, loss_scaler):
    """After an epoch loop that a signal broke off: save checkpoint-last.pd with the position and report."""
    if STOP.iteration is None:
        return False
    save_model(args, epoch - 1, model_without_ddp, optimizer, loss_scaler, tag="last", iteration=STOP.iteration)
    where = os.path.join(args.output_dir, "checkpoint-last.pd") if args.output_dir else "nowhere (no --output_dir)"
    print(f"Stopped in epoch {epoch} after iteration {STOP.iteration}; saved {where}. "
          "Run the same command again to continue from there.")
    return True


def create_log_writer(args):
    """VisualDL writer on rank 0 when --log_dir is set."""
    if not (is_main_process() and args.log_dir):
        return None
    from visualdl import LogWriter
    os.makedirs(args.log_dir, exist_ok=True)
    return LogWriter(logdir=args.log_dir)


def log_stats(args, stats):
    """Append one JSON line to {output_dir}/log.txt (rank 0)."""
    if args.output_dir and is_main_process():
        with open(os.path.join(args.output_dir, "log.txt"), mode="a", encoding="utf-8") as f:
            f.write(json.dumps(stats) + "\n")
