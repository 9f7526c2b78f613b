"""LARS optimizer as in MoCo v3 (used for the official linear probing)."""
import paddle


class LARS:
    """SGD with momentum and a layer-wise trust ratio. For parameters with ndim > 1:
    dp = g + wd * p, scaled by trust_coefficient * |p| / |dp| (1 if either norm is 0). 1-D parameters
    (biases, norms) get plain momentum without weight decay. mu = momentum * mu + dp; p -= lr * mu.

    Exposes the parts of Paddle's optimizer interface the training loop, loss scaler and checkpoints use.
    """

    def __init__(self, parameters, learning_rate=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        self._parameter_list = list(parameters)
        self._param_groups = [{"params": self._parameter_list, "weight_decay": weight_decay}]
        self._learning_rate = float(learning_rate)
        self.weight_decay, self.momentum, self.trust_coefficient = weight_decay, momentum, trust_coefficient
        self._accumulators = {"momentum": {}}

    def set_lr(self, value):
        self._learning_rate = float(value)

    def get_lr(self):
        return self._learning_rate

    def _create_accumulators(self, block, parameters):
        for p in parameters:
            if p.name not in self._accumulators["momentum"]:
                self._accumulators["momentum"][p.name] = paddle.zeros_like(p)

    @paddle.no_grad()
    def step(self):
        for p in self._parameter_list:
            if p.grad is None:
                continue
            dp = p.grad
            if p.ndim > 1:
                dp = dp + self.weight_decay * p
                param_norm, update_norm = paddle.linalg.norm(p), paddle.linalg.norm(dp)
                one = paddle.ones_like(param_norm)
                trust = self.trust_coefficient * param_norm / update_norm
                q = paddle.where(param_norm > 0.0, paddle.where(update_norm > 0.0, trust, one), one)
                dp = dp * q
            self._create_accumulators(None, [p])
            mu = self._accumulators["momentum"][p.name]
            mu.set_value(mu * self.momentum + dp)
            p.set_value(p - self._learning_rate * mu)

    def clear_grad(self, set_to_zero=False):
        for p in self._parameter_list:
            p.clear_gradient(set_to_zero)

    def __repr__(self):
        return (f"LARS(lr={self._learning_rate}, weight_decay={self.weight_decay}, momentum={self.momentum}, "
                f"trust_coefficient={self.trust_coefficient})")
