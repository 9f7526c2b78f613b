"""CPU settings for this process: threads, MKL's code path on AMD, dense layouts, malloc (imports nothing of
the project but util.compat, so that the model layers can use it)."""
import ctypes
import functools
import os

import paddle

from util import compat

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def configure_cpu():
    """Use this process's share of the cores (Paddle runs ops on one thread by default), on AMD CPUs the
    fast MKL code path (MKL reads MKL_DEBUG_CPU_TYPE at its first call, so this works after import), and
    dense transposes/slices instead of strided views (Paddle's strided copies are slow on CPU), and freed
    memory kept by malloc for reuse (Paddle's CPU tensors come straight from malloc, which gave large
    blocks back to the OS on every free: a third of a fine-tuning step's system time)."""
    try:
        with open("/proc/cpuinfo") as f:
            if "AuthenticAMD" in f.read(4096):
                os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    except OSError:
        pass
    compat.set_cpu_threads(cpu_threads())
    paddle.set_flags({"FLAGS_use_stride_kernel": False})
    keep_freed_memory()


def keep_freed_memory():
    """glibc malloc: serve large blocks from the heap (not mmap) and give memory back to the OS only above
    1 GiB free at the top of the heap."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def cpu_threads():
    """This process's share of the cores available to it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_procs = os.environ.get("PADDLE_LOCAL_SIZE", os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    return max(1, cores // max(1, int(local_procs) if local_procs.isdigit() else 1))  # else util.dist says why


@functools.lru_cache(maxsize=None)
def cpu_has_avx512f():
    """The CPU reports AVX-512 (Paddle then takes its JIT-compiled vector kernels, e.g. for AdamW)."""
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False
