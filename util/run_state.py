"""Training checkpoints: rank 0 saves the run's state every epoch; a rerun finds it and resumes there."""
import json
import os

from util import checkpoint
from util.dist import all_gather, from_main_process, get_world_size, is_main_process
from util.run_dir import RunDirError


def save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, best, tag=None, iteration=0, meters=None):
    """Rank 0 writes {output_dir}/checkpoint-{tag or epoch}.pd: model, optimizer, epoch (the last complete
    one), iteration and every rank's meters (when stopped inside the next epoch), scaler, the best test top-1
    so far and its epoch, the iterations rewinds left out, args. A failed write leaves the earlier
    checkpoints as they were."""
    if not (args.output_dir and is_main_process()):
        return
    path = os.path.join(args.output_dir, f"checkpoint-{tag if tag is not None else epoch}.pd")
    try:
        checkpoint.save_file({
            "model": model_without_ddp.state_dict(),
            "optimizer": checkpoint.optimizer_state(optimizer, model_without_ddp),
            "epoch": epoch,
            "iteration": iteration,
            "scaler": loss_scaler.state_dict(),
            "best": best,
            "meters": meters,
            "skipped": getattr(args, "skipped", []),
            "args": vars(args),
        }, path)
    except OSError as e:
        raise RunDirError(f"{path}: cannot write the checkpoint ({e.strerror or e}); the earlier checkpoints "
                          "are intact") from None


def save_epoch(args, epoch, model_without_ddp, optimizer, loss_scaler, best):
    """checkpoint-{epoch}.pd every --save_freq epochs and at the end; checkpoint-last.pd every epoch."""
    if epoch % args.save_freq == 0 or epoch + 1 == args.epochs:
        save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, best)
    save_model(args, epoch, model_without_ddp, optimizer, loss_scaler, best, tag="last")


def save_rewind_point(args, model_without_ddp, optimizer, loss_scaler, resumed):
    """--on_nonfinite rewind: checkpoint-last.pd holds the state training starts from (unless it was resumed
    from that file), so that a failure before the first epoch ends has a state to go back to."""
    last = os.path.join(args.output_dir, "checkpoint-last.pd")
    if os.path.abspath(args.resume or "") != os.path.abspath(last):
        save_model(args, args.start_epoch - 1, model_without_ddp, optimizer, loss_scaler, resumed["best"],
                   tag="last", iteration=args.start_iter, meters=resumed["meters"])


def newest_checkpoint(output_dir):
    """The newest training checkpoint in output_dir that is readable and whose every field is sound (another
    is reported and passed over, so that the previous one is used)."""
    if not output_dir or not os.path.isdir(output_dir):
        return None, None
    names = [n for n in os.listdir(output_dir) if n.startswith("checkpoint-") and n.endswith(".pd")]
    for name in sorted(names, key=lambda n: os.path.getmtime(os.path.join(output_dir, n)), reverse=True):
        path = os.path.join(output_dir, name)
        try:
            ckpt = checkpoint.load_checkpoint(path)
            if "optimizer" not in ckpt and "epoch" not in ckpt:
                continue
            checkpoint.check_training_state(ckpt, path)
        except checkpoint.CheckpointError as e:
            print(f"Warning: skipping unusable checkpoint: {e}")
            continue
        return path, ckpt
    return None, None


def load_model(args, model_without_ddp, optimizer, loss_scaler, iterations=None):
    """--resume (or, with --auto_resume, the newest checkpoint in --output_dir as rank 0 sees it): load the
    model strictly; with optimizer and epoch (and not --eval), continue training where it stopped. Returns
    {'best': the best test top-1 so far and its epoch (0 and None for a new run), 'meters': every rank's
    meters of a stopped epoch}. Sets args.start_epoch, args.start_iter and args.skipped (the iterations
    rewinds left out, util.nonfinite). `iterations` (the epoch's length here) bounds a position inside an
    epoch."""
    args.start_iter = 0
    args.skipped = []
    best = {"acc1": 0.0, "epoch": None}
    resumed = {"best": best, "meters": None}
    path, ckpt = args.resume, None
    if not path and getattr(args, "auto_resume", False) and not getattr(args, "eval", False):
        path, ckpt = newest_checkpoint(args.output_dir) if is_main_process() else (None, None)
        path = from_main_process(path)
        if path:
            print(f"Auto-resume from {path}")
    if not path:
        if not getattr(args, "eval", False):
            truncate_log(args, args.start_epoch)  # lines a run killed before its first checkpoint left
        return resumed
    args.resume = path
    training = not getattr(args, "eval", False)
    ckpt = read_on_every_rank(path, ckpt, training)
    checkpoint.load_model_weights(model_without_ddp, ckpt["model"], path)
    print(f"Resume checkpoint {path}")
    if ("optimizer" in ckpt or "epoch" in ckpt) and training:
        checkpoint.load_optimizer_state(optimizer, model_without_ddp, ckpt, path)
        args.start_epoch = int(ckpt["epoch"]) + 1
        args.start_iter = position_in_epoch(ckpt, args, path)
        if iterations is not None and args.start_iter >= iterations:
            raise checkpoint.CheckpointError(
                f"{path}: iteration {args.start_iter} lies beyond epoch {args.start_epoch}'s {iterations} iterations "
                "with this dataset, --batch_size and process count")
        if "scaler" in ckpt:
            loss_scaler.load_state_dict(ckpt["scaler"])
        print("With optim & sched!" + (f" Continuing epoch {args.start_epoch} at iteration {args.start_iter}."
                                       if args.start_iter else ""))
        args.skipped = [list(s) for s in ckpt.get("skipped", [])]
        truncate_log(args, args.start_epoch)
        resumed = {"best": dict(ckpt.get("best") or best), "meters": ckpt.get("meters")}
        if args.start_iter and resumed["meters"] is not None and len(resumed["meters"]) != get_world_size():
            raise checkpoint.CheckpointError(
                f"{path}: stopped inside epoch {args.start_epoch} with {len(resumed['meters'])} process(es); "
                f"resume it with as many (this run has {get_world_size()})")
    return resumed

def position_in_epoch(ckpt, args, path):
    """The batch at which a run stopped inside an epoch continues: the same samples seen whatever this run's
    --batch_size, or a one-line error when no batch boundary (and update step) of this run falls there."""
    iteration = int(ckpt.get("iteration", 0))
    saved = ckpt.get("args").get("batch_size") if isinstance(ckpt.get("args"), dict) else None
    if not iteration or not isinstance(saved, int) or saved == args.batch_size:
        return iteration
    samples = iteration * saved
    if samples % args.batch_size or (samples // args.batch_size) % args.accum_iter:
        raise checkpoint.CheckpointError(
            f"{path}: stopped inside epoch {int(ckpt['epoch']) + 1} after {samples} samples per process "
            f"(--batch_size {saved}), which is not a whole number of optimizer steps at --batch_size "
            f"{args.batch_size} x --accum_iter {args.accum_iter}; resume with --batch_size {saved}")
    print(f"--batch_size {args.batch_size} (the stopped run had {saved}): continuing after the same {samples} "
          "samples per process")
    return samples // args.batch_size


def read_on_every_rank(path, ckpt=None, training=True):
    """Read the checkpoint on every rank (with training, check its every field) and check that all ranks read
    the same training position, so that no rank starts elsewhere (e.g. a node-local --output_dir that other
    nodes do not see)."""
    error = None
    try:
        ckpt = checkpoint.load_checkpoint(path) if ckpt is None else ckpt
        if training and ("optimizer" in ckpt or "epoch" in ckpt):
            checkpoint.check_training_state(ckpt, path)
    except checkpoint.CheckpointError as e:
        error = str(e)
    if get_world_size() == 1:
        if error:
            raise checkpoint.CheckpointError(error)
        return ckpt
    errors = all_gather(error)
    failed = [str(r) for r, e in enumerate(errors) if e]
    if len(failed) == len(errors) and len(set(errors)) == 1:  # the same file, unusable on every rank
        raise checkpoint.CheckpointError(errors[0])
    if failed:
        raise checkpoint.CheckpointError(
            f"rank(s) {', '.join(failed)} cannot read the checkpoint rank 0 resumes from ({errors[int(failed[0])]}); "
            "--output_dir must be a folder every node sees (a shared filesystem)")
    positions = all_gather((repr(ckpt.get("epoch")), repr(ckpt.get("iteration", 0))))
    if len(set(positions)) > 1:
        raise checkpoint.CheckpointError(
            f"{path}: the ranks read different checkpoints under this name (epoch, iteration by rank: {positions}); "
            "--output_dir must be one folder that every node shares")
    return ckpt

def truncate_log(args, start_epoch):
    """Drop log.txt lines of epochs that will run again, so that every epoch appears once, and lines that are
    not whole JSON records (a write cut off by a kill), saying so."""
    path = os.path.join(args.output_dir, "log.txt") if args.output_dir else ""
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
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
