"""AdamW whose float32 CPU parameters step through one fused kernel (util/cpu_kernels.cc)."""
import numbers

import paddle

from util import cpu_kernels
from util.cpu import cpu_has_avx512f


class AdamW(paddle.optimizer.AdamW):
    """paddle.optimizer.AdamW. In dynamic mode each float32 CPU parameter takes its step in one vectorized,
    multi-threaded kernel with Paddle's arithmetic: the same result bit for bit, the same accumulators
    (moments, beta powers) in the state dict. That is where the CPU has no AVX-512, on which Paddle's CPU
    kernel runs one element at a time; with AVX-512 Paddle's own vectorized kernel (whose rounding differs
    in the last bit) runs, as does everything else (GPU, AMSGrad, tensor-valued hyperparameters)."""

    def _append_optimize_op(self, block, param_and_grad):
        if isinstance(param_and_grad, dict):
            param_and_grad = self._update_param_group(param_and_grad)
        param, grad = param_and_grad
        scalars = (self._beta1, self._beta2, self._epsilon, self._weight_decay)
        if (self._amsgrad or self._apply_decay_param_fun is not None or not cpu_kernels.usable(param)
                or cpu_has_avx512f()
                or grad.dtype != param.dtype or not all(isinstance(v, numbers.Real) for v in scalars)):
            return super()._append_optimize_op(block, param_and_grad)

        def state(name):
            return self._get_accumulator_master(name, param)

        cpu_kernels.adamw_(param, grad, self._create_param_lr(param_and_grad), state(self._moment1_acc_str),
                           state(self._moment2_acc_str), state(self._beta1_pow_acc_str),
                           state(self._beta2_pow_acc_str), self._beta1, self._beta2, self._epsilon,
                           1.0 if self._lr_ratio is None else self._lr_ratio(param), self._weight_decay)
        return None
