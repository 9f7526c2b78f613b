"""Classification criteria of the official fine-tuning (timm semantics)."""
import paddle.nn as nn
import paddle.nn.functional as F


class SoftTargetCrossEntropy(nn.Layer):
    """Mean over the batch of sum_c -target_c * log_softmax(x)_c (for mixup / cutmix targets)."""

    def forward(self, x, target):
        return (-target * F.log_softmax(x, axis=-1)).sum(axis=-1).mean()


class LabelSmoothingCrossEntropy(nn.Layer):
    """(1 - smoothing) * NLL of the label + smoothing * mean over classes of -log_softmax."""

    def __init__(self, smoothing=0.1):
        super().__init__()
        assert smoothing < 1.0
        self.smoothing = smoothing
        self.confidence = 1.0 - smoothing

    def forward(self, x, target):
        logprobs = F.log_softmax(x, axis=-1)
        nll_loss = -logprobs.take_along_axis(target.reshape([-1, 1]).astype("int64"), axis=-1).squeeze(-1)
        smooth_loss = -logprobs.mean(axis=-1)
        return (self.confidence * nll_loss + self.smoothing * smooth_loss).mean()

    def extra_repr(self):
        return f"smoothing={self.smoothing}"


class CrossEntropyLoss(nn.Layer):
    def forward(self, x, target):
        return F.cross_entropy(x, target.astype("int64"))


def build_criterion(mixup_fn, smoothing):
    """The official choice: soft-target CE with mixup, else label smoothing if > 0, else plain CE."""
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()
    if smoothing > 0.0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return CrossEntropyLoss()
