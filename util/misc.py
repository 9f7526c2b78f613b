"""Running a script: start-up (devices, seeds, output folders), meters and logs."""
import datetime
import json
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

from util import checkpoint, nonfinite, run_dir
from util.cpu import configure_cpu
from util.args import for_this_process
from util.dist import (all_reduce_sum, check_launch_environment, from_main_process, get_rank, get_world_size,
                       init_distributed_mode, is_main_process)
from util.preempt import STOP
from util.errors import RunDirError


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
        """The meters with values (none yet while a rewind leaves out the first iterations of an epoch)."""
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items() if meter.deque)

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def state(self):
        """Count, total and recent values of every meter: enough to continue an epoch after a resume."""
        return {name: {"count": m.count, "total": m.total, "values": list(m.deque)} for name, m in self.meters.items()}

    def load_state(self, state):
        for name, s in state.items():
            meter = self.meters[name]
            meter.count, meter.total = s["count"], s["total"]
            meter.deque.extend(s["values"])

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
    """Distributed init, the run's flags on the console, seeds; makes --output_dir (rank 0). Returns the flags
    completed for this process (util.args.for_this_process)."""
    check_launch_environment()
    if args.device.startswith("cpu"):
        configure_cpu()
    init_distributed_mode(args.device)
    accum = None
    if args.accum_iter == "auto":  # --eval trains nothing: 1
        accum = 1 if getattr(args, "eval", False) else checkpoint.accum_iter_to_keep(args, get_world_size())
    args = for_this_process(args, get_world_size(), get_rank(), accum)
    if nonfinite.injection():  # the testing aid MAE_INJECT_NONFINITE, checked with the flags
        nonfinite.install_injection(*nonfinite.injection())
    if threading.current_thread() is threading.main_thread():
        STOP.install()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the file-size limit fails, not the process
    print(f"job dir: {os.path.dirname(os.path.realpath(sys.argv[0]))}")
    print(f"{args}".replace(", ", ",\n"))
    seed_everything(args.seed + get_rank(), 0)
    prepare_outputs(args)
    return args

def prepare_outputs(args):
    """Rank 0 makes --output_dir and --log_dir and checks it can write there, and a training run takes the
    output folder's lock; every rank stops together when that fails."""
    error = None
    if is_main_process():
        try:
            if args.output_dir:
                run_dir.check_writable(args.output_dir, "--output_dir")
                run_dir.check_file(os.path.join(args.output_dir, "log.txt"))
                if not getattr(args, "eval", False):
                    run_dir.lock(args.output_dir)
            if args.log_dir:
                run_dir.check_writable(args.log_dir, "--log_dir")
        except RunDirError as e:
            error = str(e)
    error = from_main_process(error)
    if error:
        raise RunDirError(error)

def print_model(model, args):
    """The model, its trainable size and the learning rate of the run (as the official scripts print them)."""
    n_parameters = sum(p.numel().item() for p in model.parameters() if not p.stop_gradient)
    print(f"Model = {model}")
    print(f"number of params (M): {n_parameters / 1.e6:.2f}")
    eff_batch_size = args.batch_size * args.accum_iter * args.world_size
    print(f"base lr: {args.lr * 256 / eff_batch_size:.2e}")
    print(f"actual lr: {args.lr:.2e}")
    print(f"accumulate grad iterations: {args.accum_iter}")
    print(f"effective batch size: {eff_batch_size}")


def seed_everything(seed, *position):
    """Seed paddle, numpy and python's random from seed and a position in training (epoch, step), so that a
    resumed run draws the same numbers at the same position."""
    s = seed
    for p in position:
        s = s * 1000003 + p
    s %= 2 ** 31
    paddle.seed(s)
    np.random.seed(s)
    random.seed(s)


def create_log_writer(args):
    """VisualDL writer on rank 0 when --log_dir is set."""
    if not (is_main_process() and args.log_dir):
        return None
    from visualdl import LogWriter
    os.makedirs(args.log_dir, exist_ok=True)
    print(f"log_dir: {args.log_dir}")
    return LogWriter(logdir=args.log_dir)

def log_stats(args, stats):
    """Append one JSON line to {output_dir}/log.txt (rank 0). It is written before the epoch's checkpoints,
    so a failed write (a full disk) stops the run with the checkpoints of the epochs before intact; a rerun
    drops a line cut short and continues from them."""
    if args.output_dir and is_main_process():
        path = os.path.join(args.output_dir, "log.txt")
        try:
            with open(path, mode="a", encoding="utf-8") as f:
                f.write(json.dumps(stats) + "\n")
        except OSError as e:
            raise RunDirError(f"{path}: cannot append the epoch's log line ({e.strerror or e}); the "
                                      "checkpoints of the epochs before are intact, rerun to continue") from None
