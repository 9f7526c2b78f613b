"""The input pipeline's hot loops in C (fast_image.c): bicubic resizing of RGB arrays (~2x faster than
Pillow) and RandAugment's affine warps (shears and translations ~3x), both with Pillow's pixels; the
horizontal flip; the per-batch normalisation by table lookup straight into a CPU tensor; random erasing of
the boxes only (the device path draws noise for the whole batch). Compiled once per machine with the C
compiler (about 1 s) through util.native and loaded with ctypes; when that is not possible Pillow and
Paddle's ops do the work, after one warning."""
import ctypes
import os

import numpy as np
import paddle
import PIL
from PIL import Image

from util import native

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fast_image.c")
PILLOW_FOLLOWED = 13  # the major release whose bicubic resampling fast_image.c reproduces
CFLAGS = ["-O3", "-ffp-contract=off", "-shared", "-fPIC"]  # no FMA: the weights round as Pillow's
SYMBOLS = ("resize_bicubic_rgb", "mirror_rgb", "affine_rgb", "normalize_nhwc", "erase_boxes")
NOT_LOADED = "not loaded"
lib = NOT_LOADED  # the loaded library, or None where it cannot be built or loaded (Pillow and NumPy then)


def _load():
    cc = os.environ.get("CC", "cc")
    path = native.library("mae_fast_image", [SOURCE], cc, CFLAGS,
                          lambda out: [cc, *CFLAGS, SOURCE, "-o", os.path.join(out, "fast_image.so")],
                          lambda out: os.path.join(out, "fast_image.so"))
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        native.warn(f"native CPU code mae_fast_image not loaded ({e}); running on Pillow and NumPy")
        return None
    missing = [s for s in SYMBOLS if not hasattr(lib, s)]
    if missing:
        native.reject(path, f"the library lacks {', '.join(missing)}")
        return None
    lib.resize_bicubic_rgb.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_void_p,
                                       ctypes.c_int, ctypes.c_int]
    lib.resize_bicubic_rgb.restype = ctypes.c_int
    lib.mirror_rgb.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.mirror_rgb.restype = None
    lib.affine_rgb.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.affine_rgb.restype = None
    lib.normalize_nhwc.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    lib.normalize_nhwc.restype = None
    lib.erase_boxes.argtypes = ([ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_long] * 5
                                + [ctypes.c_int, ctypes.c_uint64])
    lib.erase_boxes.restype = None
    return lib


def available():
    """Build/load the kernel (call before loader workers start, so that they inherit it)."""
    global lib
    if lib is NOT_LOADED:
        lib = _load()
    return lib is not None


def follows_installed_pillow():
    """fast_image.c resamples in Pillow 13's pass order; other Pillow releases round some pixels otherwise,
    so with them Pillow itself resizes."""
    return int(PIL.__version__.split(".")[0]) == PILLOW_FOLLOWED


def _packed_rgb(img):
    """An HWC uint8 array whose pixels are 3 adjacent bytes (rows may be any stride apart): what the C reads."""
    return img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.strides[1:] == (3, 1)


def resize_bicubic(img, size):
    """HWC uint8 RGB array (any row stride, e.g. a crop view) -> (height, width) = size, as
    Image.fromarray(img).resize((width, height), Image.BICUBIC)."""
    height, width = size
    if not available() or not follows_installed_pillow() or not _packed_rgb(img):
        return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((width, height), Image.BICUBIC))
    out = np.empty((height, width, 3), np.uint8)
    if lib.resize_bicubic_rgb(img.ctypes.data, img.shape[0], img.shape[1], img.strides[0],
                              out.ctypes.data, height, width):
        raise MemoryError(f"resizing a {img.shape[1]}x{img.shape[0]} image to {width}x{height}")
    return out


def mirror(img):
    """HWC uint8 RGB array (any row stride) -> img[:, ::-1] as a contiguous array, ~10x faster than NumPy's
    copy of the reversed view."""
    if not available() or not _packed_rgb(img):
        return np.ascontiguousarray(img[:, ::-1])
    out = np.empty(img.shape, np.uint8)
    lib.mirror_rgb(img.ctypes.data, img.shape[0], img.shape[1], img.strides[0], out.ctypes.data)
    return out


def affine(img, coefficients, resample, fill):
    """HWC uint8 RGB array (any row stride) -> the array of Image.fromarray(img).transform(size, AFFINE,
    coefficients, resample, fillcolor=fill) at the same size, for BILINEAR or BICUBIC: the same pixels. Shears
    and translations ~3x faster (their source points lie on pixel rows or columns, so one row or column of
    taps gives Pillow's value), rotations about as fast as Pillow."""
    if (not available() or not follows_installed_pillow() or resample not in (Image.BILINEAR, Image.BICUBIC)
            or not _packed_rgb(img)):
        pil = Image.fromarray(np.ascontiguousarray(img))
        return np.asarray(pil.transform(pil.size, Image.Transform.AFFINE, tuple(coefficients), resample=resample,
                                        fillcolor=tuple(fill)))
    out = np.empty(img.shape, np.uint8)
    a = np.asarray(coefficients, np.float64)
    colour = np.asarray(fill, np.uint8)
    lib.affine_rgb(img.ctypes.data, img.shape[0], img.shape[1], img.strides[0], out.ctypes.data,
                             a.ctypes.data, int(resample == Image.BICUBIC), colour.ctypes.data)
    return out


def normalize_nhwc(images, table):
    """N x H x W x 3 uint8 CPU tensor -> N x 3 x H x W float32 tensor, each channel's levels mapped through
    table (3 x 256 float32), in one pass of C. Only when available() and the current device is the CPU."""
    images = images.contiguous()
    n, h, w, _ = images.shape
    out = paddle.empty([n, 3, h, w], "float32")
    table = np.ascontiguousarray(table, np.float32)
    lib.normalize_nhwc(images.data_ptr(), n, h * w, table.ctypes.data, out.data_ptr())
    return out


ERASE_MODES = {"pixel": 0, "rand": 1, "const": 2}


def erase_boxes(x, boxes, mode, seed):
    """Random erasing in place on an N x C x H x W float32 CPU tensor: the boxes (N x K x 4 int64 CPU tensor)
    filled in one pass of C with normals from a stream of `seed` (mode as RandomErasing's). Only when
    available(). Returns x."""
    x, boxes = x.contiguous(), boxes.contiguous()
    n, c, h, w = x.shape
    lib.erase_boxes(x.data_ptr(), boxes.data_ptr(), n, boxes.shape[1], c, h, w, ERASE_MODES[mode], seed)
    return x
