"""Checkpoint reading and writing without executing pickled code.

Reads this project's ``.pd`` files (written by ``paddle.save``) and the official PyTorch ``.pth`` files
(torch zip format) with restricted unpicklers that only rebuild arrays and plain containers. PyTorch
tensors come back as numpy arrays in PyTorch layout; ``torch_to_paddle`` maps a model state_dict to Paddle.
"""
import collections
import io
import os
import pickle
import types
import warnings
import zipfile

import numpy as np
import paddle


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read or does not fit the model."""


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


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, path, extra=None):
        super().__init__(file)
        self.path = path
        self.allowed = _common_globals()
        self.allowed.update(extra or {})

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise CheckpointError(f"{self.path}: refusing to load, its pickle asks for '{module}.{name}' "
                              "(only tensors and plain containers are allowed)")


class _TorchUnpickler(_SafeUnpickler):
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
            raise CheckpointError(f"{self.path}: unsupported persistent id {pid!r}")
        storage_type, key = pid[1], pid[2]
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}/data/{key}")
            if storage_type.dtype == "bfloat16":
                bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
                self.storages[key] = bits.view(np.float32)
            else:
                self.storages[key] = np.frombuffer(raw, storage_type.dtype)
        return self.storages[key]


def _read_torch(path):
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise CheckpointError(f"{path}: zip file without data.pkl is not a PyTorch checkpoint")
        prefix = pkl[0][: -len("data.pkl")].rstrip("/")
        byteorder = f"{prefix}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder) != b"little":
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        return _TorchUnpickler(io.BytesIO(archive.read(pkl[0])), path, archive, prefix).load()


def _unwrap(obj):
    """paddle.save stores each tensor as (name, ndarray); return plain arrays, dicts and lists."""
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], np.ndarray):
        return obj[1]
    if isinstance(obj, dict):
        return type(obj)((k, _unwrap(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_unwrap(v) for v in obj]
    return obj


def load_file(path):
    """Read a ``.pd`` or PyTorch ``.pth`` checkpoint. Returns (object, is_torch); tensors are numpy arrays."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        if zipfile.is_zipfile(path):
            return _read_torch(path), True
        with open(path, "rb") as f:
            return _unwrap(_SafeUnpickler(f, path).load()), False
    except CheckpointError:
        raise
    except Exception as e:  # truncated, foreign or corrupt file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


def torch_to_paddle(state_dict):
    """Official PyTorch state_dict -> Paddle: transpose Linear weights, rename BatchNorm stats."""
    out = collections.OrderedDict()
    for k, v in state_dict.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.endswith(".weight") and v.ndim == 2:
            v = np.ascontiguousarray(v.T)
        k = k.replace("running_mean", "_mean").replace("running_var", "_variance")
        out[k] = v
    return out


def load_checkpoint(path):
    """Read a checkpoint as a dict whose 'model' is a Paddle-layout state_dict of numpy arrays.

    A bare state_dict is wrapped as {'model': ...}. PyTorch files are converted and marked 'torch': True.
    """
    ckpt, is_torch = load_file(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(ckpt).__name__}")
    if "model" not in ckpt:
        if ckpt and all(isinstance(v, np.ndarray) for v in ckpt.values()):
            ckpt = {"model": ckpt}
        else:
            raise CheckpointError(f"{path}: no 'model' entry (keys: {', '.join(map(str, list(ckpt)[:10]))})")
    ckpt = dict(ckpt)
    if is_torch:
        ckpt["model"] = torch_to_paddle(ckpt["model"])
        ckpt["torch"] = True
    for k, v in ckpt["model"].items():
        if isinstance(v, np.ndarray) and v.dtype.kind == "f" and not np.isfinite(v).all():
            raise CheckpointError(f"{path}: weights '{k}' hold NaN or infinite values")
    if isinstance(ckpt.get("args"), types.SimpleNamespace):
        ckpt["args"] = vars(ckpt["args"])  # saved args are a dict, as in this project's checkpoints
    return ckpt


def check_state_dict(model, state_dict, path, allow_missing=(), ignore_unexpected=False):
    """Raise CheckpointError naming every missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and k not in allow_missing]
    unexpected = [] if ignore_unexpected else [k for k in state_dict if k not in own]
    shaped = [f"{k} {list(np.shape(state_dict[k]))} vs model {list(own[k].shape)}"
              for k in own if k in state_dict and list(np.shape(state_dict[k])) != list(own[k].shape)]
    def listing(items, limit=8):
        more = f", ... ({len(items)} in all)" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    problems = []
    if missing:
        problems.append("missing keys: " + listing(missing))
    if unexpected:
        problems.append("unexpected keys: " + listing(unexpected))
    if shaped:
        problems.append("shape mismatch: " + listing(shaped))
    if problems:
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: " + "; ".join(problems))


def match_dtypes(model, state_dict, path):
    """state_dict with floating weights cast to the model's dtype (float16 or bfloat16 releases, float64
    exports; said once); integer or boolean values where the model holds floats raise, naming the keys."""
    own = model.state_dict()
    wrong = [f"{k} ({np.asarray(v).dtype})" for k, v in state_dict.items()
             if k in own and own[k].dtype in (paddle.float32, paddle.float64) and np.asarray(v).dtype.kind in "iub"]
    if wrong:
        raise CheckpointError(f"{path}: integer or boolean values where the model has float weights: "
                              + ", ".join(wrong[:8]))
    out, cast = {}, set()
    for k, v in state_dict.items():
        v = np.asarray(v)
        target = "float32" if k not in own or own[k].dtype == paddle.float32 else "float64"
        if v.dtype.kind == "f" and v.dtype != target:
            cast.add(str(v.dtype))
            v = v.astype(target)
        out[k] = v
    if cast:
        print(f"{path}: {', '.join(sorted(cast))} weights cast to the model's float32")
    return out


def load_model_weights(model, state_dict, path, allow_missing=()):
    """Strictly load state_dict into model (keys in allow_missing may be absent; extra keys are ignored
    only when allow_missing is given, as for --finetune). Floating weights of another precision are cast."""
    check_state_dict(model, state_dict, path, allow_missing, ignore_unexpected=bool(allow_missing))
    state_dict = match_dtypes(model, state_dict, path)
    own = model.state_dict()
    with warnings.catch_warnings():  # keys absent on purpose were checked above
        warnings.filterwarnings("ignore", message="Skip loading")
        model.set_state_dict({k: v for k, v in state_dict.items() if k in own})


def to_numpy(obj):
    if isinstance(obj, paddle.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return type(obj)((k, to_numpy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_numpy(v) for v in obj)
    return obj


def save_file(obj, path):
    """paddle.save through a temporary file in the same folder, then an atomic rename."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        paddle.save(to_numpy(obj), tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_pretrained(model, path, fc_norm_from_norm=False):
    """Start fine-tuning or linear probing from a pre-trained (or fine-tuned) checkpoint.

    Drops a head of another shape and interpolates pos_embed to the model's grid; decoder and other
    extra keys are ignored. The only keys the model may miss are the head and, with global pooling, fc_norm.
    With fc_norm_from_norm a missing fc_norm starts from the encoder's final norm. Returns the list of keys
    left at their initial values.
    """
    from util.pos_embed import interpolate_pos_embed

    state_dict = dict(load_checkpoint(path)["model"])
    own = model.state_dict()
    if fc_norm_from_norm and "fc_norm.weight" in own and "fc_norm.weight" not in state_dict \
            and "norm.weight" in state_dict:
        print("fc_norm starts from the encoder's final norm")
        state_dict["fc_norm.weight"], state_dict["fc_norm.bias"] = state_dict["norm.weight"], state_dict["norm.bias"]
    for k in ("head.weight", "head.bias"):
        if k in state_dict and k in own and list(np.shape(state_dict[k])) != list(own[k].shape):
            print(f"Removing key {k} from pretrained checkpoint")
            del state_dict[k]
    interpolate_pos_embed(model, state_dict)
    allowed = {k for k in own if k.startswith("head.") or (k.startswith("fc_norm.") and model.global_pool)}
    load_model_weights(model, state_dict, path, allow_missing=allowed)
    return sorted(k for k in own if k not in state_dict)


def optimizer_state(optimizer, model):
    """Optimizer accumulators keyed by structured parameter name (Paddle's own keys depend on creation order)."""
    names = {p.name: n for n, p in model.named_parameters()}
    state = {}
    for acc, per_param in optimizer._accumulators.items():
        for pname, value in per_param.items():
            state.setdefault(names[pname], {})[acc] = value.numpy()
    return {"state": state}


def _torch_adam_state(opt_sd, optimizer, names, path):
    """PyTorch (Adam/AdamW) optimizer state -> accumulators, matching parameters by their order in the groups."""
    ours = [p for g in optimizer._param_groups for p in g["params"]]
    theirs = [i for g in opt_sd.get("param_groups", []) for i in g["params"]]
    if len(ours) != len(theirs):
        raise CheckpointError(f"{path}: optimizer holds {len(theirs)} parameters, this run's optimizer {len(ours)}")
    state = {}
    for p, i in zip(ours, theirs):
        s = opt_sd.get("state", {}).get(i)
        if not s:
            continue
        if "exp_avg" not in s:
            raise CheckpointError(f"{path}: optimizer state is not Adam's (keys: {', '.join(s)})")
        step = float(np.asarray(s["step"]))
        m, v = s["exp_avg"], s["exp_avg_sq"]
        if m.ndim == 2 and names[p.name].endswith(".weight"):  # Linear: PyTorch [out, in]
            m, v = m.T, v.T
        state[names[p.name]] = {
            "moment1": m, "moment2": v,
            "beta1_pow_acc": np.array([optimizer._beta1 ** (step + 1)], np.float32),  # Paddle: beta^(t+1) after t steps
            "beta2_pow_acc": np.array([optimizer._beta2 ** (step + 1)], np.float32)}
    return state


def load_optimizer_state(optimizer, model, ckpt, path):
    """Restore accumulators saved by optimizer_state, or converted from an official PyTorch checkpoint."""
    params = dict(model.named_parameters())
    names = {p.name: n for n, p in params.items()}
    opt_sd = ckpt["optimizer"]
    state = _torch_adam_state(opt_sd, optimizer, names, path) if ckpt.get("torch") else opt_sd.get("state", {})
    unknown = [n for n in state if n not in params]
    if unknown:
        raise CheckpointError(f"{path}: optimizer state for parameters this model lacks: {', '.join(unknown)}")
    managed = {p.name for g in optimizer._param_groups for p in (g["params"] if isinstance(g, dict) else [g])}
    targets = [params[n] for n in state if params[n].name in managed]
    optimizer._create_accumulators(paddle.static.default_main_program().global_block(), targets)
    for p in targets:
        for acc, value in state[names[p.name]].items():
            if acc not in optimizer._accumulators:
                raise CheckpointError(f"{path}: optimizer state '{acc}' does not belong to {type(optimizer).__name__}")
            target = optimizer._accumulators[acc][p.name]
            if list(np.shape(value)) != list(target.shape):
                raise CheckpointError(f"{path}: optimizer state {names[p.name]}/{acc} has shape "
                                      f"{list(np.shape(value))}, expected {list(target.shape)}")
            target.set_value(np.asarray(value, dtype=np.float32))
