"""Data-parallel processes: ranks, the device of each, collectives, and what the ranks must agree on."""
import builtins
import contextlib
import datetime
import os

import numpy as np
import paddle
import paddle.distributed as dist

from util import compat
from util.errors import LaunchError


def check_launch_environment(env=None):
    """A launcher sets PADDLE_TRAINERS_NUM together with this process's rank and endpoint; alone (left in a
    shell by an earlier launch) it would make a single process wait for ranks that never come."""
    env = os.environ if env is None else env
    value = env.get("PADDLE_TRAINERS_NUM", "1")
    if not value.strip().isdigit() or int(value) < 1:
        raise LaunchError(f"PADDLE_TRAINERS_NUM={value!r} in the environment is not a number of processes")
    n = int(value)
    if n == 1:
        return
    missing = [k for k in ("PADDLE_TRAINER_ID", "PADDLE_CURRENT_ENDPOINT") if not env.get(k)]
    rank = env.get("PADDLE_TRAINER_ID", "")
    if missing or not rank.isdigit() or int(rank) >= n:
        problem = f"without {' and '.join(missing)}" if missing else f"with PADDLE_TRAINER_ID={rank!r}"
        raise LaunchError(f"PADDLE_TRAINERS_NUM={n} in the environment {problem}, as no launcher sets it (left "
                          "from an earlier launch?): start with python -m paddle.distributed.launch, or unset "
                          "PADDLE_TRAINERS_NUM")


def launched_processes(env=None):
    """Number of processes the launcher started for this job (1 without a launcher)."""
    return int((os.environ if env is None else env).get("PADDLE_TRAINERS_NUM", "1"))


def process_device(device, env=None):
    """The device this process runs on. With several processes every rank takes the GPU the launcher chose
    for it (FLAGS_selected_gpus); an index in --device only applies to a single process."""
    env = os.environ if env is None else env
    kind = device.split(":")[0]
    if launched_processes(env) > 1:
        if kind == "gpu":
            return f"gpu:{env.get('FLAGS_selected_gpus', '0').split(',')[0]}"
        return "cpu"
    return device


def init_distributed_mode(flag_device):
    """Set this process's device (from --device); join the process group when started by
    paddle.distributed.launch."""
    device = process_device(flag_device)
    if device != flag_device and ":" in flag_device:
        print(f"--device {flag_device}: each of the {launched_processes()} processes uses its own device "
              f"({device} here)")
    paddle.set_device(device)
    if launched_processes() > 1:
        dist.init_parallel_env()
        print(f"| distributed init (rank {dist.get_rank()} of {dist.get_world_size()}, device {paddle.get_device()})",
              flush=True)
        dist.barrier()
    setup_for_distributed(get_rank() == 0)


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


def all_reduce_sum(values):
    """Sum a list of floats over ranks (one collective); the list itself in a single process."""
    if get_world_size() == 1:
        return list(values)
    t = paddle.to_tensor(values, dtype="float64")
    dist.all_reduce(t)
    return t.numpy().tolist()


def all_gather(value):
    """A picklable value from every rank, in rank order."""
    if get_world_size() == 1:
        return [value]
    out = []
    dist.all_gather_object(out, value)
    return out


def made_on_main_process(make):
    """make() -> {name: value} computed on rank 0 alone and received by every rank (a scan of a dataset that
    every rank would otherwise repeat): NumPy arrays travel as tensors (one broadcast each, no pickles), the
    other values and an exception make() raised as small pickles; every rank raises that exception."""
    if get_world_size() == 1:
        return make()
    made, error = None, None
    if get_rank() == 0:
        try:
            made = make()
        except Exception as e:  # noqa: BLE001 -- raised again on every rank below
            error = e
    layout = all_gather((error, None if made is None else {
        k: ("array", v.dtype.str, v.shape) if isinstance(v, np.ndarray) else ("value", v) for k, v in made.items()}))[0]
    if layout[0] is not None:
        raise layout[0]
    out = {}
    for k, spec in layout[1].items():
        if spec[0] == "value":
            out[k] = spec[1]
            continue
        _, dtype, shape = spec
        t = paddle.to_tensor(made[k] if made is not None else np.zeros(shape, dtype))
        dist.broadcast(t, src=0)
        out[k] = t.numpy()
    return out


def from_main_process(value):
    """Rank 0's value on every rank."""
    return all_gather(value)[0]


def grad_sync(model, update):
    """Context of a micro-step's forward and backward: gradients are all-reduced only on update steps
    (DataParallel's no_sync() otherwise; Paddle needs the forward inside it too)."""
    if update or not isinstance(model, paddle.DataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def broadcast_buffers(model):
    """Rank 0's buffers and BatchNorm running statistics on every rank, as PyTorch DDP keeps them. Paddle's
    DataParallel broadcasts neither (its BatchNorm statistics are non-trainable parameters), so each rank's
    would drift with its own batches."""
    if get_world_size() == 1:
        return
    for tensor in list(model.buffers()) + compat.batch_norm_statistics(model):
        dist.broadcast(tensor, src=0)


def to_device(array):
    """A host array as a tensor on this process's device: on a GPU copied from pinned memory without blocking
    (a copy from pageable memory would wait for it), elsewhere a plain CPU tensor."""
    tensor = paddle.to_tensor(array, place=paddle.CPUPlace())
    if paddle.is_compiled_with_cuda() and paddle.get_device().startswith("gpu"):
        return tensor.pin_memory().cuda(blocking=False)
    return tensor
