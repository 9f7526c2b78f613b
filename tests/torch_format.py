"""Write files in PyTorch's zip checkpoint format from numpy arrays, without PyTorch (for tests)."""
import collections
import contextlib
import io
import pickle
import sys
import types
import zipfile

import numpy as np

_STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
            np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage"}


@contextlib.contextmanager
def _fake_torch():
    """Stand-in modules so that pickle can name torch's globals (the reader never imports them)."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in _STORAGE.values():
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield torch, utils
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k)
            else:
                sys.modules[k] = v


class Forged:
    """A tensor record that claims (offset, size, stride) over the storage `array`, whatever it holds."""

    def __init__(self, array, offset, size, stride):
        self.array, self.view = np.asarray(array), (offset, tuple(size), tuple(stride))


class _Tensor:
    def __init__(self, array, key, rebuild, view=None):
        self.array, self.key, self.rebuild = array, key, rebuild
        self.view = view or (0, array.shape, tuple(s // array.itemsize for s in array.strides))

    def __reduce__(self):
        offset, size, stride = self.view
        return self.rebuild, (_Storage(self.array, self.key), offset, size, stride, False,
                              collections.OrderedDict())


class _Storage:
    def __init__(self, array, key):
        self.array, self.key = array, key


def save_pth(obj, path, name="archive"):
    """Like torch.save(obj, path) where obj holds numpy arrays in place of tensors."""
    with _fake_torch() as (torch, utils):
        storages = []

        def wrap(o):
            if isinstance(o, Forged):
                t = _Tensor(np.require(o.array, requirements="C"), str(len(storages)), utils._rebuild_tensor_v2,
                            o.view)
                storages.append(t.array)
                return t
            if isinstance(o, np.ndarray):
                t = _Tensor(np.require(o, requirements="C"), str(len(storages)), utils._rebuild_tensor_v2)
                storages.append(t.array)
                return t
            if isinstance(o, dict):
                return type(o)((k, wrap(v)) for k, v in o.items())
            if isinstance(o, list):
                return [wrap(v) for v in o]
            return o

        class Pickler(pickle.Pickler):
            def persistent_id(self, o):
                if isinstance(o, _Storage):
                    storage = getattr(torch, _STORAGE[o.array.dtype])
                    return ("storage", storage, o.key, "cpu", o.array.size)
                return None

        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(wrap(obj))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/data.pkl", buf.getvalue())
        z.writestr(f"{name}/byteorder", "little")
        for i, a in enumerate(storages):
            z.writestr(f"{name}/data/{i}", a.tobytes())
