"""Checkpoints: reading .pd and official .pth files (through util.safe_pickle: no pickled code ever runs), the
official layout mapped to Paddle's, checks against a model, atomic writes, optimizer state by parameter name."""
import collections
import hashlib
import os
import types
import warnings
import zipfile

import numpy as np
import paddle

from util import compat
from util.safe_pickle import SafeUnpickler, UnsafePickleError, read_torch


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read or does not fit the model."""


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v):
    return (_is_int(v) or isinstance(v, (float, np.floating))) and np.isfinite(v)


def _state_problem(state):
    """Why an optimizer 'state' entry is not {parameter name: {accumulator: array}}, or None."""
    if not isinstance(state, dict):
        return f"'state' is {type(state).__name__}, not a dict"
    for name, accs in state.items():
        if not isinstance(accs, dict) or not all(isinstance(v, np.ndarray) for v in accs.values()):
            return f"'state' of {name!r} is not a dict of arrays"
    return None


def _meters_problem(meters):
    if not isinstance(meters, list):
        return f"is {type(meters).__name__}, not a list (one entry per process)"
    for rank in meters:
        if not isinstance(rank, dict):
            return f"holds {type(rank).__name__}, not a dict of meters"
        for name, m in rank.items():
            if not (isinstance(m, dict) and _is_int(m.get("count")) and m["count"] >= 0 and
                    _is_number(m.get("total")) and isinstance(m.get("values"), list) and
                    all(_is_number(v) for v in m["values"])):
                return f"meter {name!r} is not {{'count', 'total', 'values'}}"
    return None


def check_training_state(ckpt, path):
    """Raise CheckpointError naming the first field of a training checkpoint (epoch, iteration, optimizer,
    scaler, best, meters, skipped, args) whose type or range no run of this project writes, before anything is
    loaded from it."""
    def bad(key, why):
        raise CheckpointError(f"{path}: '{key}' {why}; not a checkpoint to continue training from")

    epoch = ckpt.get("epoch")
    if not _is_int(epoch) or epoch < -1:
        bad("epoch", f"is {epoch!r}, not an epoch number")
    iteration = ckpt.get("iteration", 0)
    if not _is_int(iteration) or iteration < 0:
        bad("iteration", f"is {iteration!r}, not a batch number")
    opt = ckpt.get("optimizer")
    if not isinstance(opt, dict):
        bad("optimizer", f"is {type(opt).__name__}, not a dict")
    if ckpt.get("torch"):
        if not isinstance(opt.get("state", {}), dict) or not isinstance(opt.get("param_groups", []), list) or not all(
                isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt.get("param_groups", [])):
            bad("optimizer", "is not a PyTorch optimizer state_dict ('state', 'param_groups')")
    elif _state_problem(opt.get("state", {})):
        bad("optimizer", _state_problem(opt.get("state", {})))
    if not isinstance(ckpt.get("scaler", {}), dict):
        bad("scaler", f"is {type(ckpt['scaler']).__name__}, not a dict")
    best = ckpt.get("best")
    if best is not None and not (isinstance(best, dict) and _is_number(best.get("acc1"))
                                 and (best.get("epoch") is None or _is_int(best.get("epoch")))):
        bad("best", f"is {best!r}, not {{'acc1': number, 'epoch': epoch or None}}")
    if ckpt.get("meters") is not None and _meters_problem(ckpt["meters"]):
        bad("meters", _meters_problem(ckpt["meters"]))
    skipped = ckpt.get("skipped", [])
    if not (isinstance(skipped, list) and all(
            isinstance(s, list) and len(s) == 3 and all(_is_int(v) and v >= 0 for v in s) and s[1] <= s[2]
            for s in skipped)):
        bad("skipped", f"is {skipped!r}, not a list of [epoch, first, last] iterations")
    if not isinstance(ckpt.get("args", {}), dict):
        bad("args", f"is {type(ckpt['args']).__name__}, not a dict of flags")


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
    load_model_weights(model, state_dict, path, allow_missing=allowed, ignore_unexpected=True)
    return sorted(k for k in own if k not in state_dict)


def optimizer_state(optimizer, model):
    """Optimizer accumulators keyed by structured parameter name (Paddle's own keys depend on creation order)."""
    names = {p.name: n for n, p in model.named_parameters()}
    state = {}
    for acc, per_param in compat.accumulators(optimizer).items():
        for pname, value in per_param.items():
            state.setdefault(names[pname], {})[acc] = value.numpy()
    return {"state": state}


def _torch_adam_state(opt_sd, optimizer, names, path):
    """PyTorch (Adam/AdamW) optimizer state -> accumulators, matching parameters by their order in the groups."""
    ours = [p for params, _ in compat.param_groups(optimizer) for p in params]
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
    managed = {p.name for group, _ in compat.param_groups(optimizer) for p in group}
    targets = [params[n] for n in state if params[n].name in managed]
    compat.create_accumulators(optimizer, targets)
    for p in targets:
        for acc, value in state[names[p.name]].items():
            if acc not in compat.accumulators(optimizer):
                raise CheckpointError(f"{path}: optimizer state '{acc}' does not belong to {type(optimizer).__name__}")
            target = compat.accumulators(optimizer)[acc][p.name]
            if list(np.shape(value)) != list(target.shape):
                raise CheckpointError(f"{path}: optimizer state {names[p.name]}/{acc} has shape "
                                      f"{list(np.shape(value))}, expected {list(target.shape)}")
            # a tensor on the accumulator's own place: set_value of a NumPy array would move it to the current
            # device, and Adam keeps its beta powers on the CPU (read there, one kernel fewer per step on GPU)
            target.set_value(paddle.to_tensor(np.asarray(value, dtype=np.float32), place=target.place))
