"""The training checkpoint, in one place: what a run writes every epoch (write), the checks of every field
before anything is loaded (check_training_state), reading the state back (read_state, and the optimizer's
accumulators by parameter name), finding the newest usable one and making every rank agree on it.

Format 2 (FORMAT), a dict: 'format'; 'model' (Paddle-layout weights); 'optimizer' ({'state': {parameter
name: {accumulator: array}}}); 'epoch' (the last complete epoch); 'iteration' (the batch of the next epoch a
stop signal broke it off after, else 0); 'scaler'; 'best' ({'acc1', 'epoch'}); 'meters' (every rank's
meters of that broken-off epoch, else None); 'skipped' ([epoch, first, last] iterations rewinds left out);
'args' (the flags as given, util.args.Flags); 'classes' (classifiers: the training class names).
Format 1 (no 'format' key: this project's earlier files, the official releases) has the same fields, with the
classes inside 'args'; the official files lack iteration, best, meters and skipped."""
import os

import numpy as np
import paddle

from util import compat
from util.dist import all_gather, from_main_process, get_world_size, is_main_process
from util.errors import CheckpointError, RunDirError
from util.weights import load_checkpoint, save_file

FORMAT = 2


def write(path, model, optimizer, loss_scaler, flags, state, classes=None):
    """Write a training checkpoint of `state` (util.run_state.RunState) to path, atomically: a failed write
    leaves the earlier checkpoints as they were (RunDirError)."""
    ckpt = {"format": FORMAT, "model": model.state_dict(), "optimizer": optimizer_state(optimizer, model),
            "epoch": state.epoch - 1, "iteration": state.iteration, "scaler": loss_scaler.state_dict(),
            "best": state.best, "meters": state.meters, "skipped": state.skipped, "args": vars(flags)}
    if classes is not None:
        ckpt["classes"] = list(classes)
    try:
        save_file(ckpt, path)
    except OSError as e:
        raise RunDirError(f"{path}: cannot write the checkpoint ({e.strerror or e}); the earlier checkpoints "
                          "are intact") from None


def is_training_checkpoint(ckpt):
    """Whether ckpt holds a training state to continue from (not only weights)."""
    return "optimizer" in ckpt or "epoch" in ckpt


def read_state(ckpt):
    """The run state a checkpoint (checked by check_training_state) holds, as util.run_state.RunState's
    fields: the next epoch, the batch to continue it from, the best top-1, the skipped iterations, meters."""
    return {"epoch": int(ckpt["epoch"]) + 1, "iteration": int(ckpt.get("iteration", 0)),
            "best": dict(ckpt.get("best") or {"acc1": 0.0, "epoch": None}), "meters": ckpt.get("meters"),
            "skipped": [list(s) for s in ckpt.get("skipped", [])]}


def recorded_flags(ckpt):
    """The flags the checkpoint's run was given (a dict; empty when it records none)."""
    return ckpt.get("args") or {}


def recorded_classes(ckpt):
    """The training class names a classifier's checkpoint records, or None."""
    return ckpt.get("classes") or recorded_flags(ckpt).get("classes")


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
    """Raise CheckpointError naming the first field of a training checkpoint (format, epoch, iteration,
    optimizer, scaler, best, meters, skipped, args, classes) whose type or range no run of this project writes,
    before anything is loaded from it."""
    def bad(key, why):
        raise CheckpointError(f"{path}: '{key}' {why}; not a checkpoint to continue training from")

    version = ckpt.get("format", 1)
    if not _is_int(version) or version < 1:
        bad("format", f"is {version!r}, not a format version")
    if version > FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {version} is newer than this version of the code reads "
                              f"(formats 1 to {FORMAT}); update the code to continue this run")
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
    classes = ckpt.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        bad("classes", f"is {type(classes).__name__}, not a list of class names")


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
    state, (beta1, beta2) = {}, compat.adam_betas(optimizer)
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
            "beta1_pow_acc": np.array([beta1 ** (step + 1)], np.float32),  # Paddle: beta^(t+1) after t steps
            "beta2_pow_acc": np.array([beta2 ** (step + 1)], np.float32)}
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


def newest_checkpoint(output_dir):
    """The newest training checkpoint in output_dir that is readable and whose every field is sound (another
    is reported and passed over, so that the previous one is used)."""
    if not output_dir or not os.path.isdir(output_dir):
        return None, None
    names = [n for n in os.listdir(output_dir) if n.startswith("checkpoint-") and n.endswith(".pd")]
    for name in sorted(names, key=lambda n: os.path.getmtime(os.path.join(output_dir, n)), reverse=True):
        path = os.path.join(output_dir, name)
        try:
            ckpt = load_checkpoint(path)
            if not is_training_checkpoint(ckpt):
                continue
            check_training_state(ckpt, path)
        except CheckpointError as e:
            print(f"Warning: skipping unusable checkpoint: {e}")
            continue
        return path, ckpt
    return None, None


def auto_resume_path(output_dir):
    """(path, checkpoint) of the newest usable checkpoint in output_dir as rank 0 sees it (every rank gets
    rank 0's path, and only rank 0 the checkpoint it read)."""
    path, ckpt = newest_checkpoint(output_dir) if is_main_process() else (None, None)
    return from_main_process(path), ckpt


def read_on_every_rank(path, ckpt=None, training=True):
    """Read the checkpoint on every rank (with training, check its every field) and check that all ranks read
    the same training position, so that no rank starts elsewhere (e.g. a node-local --output_dir that other
    nodes do not see)."""
    error = None
    try:
        ckpt = load_checkpoint(path) if ckpt is None else ckpt
        if training and is_training_checkpoint(ckpt):
            check_training_state(ckpt, path)
    except CheckpointError as e:
        error = str(e)
    if get_world_size() == 1:
        if error:
            raise CheckpointError(error)
        return ckpt
    errors = all_gather(error)
    failed = [str(r) for r, e in enumerate(errors) if e]
    if len(failed) == len(errors) and len(set(errors)) == 1:  # the same file, unusable on every rank
        raise CheckpointError(errors[0])
    if failed:
        raise CheckpointError(
            f"rank(s) {', '.join(failed)} cannot read the checkpoint rank 0 resumes from ({errors[int(failed[0])]}); "
            "--output_dir must be a folder every node sees (a shared filesystem)")
    positions = all_gather((repr(ckpt.get("epoch")), repr(ckpt.get("iteration", 0))))
    if len(set(positions)) > 1:
        raise CheckpointError(
            f"{path}: the ranks read different checkpoints under this name (epoch, iteration by rank: {positions}); "
            "--output_dir must be one folder that every node shares")
    return ckpt


def position_in_epoch(ckpt, flags, path):
    """The batch at which a run stopped inside an epoch continues: the same samples seen whatever this run's
    --batch_size, or a one-line error when no batch boundary (and update step) of this run falls there."""
    iteration = int(ckpt.get("iteration", 0))
    saved = recorded_flags(ckpt).get("batch_size")
    if not iteration or not isinstance(saved, int) or saved == flags.batch_size:
        return iteration
    samples = iteration * saved
    if samples % flags.batch_size or (samples // flags.batch_size) % flags.accum_iter:
        raise CheckpointError(
            f"{path}: stopped inside epoch {int(ckpt['epoch']) + 1} after {samples} samples per process "
            f"(--batch_size {saved}), which is not a whole number of optimizer steps at --batch_size "
            f"{flags.batch_size} x --accum_iter {flags.accum_iter}; resume with --batch_size {saved}")
    print(f"--batch_size {flags.batch_size} (the stopped run had {saved}): continuing after the same {samples} "
          "samples per process")
    return samples // flags.batch_size
