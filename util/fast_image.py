"""The input pipeline's hot loops in C (fast_image.c): bicubic resizing of RGB arrays with Pillow's pixels,
~2x faster than Pillow, and the per-batch normalisation by table lookup straight into a Paddle tensor.
Compiled once per machine with the C compiler (about 1 s) into Paddle's extension directory and loaded with
ctypes; without a compiler Pillow and NumPy do the work, with one warning."""
import ctypes
import fcntl
import hashlib
import os
import subprocess
import sys
import warnings

import numpy as np
import paddle
from PIL import Image

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fast_image.c")
CFLAGS = ["-O3", "-ffp-contract=off", "-shared", "-fPIC"]  # no FMA: the weights round as Pillow's
_state = {}


def _library_path():
    with warnings.catch_warnings():  # its import warns that ccache is missing
        warnings.simplefilter("ignore")
        from paddle.utils.cpp_extension import get_build_directory
    with open(SOURCE, "rb") as f:
        key = hashlib.sha1(f.read() + " ".join(CFLAGS).encode()).hexdigest()[:12]
    return os.path.join(get_build_directory(), f"mae_fast_image_{key}.so")


def _load():
    path = _library_path()
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build when several processes start together
            if not os.path.exists(path):
                cc = os.environ.get("CC", "cc")
                try:
                    out = subprocess.run([cc, *CFLAGS, SOURCE, "-o", path + ".tmp"], capture_output=True, text=True)
                except OSError as e:
                    out = subprocess.CompletedProcess([cc], 1, "", f"{cc}: {e.strerror}")
                if out.returncode != 0:
                    reason = (out.stderr.strip().splitlines() or ["failed"])[0]
                    print(f"warning: fast image kernels not built ({reason}); using Pillow and NumPy",
                          file=sys.stderr)
                    return None
                os.replace(path + ".tmp", path)
    lib = ctypes.CDLL(path)
    lib.resize_bicubic_rgb.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_void_p,
                                       ctypes.c_int, ctypes.c_int]
    lib.resize_bicubic_rgb.restype = ctypes.c_int
    lib.normalize_nhwc.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    lib.normalize_nhwc.restype = None
    return lib


def available():
    """Build/load the kernel (call before loader workers start, so that they inherit it)."""
    if "lib" not in _state:
        _state["lib"] = _load()
    return _state["lib"] is not None


def resize_bicubic(img, size):
    """HWC uint8 RGB array (any row stride, e.g. a crop view) -> (height, width) = size, as
    Image.fromarray(img).resize((width, height), Image.BICUBIC)."""
    height, width = size
    if not available() or img.ndim != 3 or img.shape[2] != 3 or img.strides[1:] != (3, 1):
        return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((width, height), Image.BICUBIC))
    out = np.empty((height, width, 3), np.uint8)
    if _state["lib"].resize_bicubic_rgb(img.ctypes.data, img.shape[0], img.shape[1], img.strides[0], out.ctypes.data, height, width):
        raise MemoryError(f"resizing a {img.shape[1]}x{img.shape[0]} image to {width}x{height}")
    return out


def normalize_nhwc(images, table):
    """N x H x W x 3 uint8 (contiguous array, or CPU tensor) -> N x 3 x H x W float32 tensor, each channel's
    levels mapped through table (3 x 256 float32). For training on the CPU (the tensor is made on the
    current device)."""
    if not available():
        images = images.numpy() if isinstance(images, paddle.Tensor) else images
        out = np.empty((images.shape[0], 3, *images.shape[1:3]), np.float32)
        for ch in range(3):
            np.take(table[ch], images[..., ch], out=out[:, ch])
        return paddle.to_tensor(out)
    if not isinstance(images, paddle.Tensor):
        images = np.ascontiguousarray(images)
    n, h, w, _ = images.shape
    out = paddle.empty([n, 3, h, w], "float32")
    table = np.ascontiguousarray(table, np.float32)
    src = images.data_ptr() if isinstance(images, paddle.Tensor) else images.ctypes.data
    _state["lib"].normalize_nhwc(src, n, h * w, table.ctypes.data, out.data_ptr())
    return out
