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
    """backward: scale -> backward -> (on update steps) unscale -> optional clip; step: step -> update.

    Settings of the official GradScaler: initial scale 65536, growth 2 every 2000 finite steps, backoff 0.5.
    Disabled (plain backward and step) unless AMP float16 runs on a GPU.
    """

    def __init__(self, enabled=True):
        self.enabled = enabled
        self._scaler = paddle.amp.GradScaler(enable=enabled, init_loss_scaling=65536.0, incr_ratio=2.0,
                                             decr_ratio=0.5, incr_every_n_steps=2000, decr_every_n_nan_or_inf=1)
        self._skipped = 0

    def backward(self, loss, optimizer, clip_grad=None, parameters=None, update_grad=True):
        """scale -> backward; on update steps unscale -> optional clip. Returns the scaler's flag of
        non-finite gradients as a device tensor (float16 on update steps; else None), for the step's one
        read (util.epochs.read_step)."""
        self._scaler.scale(loss).backward()
        if not update_grad:
            return None
        self._scaler.unscale_(optimizer)
        if clip_grad is not None:
            paddle.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], clip_grad)
        return compat.found_inf(self._scaler) if self.enabled else None

    def step(self, optimizer, skip=False):
        """The optimizer step, left out when the gradients were not finite (`skip`, read with the step's
        loss), then the scale's update (backed off after a skip). GradScaler.step is not used: its optimizer
        tests the flag on the host, a second blocking read per step."""
        if skip:
            self._skipped += 1
        else:
            optimizer.step()
        if self.enabled:
            compat.update_scale(self._scaler, skip)

    @property
    def skipped_steps(self):
        """Steps skipped for non-finite gradients so far."""
        return self._skipped

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
