"""A training run's state (RunState), owned by the epoch loop (util.epochs) and written into and read back from
checkpoints by util.checkpoint; resuming: which checkpoint a run continues from and what it restores."""
import dataclasses
import json
import os

from util import checkpoint
from util.dist import get_world_size, is_main_process
from util.errors import CheckpointError
from util.files import atomic_write
from util.image_index import class_difference
from util.weights import load_model_weights


@dataclasses.dataclass
class RunState:
    """Where a training run stands. `epoch` is the next epoch to train and `iteration` the batch of it to
    continue from (a run a stop signal broke off inside it, whose every rank's meters are `meters`); `best`
    the best test top-1 and its epoch; `skipped` the [epoch, first, last] iterations rewinds left out
    (util.nonfinite); `resumed_from` the checkpoint it continued from."""
    epoch: int
    iteration: int = 0
    best: dict = dataclasses.field(default_factory=lambda: {"acc1": 0.0, "epoch": None})
    skipped: list = dataclasses.field(default_factory=list)
    meters: list = None
    resumed_from: str = None

    def left_out(self, epoch):
        """The iterations of `epoch` that rewinds left out."""
        return {i for e, first, last in self.skipped if e == epoch for i in range(first, last + 1)}


def checkpoint_path(flags, tag):
    return os.path.join(flags.output_dir, f"checkpoint-{tag}.pd")


def save(flags, tag, model, optimizer, loss_scaler, state, record=None):
    """Rank 0 writes {output_dir}/checkpoint-{tag}.pd of `state` and `record` (util.checkpoint.write)."""
    if flags.output_dir and is_main_process():
        checkpoint.write(checkpoint_path(flags, tag), model, optimizer, loss_scaler, flags, state, record)


def save_epoch(flags, epoch, *parts):
    """After `epoch`: checkpoint-{epoch}.pd every --save_freq epochs and at the end; checkpoint-last.pd every
    epoch. `parts`: model, optimizer, loss scaler, state, record (as save)."""
    if epoch % flags.save_freq == 0 or epoch + 1 == flags.epochs:
        save(flags, epoch, *parts)
    save(flags, "last", *parts)


def save_rewind_point(flags, *parts):
    """--on_nonfinite rewind: checkpoint-last.pd holds the state training starts from (unless it was resumed
    from that file), so that a failure before the first epoch ends has a state to go back to."""
    state = parts[3]
    if os.path.abspath(state.resumed_from or "") != os.path.abspath(checkpoint_path(flags, "last")):
        save(flags, "last", *parts)


def check_classes(ckpt, path, classes, classes_from):
    """A classifier checkpoint that records other training classes than `classes` (the class folders of
    `classes_from`) is refused: its label i would be scored as, or trained towards, another class."""
    recorded = checkpoint.recorded_classes(ckpt)
    if recorded is not None and classes is not None and list(recorded) != list(classes):
        raise CheckpointError(f"{path}: trained on other classes than the class folders of {classes_from} "
                              f"({class_difference(list(classes), list(recorded))})")


def load_weights(flags, model, classes=None, classes_from=None):
    """--eval: the --resume checkpoint's weights, strictly (its training state is not needed), for a dataset of
    the classes it was trained on (`classes`, those of `classes_from`)."""
    ckpt = checkpoint.read_on_every_rank(flags.resume, training=False)
    check_classes(ckpt, flags.resume, classes, classes_from)
    load_model_weights(model, ckpt["model"], flags.resume)
    print(f"Resume checkpoint {flags.resume}")


def resume(flags, model, optimizer, loss_scaler, iterations=None, path=None, samples=None, classes=None,
           classes_from=None):
    """The state a run starts from: that of `path` (a rewind's checkpoint-last.pd), --resume, or with
    --auto_resume the newest usable checkpoint in --output_dir as rank 0 sees it; else a new run at
    --start_epoch. The weights load strictly; a training checkpoint also restores the optimizer and scaler.
    `iterations` (the epoch's length here) bounds a position inside an epoch, which also needs the training
    set of the `samples` it stopped in; a classifier continues on the `classes` (of `classes_from`) it was
    trained on."""
    ckpt = None
    path = path or flags.resume
    if not path and flags.auto_resume:
        path, ckpt = checkpoint.auto_resume_path(flags.output_dir)
        if path:
            print(f"Auto-resume from {path}")
    if not path:
        truncate_log(flags.output_dir, flags.start_epoch)  # lines a run killed before its first checkpoint left
        return RunState(epoch=flags.start_epoch)
    ckpt = checkpoint.read_on_every_rank(path, ckpt)
    check_classes(ckpt, path, classes, classes_from)
    if checkpoint.is_training_checkpoint(ckpt):
        checkpoint.check_effective_batch(ckpt, flags, path)
    load_model_weights(model, ckpt["model"], path)
    print(f"Resume checkpoint {path}")
    if not checkpoint.is_training_checkpoint(ckpt):
        return RunState(epoch=flags.start_epoch, resumed_from=path)
    checkpoint.load_optimizer_state(optimizer, model, ckpt, path)
    state = RunState(**{**checkpoint.read_state(ckpt), "resumed_from": path})
    state.iteration = checkpoint.position_in_epoch(ckpt, flags, path)
    if samples is not None and ckpt.get("samples", samples) != samples:
        if state.iteration:
            raise CheckpointError(f"{path}: stopped inside epoch {state.epoch} of a training set of {ckpt['samples']} "
                                  f"images, which now holds {samples}: that epoch's order is gone; restore the "
                                  f"images, or resume from the end of epoch {state.epoch - 1}")
        print(f"{path}: the training set held {ckpt['samples']} images, it now holds {samples}")
    saved = checkpoint.split_of(checkpoint.recorded_flags(ckpt))
    if saved is not None and saved[:3:2] != (flags.batch_size, flags.world_size):
        state = resplit(state, saved[0] * saved[2], flags.batch_size * flags.world_size)
    if iterations is not None and state.iteration >= iterations:
        raise CheckpointError(f"{path}: iteration {state.iteration} lies beyond epoch {state.epoch}'s {iterations} "
                              "iterations with this dataset, --batch_size and process count")
    if "scaler" in ckpt:
        loss_scaler.load_state_dict(ckpt["scaler"])
    print("With optim & sched!" + (f" Continuing epoch {state.epoch} at iteration {state.iteration}."
                                   if state.iteration else ""))
    if state.iteration and state.meters is not None and len(state.meters) != get_world_size():
        raise CheckpointError(f"{path}: stopped inside epoch {state.epoch} with {len(state.meters)} process(es) "
                              f"and no record of its batch split; resume it with as many (this run has "
                              f"{get_world_size()})")
    truncate_log(flags.output_dir, state.epoch)
    return state


def resplit(state, before, now):
    """The state of a run that continues with `now` samples per iteration (batch_size x processes) where it
    stopped with `before` (the effective batch kept): the iterations rewinds left out renumbered, and the
    meters of a stopped epoch regrouped for this run's processes (rank r takes the old ranks r, r + world
    size, ...; the epoch's averages over all ranks stay those of the stopped run)."""
    state.skipped = [[e, first * before // now, (last + 1) * before // now - 1] for e, first, last in state.skipped]
    if state.meters is not None and len(state.meters) != get_world_size():
        merged = [{} for _ in range(get_world_size())]
        for old, meters in enumerate(state.meters):
            for name, m in meters.items():
                s = merged[old % get_world_size()].setdefault(name, {"count": 0, "total": 0.0, "values": []})
                s["count"], s["total"], s["values"] = s["count"] + m["count"], s["total"] + m["total"], [
                    *s["values"], *m["values"]]
        state.meters = merged
    return state


def truncate_log(output_dir, start_epoch):
    """Drop log.txt lines of epochs that will run again, so that every epoch appears once, and lines that are
    not whole JSON records (a write cut off by a kill), saying so."""
    path = os.path.join(output_dir, "log.txt") if output_dir else ""
    if not (path and os.path.isfile(path) and is_main_process()):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.strip()]
    keep = []
    for n, line in enumerate(lines, 1):
        try:
            epoch = json.loads(line)["epoch"]
            if not isinstance(epoch, int):
                raise ValueError
        except (ValueError, TypeError, KeyError):
            print(f"{path}: dropping line {n}, not a complete log record (a write cut off by a kill?)")
            continue
        if epoch < start_epoch:
            keep.append(line if line.endswith("\n") else line + "\n")
    if keep != lines:
        with atomic_write(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(keep)
