"""The Paddle and submitit internals util/compat.py relies on, each exercised: a failure names the internal
an upgrade removed or changed."""
import numpy as np
import paddle
import pytest

from util import compat, cpu_kernels
from util.adamw import AdamW
from util.lars import LARS


def _stepped(optimizer_class, groups, **kwargs):
    opt = optimizer_class(parameters=groups, learning_rate=0.1, **kwargs)
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    sum((p * p).sum() for p in params).backward()
    opt.step()
    return opt, params


def test_optimizer_accumulators_and_groups():
    a, b = paddle.create_parameter([3], "float32"), paddle.create_parameter([2, 2], "float32")
    opt, _ = _stepped(AdamW, [{"params": [a], "learning_rate": 0.5}, {"params": [b]}])
    acc = compat.accumulators(opt)
    assert {"moment1", "moment2"} <= set(acc) and {a.name, b.name} <= set(acc["moment1"]), \
        "paddle.optimizer.Optimizer._accumulators: {accumulator: {parameter name: tensor}} changed"
    assert [([p.name for p in ps], s) for ps, s in compat.param_groups(opt)] == [([a.name], 0.5), ([b.name], 1.0)], \
        "paddle.optimizer.Optimizer._param_groups (dicts with 'params' and 'learning_rate') changed"
    fresh = AdamW(parameters=[a, b], learning_rate=0.1)
    compat.create_accumulators(fresh, [a])
    assert a.name in compat.accumulators(fresh)["moment1"], "Optimizer._create_accumulators(block, params) changed"
    lars, _ = _stepped(LARS, [b])
    assert [([p.name for p in ps], s) for ps, s in compat.param_groups(lars)] == [([b.name], 1.0)]
    assert np.abs(compat.accumulators(lars)["momentum"][b.name].numpy()).sum() > 0, \
        "Optimizer._add_accumulator / _get_accumulator (LARS's momentum) changed"


def test_batch_norm_statistics():
    bn = paddle.nn.BatchNorm1D(3)
    bn.train()
    bn(paddle.to_tensor(np.arange(12, dtype=np.float32).reshape(4, 3)))
    mean, variance = compat.batch_norm_statistics(paddle.nn.Sequential(paddle.nn.Linear(3, 3), bn))
    assert np.allclose(mean.numpy(), 0.1 * np.array([4.5, 5.5, 6.5])), \
        "paddle.nn.layer.norm._BatchNormBase._mean (the running mean) changed"
    assert variance.shape == [3] and float(variance.numpy()[0]) != 1.0, "_BatchNormBase._variance changed"


def test_custom_operators_by_name():
    assert hasattr(paddle._C_ops, "_run_custom_op"), "paddle._C_ops._run_custom_op is gone"
    from paddle.utils import cpp_extension
    assert callable(getattr(cpp_extension, "load_op_meta_info_and_register_op", None)), \
        "paddle.utils.cpp_extension.load_op_meta_info_and_register_op is gone"
    if not cpu_kernels.available():
        pytest.skip("the native kernels cannot be built here")
    x = paddle.randn([4, 7])
    got = compat.run_custom_op("mae_softmax", x, 1)[0]
    assert np.allclose(got.numpy(), paddle.nn.functional.softmax(x, -1).numpy(), atol=1e-6)


def test_submitit_preemption_signal(monkeypatch):
    submitit = pytest.importorskip("submitit")
    import signal
    assert compat.preemption_signal(submitit.JobEnvironment) == signal.SIGUSR2, \
        "submitit.JobEnvironment._usr_sig() (the preemption signal, USR2 by default) changed"


def test_public_optimizer_state_dict_keys_still_depend_on_creation_order():
    """Why util.compat reads the accumulators: Optimizer.state_dict() keys them by generated variable names,
    which shift with whatever the process created before, so a checkpoint keyed that way would not load into
    the same model built after another one. If this fails, the public state_dict has become portable and
    checkpoint.optimizer_state should use it instead."""
    from util.checkpoint import optimizer_state

    def keys(before):
        [paddle.nn.Linear(2, 2) for _ in range(before)]
        model = paddle.nn.Sequential(paddle.nn.Linear(3, 3))
        opt, _ = _stepped(AdamW, list(model.parameters()))
        public = {k for k, v in opt.state_dict().items() if isinstance(v, paddle.Tensor)}
        return public, {(n, a) for n, accs in optimizer_state(opt, model)["state"].items() for a in accs}

    (public_a, ours_a), (public_b, ours_b) = keys(0), keys(1)
    assert public_a != public_b and ours_a == ours_b


def test_adam_betas():
    p = paddle.create_parameter([2], "float32")
    assert compat.adam_betas(AdamW(parameters=[p], beta1=0.8, beta2=0.95)) == (0.8, 0.95), \
        "paddle.optimizer.AdamW._beta1 / _beta2 changed"


def test_found_inf_is_the_flag_unscale_sets():
    """GradScaler only runs on GPU/XPU (on the CPU it disables itself), so its source must still set the flag
    util.amp counts skipped steps by."""
    import inspect
    source = inspect.getsource(paddle.amp.grad_scaler.AmpScaler._unscale)
    assert "self._found_inf = " in source, "paddle.amp.grad_scaler.AmpScaler._unscale no longer sets _found_inf"
    assert compat.found_inf(type("Scaler", (), {"_found_inf": True})()) is True


def test_layer_norm_config():
    assert compat.layer_norm_config(paddle.nn.LayerNorm(8, epsilon=1e-6)) == ([8], 1e-6), \
        "paddle.nn.LayerNorm._normalized_shape / _epsilon changed"


def test_batch_norm_running_variance():
    bn = paddle.nn.BatchNorm1D(4, momentum=0.9)
    variance, momentum = compat.batch_norm_running_variance(bn)
    assert momentum == 0.9 and variance.shape == [4], "paddle.nn.BatchNorm1D._variance / _momentum changed"
    variance.set_value(paddle.full([4], 2.0))
    bn.eval()
    assert np.allclose(bn(paddle.full([2, 4], 2.0)).numpy(), 2.0 / np.sqrt(2.0), atol=1e-4)  # the one it uses


def test_cpu_generator_state_round_trip():
    paddle.seed(5)
    saved = compat.cpu_generator_state()
    assert all(isinstance(v, (int, list)) for v in saved), "GeneratorState.__getstate__ no longer plain values"
    x = paddle.ones([64])
    first = paddle.nn.functional.dropout(x, 0.5).numpy()
    compat.set_cpu_generator_state(saved)
    assert np.array_equal(paddle.nn.functional.dropout(x, 0.5).numpy(), first), \
        "GeneratorState.__new__ + __setstate__ with paddle.set_rng_state no longer restores the CPU generator"


def test_set_cpu_threads():
    compat.set_cpu_threads(1)  # paddle.base.core.set_num_threads: an AttributeError names it when removed


def test_pinned_non_blocking_upload_api():
    """util.dist.to_device's GPU path (not run here): Tensor.pin_memory() and Tensor.cuda(blocking=False)."""
    import inspect

    from util.dist import to_device
    assert callable(paddle.Tensor.pin_memory), "paddle.Tensor.pin_memory is gone"
    assert "blocking" in inspect.signature(paddle.Tensor.cuda).parameters, "paddle.Tensor.cuda lost `blocking`"
    tensor = to_device(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert tensor.place.is_cpu_place() and tensor.numpy().tolist() == [[0, 1, 2], [3, 4, 5]]


def test_update_scale_follows_gradscaler_update():
    """compat.update_scale does what AmpScaler._update and GradScaler.update do, on the same private fields."""
    import inspect

    from paddle.amp import grad_scaler
    source = inspect.getsource(grad_scaler.AmpScaler._update)
    for piece in ("self._incr_count", "self._decr_count", "self._decr_every_n_nan_or_inf",
                  "self._incr_every_n_steps", "self._scale = self._scale * self._decr_ratio",
                  "self._scale = self._scale * self._incr_ratio", "if self._cache_found_inf:"):
        assert piece in source, f"paddle.amp.grad_scaler.AmpScaler._update no longer has {piece!r}"
    assert "_refresh_optimizer_state" in inspect.getsource(grad_scaler.GradScaler.update)
    assert callable(grad_scaler._refresh_optimizer_state)
