"""Fused CPU kernels (cpu_kernels.cc) for bias + GELU, layer norm, softmax, the attention heads' layout
and residual branches under stochastic depth, forward and backward; and AdamW's step (util/adamw.py).

Compiled once per machine with Paddle's C++ extension tool (g++ with OpenMP, about 20 s) into Paddle's
extension directory, then loaded from there. Used for float32 CPU tensors in dynamic mode only: exported
and GPU models keep Paddle's ops. Without a compiler the blocks fall back to Paddle's ops, with one warning.
"""
import contextlib
import fcntl
import hashlib
import os
import sys
import tempfile
import warnings

import paddle

from util.cpu import cpu_threads

with warnings.catch_warnings():  # its import warns that ccache is missing, which only slows a rebuild
    warnings.simplefilter("ignore")
    from paddle.utils import cpp_extension

NAME = "mae_cpu_kernels"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cc")
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]  # no FMA contraction: AdamW rounds as Paddle
LDFLAGS = ["-l:libiomp5.so", "-lmvec"]  # the OpenMP runtime that MKL uses: one thread pool
_state = {}


@contextlib.contextmanager
def _quiet(log):
    """Send this process's stdout/stderr (the compiler's and the extension tool's) to `log`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _build_dir():
    with open(SOURCE, "rb") as f:
        key = hashlib.sha1(f.read() + " ".join([paddle.__version__] + CFLAGS + LDFLAGS).encode()).hexdigest()
    return os.path.join(cpp_extension.get_build_directory(), f"{NAME}_{key[:12]}")


def _load():
    """Register the kernels with Paddle (building them first if needed); False if that is not possible."""
    build_dir = _build_dir()
    library, ready = os.path.join(build_dir, NAME, NAME + ".so"), os.path.join(build_dir, "built")
    if os.path.exists(ready):
        cpp_extension.load_op_meta_info_and_register_op(library)
        return True
    os.makedirs(build_dir, exist_ok=True)
    with open(build_dir + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build when several ranks start together
        if os.path.exists(ready):
            cpp_extension.load_op_meta_info_and_register_op(library)
            return True
        with tempfile.TemporaryFile("w+") as log:
            try:
                with _quiet(log):
                    cpp_extension.load(NAME, [SOURCE], extra_cxx_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                                       build_directory=build_dir)
            except Exception as e:  # noqa: BLE001 -- no compiler, no OpenMP: Paddle's own ops do the work
                log.seek(0)
                errors = [line for line in log.read().splitlines() if "error" in line.lower()]
                reason = errors[0].strip() if errors else f"{type(e).__name__}: {e}".splitlines()[0]
                print(f"warning: fused CPU kernels not built ({reason}); using Paddle's ops", file=sys.stderr)
                return False
        with open(ready, "w"):
            pass
        return True


def available():
    if "ok" not in _state:
        _state["ok"] = _load()
        _state["threads"] = cpu_threads()
    return _state["ok"]


def usable(x):
    """The fused kernels apply to `x`: float32 on the CPU in dynamic mode, and they could be built."""
    return (paddle.in_dynamic_mode() and x.place.is_cpu_place() and x.dtype == paddle.float32
            and available())


def bias_gelu(h, bias):
    """gelu(h + bias), exact form; bias over the last axis."""
    return paddle._C_ops._run_custom_op("mae_bias_gelu", h, bias, _state["threads"])[0]


def layer_norm(x, weight, bias, epsilon):
    return paddle._C_ops._run_custom_op("mae_layer_norm", x, weight, bias, float(epsilon), _state["threads"])[0]


def softmax(x):
    """Softmax over the last axis."""
    return paddle._C_ops._run_custom_op("mae_softmax", x, _state["threads"])[0]


def split_heads(qkv, heads, scale):
    """[B, N, 3 * heads * D] -> q * scale, k, v, each [B, heads, N, D]."""
    return paddle._C_ops._run_custom_op("mae_split_heads", qkv, heads, float(scale), _state["threads"])


def merge_heads(x):
    """[B, heads, N, D] -> [B, N, heads * D]."""
    return paddle._C_ops._run_custom_op("mae_merge_heads", x, _state["threads"])[0]


def adamw_(param, grad, lr, moment1, moment2, beta1_pow, beta2_pow, beta1, beta2, epsilon, lr_ratio, coeff):
    """One AdamW step in place on param, moments and beta powers, with Paddle's adamw arithmetic."""
    param = param.detach()  # the same memory; Paddle refuses in-place ops on trainable leaves
    paddle._C_ops._run_custom_op("mae_adamw", param, grad, lr, moment1, moment2, beta1_pow, beta2_pow,
                                 float(beta1), float(beta2), float(epsilon), float(lr_ratio), float(coeff),
                                 _state["threads"])


def residual_drop_path(x, branch, mask, keep):
    """x + branch / keep * mask, mask [B, 1, ...] of 0/1 (stochastic depth on a residual branch)."""
    return paddle._C_ops._run_custom_op("mae_residual_drop_path", x, branch, mask, float(keep),
                                        _state["threads"])[0]
