"""Distributed setup, logging meters, the AMP loss scaler and training checkpoints."""
import builtins
import datetime
import json
import os
import random
import resource
import sys
import time
from collections import defaultdict, deque

import numpy as np
import paddle
import paddle.distributed as dist

from util import checkpoint
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
        if get_world_size() == 1:
            return
        t = paddle.to_tensor([self.count, self.total], dtype="float64")
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

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

    def log_every(self, iterable, print_freq, header=""):
        i = 0
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
        print(f"{header} Total time: {datetime.timedelta(seconds=int(total))} ({total / max(n, 1):.4f} s / it)")


def setup_for_distributed(is_master):
    """Silence print on non-master ranks (unless force=True) and prefix lines with the time."""
    builtin_print = builtins.print

    def print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(f"[{datetime.datetime.now().time()}] ", end="")
            builtin_print(*args, **kwargs)

    builtins.print = print


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process():
    return get_rank() == 0


def configure_cpu():
    """Use this process's share of the cores (Paddle runs ops on one thread by default) and, on AMD CPUs, the
    fast MKL code path (MKL reads MKL_DEBUG_CPU_TYPE at its first call, so this works after import)."""
    try:
        with open("/proc/cpuinfo") as f:
            if "AuthenticAMD" in f.read(4096):
                os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    except OSError:
        pass
    paddle.base.core.set_num_threads(cpu_threads())


def cpu_threads():
    """This process's share of the cores available to it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_procs = int(os.environ.get("PADDLE_LOCAL_SIZE", os.environ.get("PADDLE_TRAINERS_NUM", "1")))
    return max(1, cores // max(1, local_procs))


def init_distributed_mode(args):
    """Single process unless started by paddle.distributed.launch (one process per GPU or CPU worker)."""
    paddle.set_device(args.device)
    if args.device == "cpu":
        configure_cpu()
    if int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) > 1:
        dist.init_parallel_env()
        args.distributed = True
        args.rank, args.world_size = dist.get_rank(), dist.get_world_size()
        print(f"| distributed init (rank {args.rank} of {args.world_size}, device {paddle.get_device()})", flush=True)
        dist.barrier()
    else:
        args.distributed, args.rank, args.world_size = False, 0, 1
    setup_for_distributed(args.rank == 0)


def seed_everything(seed, epoch=0):
    """Seed paddle, numpy and python's random from (seed, epoch), so that a resumed epoch draws the same."""
    s = (seed * 1000003 + epoch) % (2 ** 31)
    paddle.seed(s)
    np.random.seed(s)
    random.seed(s)


def all_reduce_mean(x):
    world_size = get_world_size()
    if world_size == 1:
        return x
    t = paddle.to_tensor([x], dtype="float64")
    dist.all_reduce(t)
    return t.item() / world_size


class NativeScalerWithGradNormCount:
    """scale -> backward -> (on update steps) unscale -> optional clip -> step -> update.

    Settings of the official GradScaler: initial scale 65536, growth 2 every 2000 finite steps, backoff 0.5.
    Disabled (plain backward and step) unless AMP float16 runs on a GPU.
    """

    state_dict_key = "amp_scaler"

    def __init__(self, enabled=True):
        self.enabled = enabled
        self._scaler = paddle.amp.GradScaler(enable=enabled, init_loss_scaling=65536.0, incr_ratio=2.0,
                                             decr_ratio=0.5, incr_every_n_steps=2000, decr_every_n_nan_or_inf=1)
        self.skipped_steps = 0

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, update_grad=True):
        self._scaler.scale(loss).backward()
        if not update_grad:
            return None
        self._scaler.unscale_(optimizer)
        norm = None
        if clip_grad is not None:
            norm = paddle.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], clip_grad)
        scale = self._scaler._scale.item() if self.enabled else None
        self._scaler.step(optimizer)
        self._scaler.update()
        if self.enabled and self._scaler._scale.item() < scale:
            self.skipped_steps += 1  # non-finite gradients: the step was skipped and the scale backed off
        return norm

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


def amp_enabled(args):
    return args.device.startswith("gpu") and not args.no_amp


def autocast(args):
    return paddle.amp.auto_cast(enable=amp_enabled(args), dtype=args.amp_dtype, level="O1")


def save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, tag=None):
    """Rank 0 writes {output_dir}/checkpoint-{tag or epoch}.pd: model, optimizer, epoch, scaler, args."""
    if not is_main_process():
        return
    path = os.path.join(args.output_dir, f"checkpoint-{tag if tag is not None else epoch}.pd")
    checkpoint.save_file({
        "model": model_without_ddp.state_dict(),
        "optimizer": checkpoint.optimizer_state(optimizer, model_without_ddp),
        "epoch": epoch,
        "scaler": loss_scaler.state_dict(),
        "args": vars(args),
    }, path)


def load_model(args, model_without_ddp, optimizer, loss_scaler):
    """--resume: load the model strictly; with optimizer and epoch (and not --eval), continue training."""
    if not args.resume:
        return
    ckpt = checkpoint.load_checkpoint(args.resume)
    checkpoint.load_model_weights(model_without_ddp, ckpt["model"], args.resume)
    print(f"Resume checkpoint {args.resume}")
    if "optimizer" in ckpt and "epoch" in ckpt and not getattr(args, "eval", False):
        checkpoint.load_optimizer_state(optimizer, model_without_ddp, ckpt, args.resume)
        args.start_epoch = int(ckpt["epoch"]) + 1
        if "scaler" in ckpt:
            loss_scaler.load_state_dict(ckpt["scaler"])
        print("With optim & sched!")


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
