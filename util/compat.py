"""The one place that reaches into Paddle's and submitit's internals, where they have no public API for what
is needed; tests/test_compat.py fails naming the internal when an upgrade removes or changes one."""
import collections

import paddle


def accumulators(optimizer):
    """{accumulator name: {parameter name: tensor}}. Optimizer.state_dict() keys these by generated variable
    names whose numbering depends on what the process created before; checkpoints need them by parameter."""
    return optimizer._accumulators


def create_accumulators(optimizer, parameters):
    """Create the optimizer's accumulators for `parameters` now (Paddle creates them at the first step), so
    that a resumed run can fill them before that step."""
    optimizer._create_accumulators(paddle.static.default_main_program().global_block(), parameters)


def param_groups(optimizer):
    """[(parameters, lr multiplier)] in the optimizer's order (it keeps no public list of its groups)."""
    groups = []
    for g in optimizer._param_groups:
        if isinstance(g, dict):
            groups.append((list(g["params"]), g.get("learning_rate", 1.0)))
        else:  # a plain parameter list: one group
            groups.append(([g], 1.0))
    return groups


def batch_norm_statistics(model):
    """The running mean and variance of every BatchNorm layer in `model`: Paddle keeps them as parameters (not
    buffers) of a private base class, under private names."""
    return [t for layer in model.sublayers(include_self=True) if isinstance(layer, paddle.nn.layer.norm._BatchNormBase)
            for t in (layer._mean, layer._variance)]


def register_custom_ops(path):
    """Register the custom operators of an already built library (cpp_extension.load also builds); the names
    of the operators it registered."""
    from paddle.utils import cpp_extension
    return list(cpp_extension.load_op_meta_info_and_register_op(path))


def run_custom_op(name, *args):
    """Call a registered custom operator by name, without the Python module cpp_extension.load would
    generate (and import) for it."""
    return paddle._C_ops._run_custom_op(name, *args)


def preemption_signal(job_environment):
    """The signal submitit sends before a preemption or time-out (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL
    says otherwise): training intercepts it to stop at a step boundary before submitit requeues."""
    return job_environment._usr_sig()


def adam_betas(optimizer):
    """(beta1, beta2) of an Adam/AdamW optimizer, which keeps them under private names."""
    return optimizer._beta1, optimizer._beta2


def found_inf(scaler):
    """Whether GradScaler.unscale_ found non-finite gradients in this step (a bool tensor); Paddle keeps the
    flag it skips the step by under a private name."""
    return scaler._found_inf


def update_scale(scaler, skipped):
    """GradScaler.update's dynamic loss scaling after a step taken (or left out: `skipped`) without
    GradScaler.step, whose optimizer tests the flag on the host. Done on GradScaler's own private fields,
    without update's message on a backed-off scale, which reads the scale from the device (and, with NumPy 2,
    fails: float() of its shape-[1] array)."""
    from paddle.amp import grad_scaler
    if skipped:
        scaler._incr_count, scaler._decr_count = 0, scaler._decr_count + 1
        if scaler._decr_count == scaler._decr_every_n_nan_or_inf:
            scaler._scale, scaler._decr_count = scaler._scale * scaler._decr_ratio, 0
    else:
        scaler._decr_count, scaler._incr_count = 0, scaler._incr_count + 1
        if scaler._incr_count == scaler._incr_every_n_steps:
            scaler._scale, scaler._incr_count = scaler._scale * scaler._incr_ratio, 0
    scaler._optimizer_states = collections.defaultdict(grad_scaler._refresh_optimizer_state)


def layer_norm_config(layer):
    """(normalized_shape, epsilon) of a LayerNorm, which keeps them under private names."""
    return layer._normalized_shape, layer._epsilon


def batch_norm_running_variance(layer):
    """(the running variance tensor, momentum) of a BatchNorm layer: PyTorch's unbiased update of the variance
    (models_vit.BatchNorm1D) writes it, and Paddle names neither publicly."""
    return layer._variance, layer._momentum


def cpu_generator_state():
    """Paddle's CPU random generator state as plain values (GeneratorState's pickle state), so that a
    checkpoint holding it is read without running pickled code."""
    return paddle.get_rng_state("cpu")[0].__getstate__()


def set_cpu_generator_state(values):
    """Restore a cpu_generator_state(): on a new GeneratorState, as pickle does (its __setstate__ on an existing
    one leaves it unchanged)."""
    kind = type(paddle.get_rng_state("cpu")[0])
    state = kind.__new__(kind)
    state.__setstate__(tuple(values))
    paddle.set_rng_state([state], "cpu")


def set_cpu_threads(count):
    """The number of threads Paddle's CPU kernels use (no public setter)."""
    paddle.base.core.set_num_threads(count)


def end_loader_workers(batches, timeout):
    """Shut a multi-process DataLoader iterator's workers down now, waiting at most `timeout` seconds for each
    (its public end is the garbage collector's, which waits without a limit)."""
    batches._try_shutdown_all(timeout)
