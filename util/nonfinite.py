"""A loss or weights that stop being finite: the official stop (--on_nonfinite stop), or (rewind) every rank
goes back to checkpoint-last.pd and leaves out the optimizer step that failed.

Skipping that step's batch (as large-model training does on a loss spike) keeps the recipe: the same
learning rate, precision and batch order, one batch fewer. A replay from the checkpoint draws what the
first pass drew, so anything but leaving the batch out would fail again at the same place."""
import math
import os

import paddle

from util import compat
from util.dist import get_rank, get_world_size
from util.errors import NonFiniteError

INJECT_VAR = "MAE_INJECT_NONFINITE"


def injection():
    """(epoch, step, rank or None) from MAE_INJECT_NONFINITE=EPOCH:STEP[:RANK], a testing aid that makes that
    step's loss NaN once per process; None when unset."""
    value = os.environ.get(INJECT_VAR, "")
    if not value:
        return None
    parts = value.split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
        raise ValueError(f"{INJECT_VAR}={value!r}: expected EPOCH:STEP or EPOCH:STEP:RANK (non-negative integers)")
    numbers = [int(p) for p in parts]
    return numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else None


LOSS_HOOKS = []  # callables (loss, epoch, step) -> loss, installed from outside the step (install_injection)


def through_hooks(loss, epoch, step):
    """The step's loss after every installed hook (none in a normal run)."""
    for hook in LOSS_HOOKS:
        loss = hook(loss, epoch, step)
    return loss


def install_injection(epoch, step, rank=None):
    """A hook that makes the loss of iteration `step` of `epoch` NaN once in this process (on `rank`, or on
    every rank), before any rank reads it: a fault to test the stop and the rewind with."""
    fired = []

    def inject(loss, e, s):
        if (e, s) == (epoch, step) and rank in (None, get_rank()) and not fired:
            fired.append((e, s))
            return loss * math.nan
        return loss
    LOSS_HOOKS.append(inject)


def check_loss(loss_value, epoch, step):
    """The official stop on a non-finite loss, naming where it happened (raises NonFiniteError)."""
    if not math.isfinite(loss_value):
        raise NonFiniteError(f"Loss is {loss_value}", epoch, step)


def weights_finite(model, trained=False):
    """Whether every weight (with `trained`, every one an optimizer step changes: not a frozen encoder, not
    the BatchNorm statistics a forward pass updates) is finite on every rank: one reduction on the device,
    one collective, one read."""
    stats = {id(t) for t in compat.batch_norm_statistics(model)} if trained else set()
    flags = [paddle.isfinite(p).all() for p in model.parameters()
             if not (trained and (p.stop_gradient or id(p) in stats))]
    if not flags:
        return True
    bad = (~paddle.stack(flags).all()).astype("float32").reshape([1])
    if get_world_size() > 1:
        paddle.distributed.all_reduce(bad)
    return not bad.item()


def check_weights(model, epoch, last_step):
    """Before a checkpoint: raise NonFiniteError when an optimizer step (the last one, `last_step`, as every
    earlier one would have made a loss non-finite) left non-finite weights."""
    if not weights_finite(model):
        raise NonFiniteError("Weights are not finite (not saved)", epoch, last_step, loss=False)


def window(step, accum_iter):
    """(first, last) iteration of the optimizer step that iteration `step` belongs to."""
    first = step - step % accum_iter
    return first, first + accum_iter - 1


def failed_step(error, model, accum_iter):
    """(epoch, first, last) iterations to leave out after `error`: its own optimizer step, or the one before
    when the trained weights are already non-finite (non-finite gradients that step made them so); every rank
    decides alike. Statistics a batch's forward updates (BatchNorm's) blame no earlier step."""
    first, last = window(error.iteration, accum_iter)
    if error.loss and first >= accum_iter and not weights_finite(model, trained=True):
        first, last = first - accum_iter, first - 1
    return [error.epoch, first, last]
