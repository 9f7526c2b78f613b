"""LARS optimizer as in MoCo v3 (used for the official linear probing)."""
import paddle


class LARS(paddle.optimizer.Optimizer):
    """SGD with momentum and a layer-wise trust ratio, through Paddle's optimizer extension point (its
    momentum is an ordinary accumulator: state dict, checkpoints and loss scaler treat it as Paddle's own).
    For parameters with ndim > 1: dp = g + wd * p, scaled by trust_coefficient * |p| / |dp| (1 if either norm
    is 0); 1-D parameters (biases, norms) get plain momentum without weight decay. mu = momentum * mu + dp;
    p -= lr * mu."""

    _momentum_acc_str = "momentum"

    def __init__(self, parameters, learning_rate=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(learning_rate=float(learning_rate), parameters=list(parameters), weight_decay=None)
        self.type = "lars_momentum"
        self.lars_weight_decay, self.momentum, self.trust_coefficient = weight_decay, momentum, trust_coefficient

    def _create_accumulators(self, block, parameters):
        for p in parameters:
            self._add_accumulator(self._momentum_acc_str, p)  # returns the existing one in dynamic mode

    @paddle.no_grad()
    def _append_optimize_op(self, block, param_and_grad):
        param, dp = param_and_grad
        if param.ndim > 1:
            dp = dp + self.lars_weight_decay * param
            param_norm, update_norm = paddle.linalg.norm(param), paddle.linalg.norm(dp)
            one = paddle.ones_like(param_norm)
            trust = self.trust_coefficient * param_norm / update_norm
            dp = dp * paddle.where(param_norm > 0.0, paddle.where(update_norm > 0.0, trust, one), one)
        mu = self._get_accumulator(self._momentum_acc_str, param)
        paddle.assign(mu * self.momentum + dp, mu)
        paddle.assign(param - self._create_param_lr(param_and_grad) * mu, param)

    def __repr__(self):
        return (f"LARS(lr={self.get_lr()}, weight_decay={self.lars_weight_decay}, momentum={self.momentum}, "
                f"trust_coefficient={self.trust_coefficient})")
