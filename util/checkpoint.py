"""The training checkpoint, in one place: what a run writes every epoch (write), the checks of every field
before anything is loaded (check_training_state), reading the state back (read_state, and the optimizer's
accumulators by parameter name), finding the newest usable one and making every rank agree on it.

Format 2 (FORMAT), a dict: 'format'; 'model' (Paddle-layout weights); 'optimizer' ({'state': {parameter
name: {accumulator: array}}}); 'epoch' (the last complete epoch); 'iteration' (the batch of the next epoch a
stop signal broke it off after, else 0); 'scaler'; 'best' ({'acc1', 'epoch'}); 'meters' (every rank's
meters of that broken-off epoch, else None); 'skipped' ([epoch, first, last] iterations rewinds left out);
'args' (the flags as given, util.args.Flags); 'samples' (the training set's size); 'classes' (classifiers:
the training class names).
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


def write(path, model, optimizer, loss_scaler, flags, state, record=None):
    """Write a training checkpoint of `state` (util.run_state.RunState) and `record` ({'samples', 'classes'})
    to path, atomically: a failed write leaves the earlier checkpoints as they were (RunDirError)."""
    ckpt = {"format": FORMAT, "model": model.state_dict(), "optimizer": optimizer_state(optimizer, model),
            "epoch": state.epoch - 1, "iteration": state.iteration, "scaler": loss_scaler.state_dict(),
            "best": state.best, "meters": state.meters, "skipped": state.skipped, "args": vars(flags)}
    ckpt.update(record or {})
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
    samples, optimizer, scaler, best, meters, skipped, args, classes) whose type or range no run of this project writes,
    before anything is loaded from it."""
    def bad(key, why):
        raise CheckpointError(f"{path}: '{key}' {why}; not a checkpoint to continue training from")

    version = ckpt.get("format", 1)
    if not _is_int(version) or version < 1:
        bad("format", f"is {version!r}, not a format version")
    if version > FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {version} is newer than this version of the code reads "
                              f"(formats 1 to {FORMAT}); update the code to continue this run")
    for key, default, least, what in (("epoch", None, -1, "an epoch number"), ("iteration", 0, 0, "a batch number"),
                                      ("samples", 1, 1, "a number of images")):
        value = ckpt.get(key, default)
        if not _is_int(value) or value < least:
            bad(key, f"is {value!r}, not {what}")
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
    opt_sd = ckpt.get("optimizer")
    if not isinstance(opt_sd, dict):
        raise CheckpointError(f"{path}: 'optimizer' is {type(opt_sd).__name__}, not a dict")
    problem = None if ckpt.get("torch") else _state_problem(opt_sd.get("state", {}))
    if problem:
        raise CheckpointError(f"{path}: 'optimizer' {problem}")
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


def split_of(flags):
    """(batch_size, accum_iter, processes) of a run's flags (a dict or Flags), or None where one is missing
    (an official checkpoint without world_size, say)."""
    get = flags.get if isinstance(flags, dict) else lambda k: getattr(flags, k, None)
    split = (get("batch_size"), get("accum_iter") or 1, get("world_size"))
    return split if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in split) else None


def check_effective_batch(ckpt, flags, path):
    """A resumed run keeps the effective batch (batch_size x accum_iter x processes) it was trained with,
    whatever its number of processes: else CheckpointError naming the --batch_size x --accum_iter that keep it
    here. A checkpoint that does not record its split continues unchecked (as every resume did before)."""
    saved = split_of(recorded_flags(ckpt))
    if saved is None:
        return
    before, now = saved[0] * saved[1] * saved[2], flags.batch_size * flags.accum_iter * flags.world_size
    if before == now:
        return
    per_process = before // flags.world_size if before % flags.world_size == 0 else 0
    options = sorted((b for b in range(1, per_process + 1) if per_process % b == 0),
                     key=lambda b: (abs(np.log(b / flags.batch_size)), -b))[:3]
    keep = (", ".join(f"--batch_size {b} --accum_iter {per_process // b}" for b in options) if options
            else "no --batch_size x --accum_iter does")
    raise CheckpointError(
        f"{path}: trained with an effective batch of {before} (--batch_size {saved[0]} x --accum_iter {saved[1]} x "
        f"{saved[2]} process(es)), this run's is {now} (--batch_size {flags.batch_size} x --accum_iter "
        f"{flags.accum_iter} x {flags.world_size}); with {flags.world_size} process(es) to keep it: {keep}")


def accum_iter_to_keep(flags, world_size):
    """--accum_iter auto: the accumulation that keeps the effective batch of the checkpoint this run resumes
    (--resume, else with --auto_resume the newest in --output_dir) at this --batch_size and process count; 1
    for a new run. CheckpointError when the checkpoint records no split or no accumulation keeps its batch.
    Rank 0 reads the checkpoint and tells the others, which read it once, when they resume (a large run's
    ranks would otherwise each read it twice)."""
    accum, error = from_main_process(_accum_iter_of_rank_0(flags, world_size) if is_main_process() else None)
    if error:
        raise CheckpointError(error)
    return accum


def _accum_iter_of_rank_0(flags, world_size):
    """(accumulation, None) or (None, the error) for accum_iter_to_keep, read on this process alone."""
    try:
        path, ckpt = flags.resume, None
        if not path and flags.auto_resume:
            path, ckpt = newest_checkpoint(flags.output_dir)
        if not path:
            print("--accum_iter auto: a new run, 1")
            return 1, None
        ckpt = load_checkpoint(path) if ckpt is None else ckpt
        if is_training_checkpoint(ckpt):
            check_training_state(ckpt, path)
        saved = split_of(recorded_flags(ckpt))
        if saved is None or not is_training_checkpoint(ckpt):
            raise CheckpointError(f"{path}: records no effective batch to keep (--batch_size, --accum_iter, "
                                  "world_size); give --accum_iter")
        before, micro = saved[0] * saved[1] * saved[2], flags.batch_size * world_size
        if before % micro:
            raise CheckpointError(f"{path}: its effective batch of {before} is not a multiple of --batch_size "
                                  f"{flags.batch_size} x {world_size} process(es); choose a --batch_size that "
                                  f"divides {before // world_size if before % world_size == 0 else before}")
    except CheckpointError as e:
        return None, str(e)
    print(f"--accum_iter auto: {before // micro} (keeps the effective batch of {before} of {path})")
    return before // micro, None


def position_in_epoch(ckpt, flags, path):
    """The batch at which a run stopped inside an epoch continues: after the same samples of the epoch (its
    processes together) whatever this run's --batch_size and number of processes, or a one-line error when no
    optimizer step of this run ends there."""
    iteration = int(ckpt.get("iteration", 0))
    saved = split_of(recorded_flags(ckpt)) or (recorded_flags(ckpt).get("batch_size"), 1, flags.world_size)
    batch, processes = saved[0], saved[2]
    if not iteration or not isinstance(batch, int) or (batch, processes) == (flags.batch_size, flags.world_size):
        return iteration
    samples, micro = iteration * batch * processes, flags.batch_size * flags.world_size
    if samples % micro or (samples // micro) % flags.accum_iter:
        raise CheckpointError(
            f"{path}: stopped inside epoch {int(ckpt['epoch']) + 1} after {samples} samples ({iteration} x "
            f"--batch_size {batch} x {processes} process(es)), which is not a whole number of optimizer steps at "
            f"--batch_size {flags.batch_size} x --accum_iter {flags.accum_iter} x {flags.world_size} process(es); "
            f"resume with --batch_size {batch}")
    print(f"--batch_size {flags.batch_size} x {flags.world_size} process(es) (the stopped run had {batch} x "
          f"{processes}): continuing after the same {samples} samples of the epoch")
    return samples // micro
