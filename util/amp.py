"""Mixed precision on GPU: autocast and the loss scaler (float16), both off on CPU where AMP is a no-op."""
import numpy as np
import paddle

from util import compat


def amp_enabled(args):
    return args.device.startswith("gpu") and not args.no_amp

def autocast(args):
    return paddle.amp.auto_cast(enable=amp_enabled(args), dtype=args.amp_dtype, level="O1")

def create_loss_scaler(args):
    return NativeScalerWithGradNormCount(enabled=amp_enabled(args) and args.amp_dtype == "float16")

class NativeScalerWithGradNormCount:
    """scale -> backward -> (on update steps) unscale -> optional clip -> step -> update.

    Settings of the official GradScaler: initial scale 65536, growth 2 every 2000 finite steps, backoff 0.5.
    Disabled (plain backward and step) unless AMP float16 runs on a GPU.
    """

    def __init__(self, enabled=True):
        self.enabled = enabled
        self._scaler = paddle.amp.GradScaler(enable=enabled, init_loss_scaling=65536.0, incr_ratio=2.0,
                                             decr_ratio=0.5, incr_every_n_steps=2000, decr_every_n_nan_or_inf=1)
        self._skipped = 0

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, update_grad=True):
        self._scaler.scale(loss).backward()
        if not update_grad:
            return None
        self._scaler.unscale_(optimizer)
        norm = None
        if clip_grad is not None:
            norm = paddle.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], clip_grad)
        self._scaler.step(optimizer)
        if self.enabled:  # non-finite gradients: the step was skipped (and the scale backs off in update)
            found_inf = compat.found_inf(self._scaler)  # set by unscale_
            self._skipped = self._skipped + (found_inf.astype("int64") if isinstance(found_inf, paddle.Tensor)
                                             else int(found_inf))
        self._scaler.update()
        return norm

    @property
    def skipped_steps(self):
        """Steps skipped for non-finite gradients so far (read from the device only when asked)."""
        return int(self._skipped.item() if isinstance(self._skipped, paddle.Tensor) else self._skipped)

    def state_dict(self):
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict):
        if self.enabled and state_dict:
            if "growth_factor" in state_dict:  # PyTorch GradScaler
                state_dict = {"scale": np.array([state_dict["scale"]], np.float32),
                              "incr_ratio": state_dict["growth_factor"], "decr_ratio": state_dict["backoff_factor"],
                              "incr_every_n_steps": state_dict["growth_interval"], "decr_every_n_nan_or_inf": 1,
                              "incr_count": state_dict["_growth_tracker"], "decr_count": 0,
                              "use_dynamic_loss_scaling": True}
            self._scaler.load_state_dict(state_dict)
