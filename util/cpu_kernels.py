"""Fused CPU kernels (cpu_kernels.cc) for bias + GELU, layer norm, softmax, the attention heads' layout
and residual branches under stochastic depth, forward and backward; and AdamW's step (util/adamw.py).

Compiled once per machine with Paddle's C++ extension tool (g++ with OpenMP, about 20 s) through
util.native, then loaded from its cache. Used for float32 CPU tensors in dynamic mode only, by the CPU layer
(util/cpu_layer.py) and AdamW: exported and GPU models keep Paddle's ops. When they cannot be built or
loaded, Paddle's ops do the work, after one warning.
"""
import glob
import json
import os
import sys
import sysconfig

import paddle

from util import compat, native
from util.cpu import cpu_threads

NAME = "mae_cpu_kernels"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cc")
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]  # no FMA contraction: AdamW rounds as Paddle
LDFLAGS = ["-l:libiomp5.so", "-lmvec"]  # the OpenMP runtime that MKL uses: one thread pool
# the build, in a process of its own: Paddle's extension tool compiles with $CC/$CXX and links the library
BUILD = ("import json, sys, warnings; warnings.simplefilter('ignore'); from paddle.utils import cpp_extension; "
         "cpp_extension.load(sys.argv[1], [sys.argv[2]], extra_cxx_cflags=json.loads(sys.argv[3]), "
         "extra_ldflags=json.loads(sys.argv[4]), build_directory=sys.argv[5])")
OPS = ("mae_bias_gelu", "mae_layer_norm", "mae_softmax", "mae_split_heads", "mae_merge_heads",
       "mae_residual_drop_path", "mae_adamw")
_state = {}


def _compiler():
    return os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]


def _load():
    """Register the kernels with Paddle (building them first if needed); False if that is not possible."""
    flags = CFLAGS + LDFLAGS + [f"paddle {paddle.__version__}", f"CXX {os.environ.get('CXX', '')}",
                                f"python {sys.version_info[:2]}"]
    path = native.library(
        NAME, [SOURCE], _compiler(), flags,
        lambda out: [sys.executable, "-c", BUILD, NAME, SOURCE, json.dumps(CFLAGS), json.dumps(LDFLAGS), out],
        lambda out: next(iter(glob.glob(os.path.join(out, "**", NAME + "*.so"), recursive=True)), None))
    if path is None:
        return False
    try:
        missing = sorted(set(OPS) - set(compat.register_custom_ops(path)))
    except Exception as e:  # noqa: BLE001 -- whatever the loader raises, Paddle's own ops do the work
        native.warn(f"native CPU code {NAME} not loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                    "running on Paddle's ops")
        return False
    if missing:
        native.reject(path, f"the library lacks the operator(s) {', '.join(missing)}")
        return False
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
    return compat.run_custom_op("mae_bias_gelu", h, bias, _state["threads"])[0]


def layer_norm(x, weight, bias, epsilon):
    return compat.run_custom_op("mae_layer_norm", x, weight, bias, float(epsilon), _state["threads"])[0]


def softmax(x):
    """Softmax over the last axis."""
    return compat.run_custom_op("mae_softmax", x, _state["threads"])[0]


def split_heads(qkv, heads, scale):
    """[B, N, 3 * heads * D] -> q * scale, k, v, each [B, heads, N, D]."""
    return compat.run_custom_op("mae_split_heads", qkv, heads, float(scale), _state["threads"])


def merge_heads(x):
    """[B, heads, N, D] -> [B, N, heads * D]."""
    return compat.run_custom_op("mae_merge_heads", x, _state["threads"])[0]


def adamw_(param, grad, lr, moment1, moment2, beta1_pow, beta2_pow, beta1, beta2, epsilon, lr_ratio, coeff):
    """One AdamW step in place on param, moments and beta powers, with Paddle's adamw arithmetic."""
    param = param.detach()  # the same memory; Paddle refuses in-place ops on trainable leaves
    compat.run_custom_op("mae_adamw", param, grad, lr, moment1, moment2, beta1_pow, beta2_pow,
                                 float(beta1), float(beta2), float(epsilon), float(lr_ratio), float(coeff),
                                 _state["threads"])


def residual_drop_path(x, branch, mask, keep):
    """x + branch / keep * mask, mask [B, 1, ...] of 0/1 (stochastic depth on a residual branch)."""
    return compat.run_custom_op("mae_residual_drop_path", x, branch, mask, float(keep),
                                        _state["threads"])[0]
