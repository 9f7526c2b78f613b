"""Restricted unpicklers for checkpoint files: they rebuild numpy arrays and plain containers and refuse
every other global, so that reading a file never runs code from it. Reads this project's ``.pd`` pickles
and the pickle inside PyTorch's zip ``.pth`` files (tensors come back as numpy arrays in PyTorch layout)."""
import collections
import io
import pickle
import types
import zipfile

import numpy as np
from util.errors import UnsafePickleError


_TORCH_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}


class _StorageType:
    def __init__(self, name):
        self.dtype = _TORCH_DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *unused):
    """The tensor a pickle describes as a view of its storage, after checking that the view stays inside
    the storage (a crafted size, stride or offset would otherwise read past the buffer)."""
    if not (isinstance(storage, np.ndarray) and storage.ndim == 1 and _is_int(offset)
            and isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list)) and len(size) == len(stride)
            and all(_is_int(v) and v >= 0 for v in size) and all(_is_int(v) and v >= 0 for v in stride)):
        raise ValueError(f"malformed tensor record (size {size!r}, stride {stride!r}, offset {offset!r})")
    if 0 in size:
        return np.empty(tuple(size), storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= len(storage):
        raise ValueError(f"tensor of size {tuple(size)} (stride {tuple(stride)}, offset {offset}) reaches element "
                         f"{last} of a storage of {len(storage)}")
    strides = [s * storage.itemsize for s in stride]
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size), strides=strides).copy()


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_parameter(data, *unused):
    return data


def _np_reconstruct():
    from numpy._core import multiarray
    return multiarray


class _Namespace(types.SimpleNamespace):
    """Stands in for argparse.Namespace in a checkpoint's saved args."""


def _common_globals():
    multiarray = _np_reconstruct()
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "tuple"): tuple,
        ("builtins", "list"): list,
        ("builtins", "set"): set,
        ("builtins", "slice"): slice,
        ("argparse", "Namespace"): _Namespace,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): lambda s, enc="latin1": s.encode(enc),
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    for name in ("float64", "float32", "int64", "int32", "bool_"):
        allowed[("numpy", name)] = getattr(np, name)
    return allowed


class SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, path, extra=None):
        super().__init__(file)
        self.path = path
        self.allowed = _common_globals()
        self.allowed.update(extra or {})

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise UnsafePickleError(f"{self.path}: refusing to load, its pickle asks for '{module}.{name}' "
                                "(only tensors and plain containers are allowed)")


class _TorchUnpickler(SafeUnpickler):
    def __init__(self, file, path, archive, prefix):
        extra = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                 ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
                 ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                 ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter}
        for storage in _TORCH_DTYPES:
            extra[("torch", storage)] = _StorageType(storage)
            extra[("torch.storage", storage)] = _StorageType(storage)
        super().__init__(file, path, extra)
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafePickleError(f"{self.path}: unsupported persistent id {pid!r}")
        storage_type, key = pid[1], pid[2]
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}/data/{key}")
            if storage_type.dtype == "bfloat16":
                bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
                self.storages[key] = bits.view(np.float32)
            else:
                self.storages[key] = np.frombuffer(raw, storage_type.dtype)
        return self.storages[key]


def read_torch(path):
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise UnsafePickleError(f"{path}: zip file without data.pkl is not a PyTorch checkpoint")
        prefix = pkl[0][: -len("data.pkl")].rstrip("/")
        byteorder = f"{prefix}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder) != b"little":
            raise UnsafePickleError(f"{path}: big-endian checkpoints are not supported")
        return _TorchUnpickler(io.BytesIO(archive.read(pkl[0])), path, archive, prefix).load()
