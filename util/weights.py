"""Weight files of any origin (this project's .pd, the official .pth releases, bare state_dicts) read without
running pickled code (util.safe_pickle), mapped to Paddle's layout and fitted strictly to a model."""
import collections
import os
import types
import warnings
import zipfile

import numpy as np
import paddle

from util.errors import CheckpointError, UnsafePickleError
from util.files import atomic_write
from util.safe_pickle import SafeUnpickler, read_torch


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
            return read_torch(path), True
        with open(path, "rb") as f:
            return _unwrap(SafeUnpickler(f, path).load()), False
    except UnsafePickleError as e:
        raise CheckpointError(str(e)) from None
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
    if not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: 'model' is {type(ckpt['model']).__name__}, not a dict of weights")
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


def load_model_weights(model, state_dict, path, allow_missing=(), ignore_unexpected=False):
    """Strictly load state_dict into model (keys in allow_missing may be absent; extra keys are ignored
    only with ignore_unexpected, as for --finetune). Floating weights of another precision are cast."""
    check_state_dict(model, state_dict, path, allow_missing, ignore_unexpected)
    state_dict = match_dtypes(model, state_dict, path)
    own = model.state_dict()
    with warnings.catch_warnings():  # keys absent on purpose were checked above
        warnings.filterwarnings("ignore", message="Skip loading")
        model.set_state_dict({k: v for k, v in state_dict.items() if k in own})


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
    load_model_weights(model, state_dict, path, allow_missing=allowed, ignore_unexpected=True)
    return sorted(k for k in own if k not in state_dict)


def to_numpy(obj):
    if isinstance(obj, paddle.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return type(obj)((k, to_numpy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_numpy(v) for v in obj)
    return obj


def save_file(obj, path):
    """paddle.save of obj (tensors as arrays), atomically (util.files.atomic_write)."""
    with atomic_write(path) as tmp:
        paddle.save(to_numpy(obj), tmp)
