"""Mixup / CutMix on a batch tensor with smoothed soft targets (timm 0.3.2 semantics: 'batch', 'pair' and
'elem' modes)."""
import numpy as np
import paddle
import paddle.nn.functional as F

from util.dist import to_device


def one_hot(x, num_classes, on_value=1.0, off_value=0.0):
    return F.one_hot(x.reshape([-1]).astype("int64"), num_classes) * (on_value - off_value) + off_value


def mixup_target(target, num_classes, lam=1.0, smoothing=0.0):
    """lam * smoothed one-hot(target) + (1 - lam) * smoothed one-hot(target flipped along the batch);
    lam is a number or a [batch, 1] tensor (one value per sample)."""
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    y1 = one_hot(target, num_classes, on_value, off_value)
    y2 = one_hot(target.flip(0), num_classes, on_value, off_value)
    return y1 * lam + y2 * (1.0 - lam)


def rand_bbox(img_shape, lam, margin=0.0):
    """Box of side ratio sqrt(1 - lam) with a uniform centre, clipped to the image."""
    ratio = np.sqrt(1 - lam)
    img_h, img_w = img_shape[-2:]
    cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
    margin_y, margin_x = int(margin * cut_h), int(margin * cut_w)
    cy = np.random.randint(0 + margin_y, img_h - margin_y)
    cx = np.random.randint(0 + margin_x, img_w - margin_x)
    yl, yh = np.clip(cy - cut_h // 2, 0, img_h), np.clip(cy + cut_h // 2, 0, img_h)
    xl, xh = np.clip(cx - cut_w // 2, 0, img_w), np.clip(cx + cut_w // 2, 0, img_w)
    return int(yl), int(yh), int(xl), int(xh)


def rand_bbox_minmax(img_shape, minmax):
    """Box whose sides are uniform fractions of the image in [min, max)."""
    img_h, img_w = img_shape[-2:]
    cut_h = np.random.randint(int(img_h * minmax[0]), int(img_h * minmax[1]))
    cut_w = np.random.randint(int(img_w * minmax[0]), int(img_w * minmax[1]))
    yl = np.random.randint(0, img_h - cut_h)
    xl = np.random.randint(0, img_w - cut_w)
    return int(yl), int(yl + cut_h), int(xl), int(xl + cut_w)


def cutmix_bbox_and_lam(img_shape, lam, ratio_minmax=None, correct_lam=True):
    if ratio_minmax is not None:
        yl, yu, xl, xu = rand_bbox_minmax(img_shape, ratio_minmax)
    else:
        yl, yu, xl, xu = rand_bbox(img_shape, lam)
    if correct_lam or ratio_minmax is not None:
        lam = 1.0 - (yu - yl) * (xu - xl) / float(img_shape[-2] * img_shape[-1])
    return (yl, yu, xl, xu), lam


class Mixup:
    """With prob `prob`, mix; with both alphas > 0, CutMix with prob `switch_prob`, else Mixup.
    lam ~ Beta(alpha, alpha); CutMix corrects lam to the pasted area. The partner of each sample is the
    batch reversed. Targets are label-smoothed one-hots mixed with the same lam. Mode 'batch' draws one
    lam (and box) for the batch, 'elem' one per sample, 'pair' one per partner pair (shared by both)."""

    MODES = ("batch", "pair", "elem")

    def __init__(self, mixup_alpha=1.0, cutmix_alpha=0.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5,
                 mode="batch", correct_lam=True, label_smoothing=0.1, num_classes=1000):
        if mode not in self.MODES:
            raise ValueError(f"mixup mode '{mode}' is not supported; use one of {', '.join(self.MODES)}")
        if cutmix_minmax is not None:
            if len(cutmix_minmax) != 2:
                raise ValueError(f"cutmix_minmax needs two values, got {cutmix_minmax}")
            cutmix_alpha = 1.0  # as timm: minmax forces cutmix
        if not (mixup_alpha > 0 or cutmix_alpha > 0):
            raise ValueError("one of mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax is required")
        self.mixup_alpha, self.cutmix_alpha, self.cutmix_minmax = mixup_alpha, cutmix_alpha, cutmix_minmax
        self.mix_prob, self.switch_prob = prob, switch_prob
        self.label_smoothing, self.num_classes = label_smoothing, num_classes
        self.mode, self.correct_lam = mode, correct_lam

    def _params_per_batch(self):
        lam, use_cutmix = 1.0, False
        if np.random.rand() < self.mix_prob:
            if self.mixup_alpha > 0.0 and self.cutmix_alpha > 0.0:
                use_cutmix = np.random.rand() < self.switch_prob
                alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
            elif self.mixup_alpha > 0.0:
                alpha = self.mixup_alpha
            else:
                use_cutmix, alpha = True, self.cutmix_alpha
            lam = float(np.random.beta(alpha, alpha))
        return lam, use_cutmix

    def _params_per_elem(self, n):
        lam, use_cutmix = np.ones(n, dtype=np.float32), np.zeros(n, dtype=bool)
        if self.mixup_alpha > 0.0 and self.cutmix_alpha > 0.0:
            use_cutmix = np.random.rand(n) < self.switch_prob
            lam_mix = np.where(use_cutmix, np.random.beta(self.cutmix_alpha, self.cutmix_alpha, size=n),
                               np.random.beta(self.mixup_alpha, self.mixup_alpha, size=n))
        elif self.mixup_alpha > 0.0:
            lam_mix = np.random.beta(self.mixup_alpha, self.mixup_alpha, size=n)
        else:
            use_cutmix = np.ones(n, dtype=bool)
            lam_mix = np.random.beta(self.cutmix_alpha, self.cutmix_alpha, size=n)
        lam = np.where(np.random.rand(n) < self.mix_prob, lam_mix.astype(np.float32), lam)
        return lam, use_cutmix

    def _mix_per_sample(self, x):
        """'elem' / 'pair': sample i mixes with sample B-1-i, each with its own lam (and CutMix box). The
        per-sample numbers reach the device in one upload (pinned, not blocking); the boxes are drawn there from
        their corners."""
        n, (h, w) = x.shape[0], x.shape[2:]
        lam, use_cutmix = self._params_per_elem(n if self.mode == "elem" else n // 2)
        corners = np.zeros((len(lam), 4), np.float32)  # top, bottom, left, right; empty unless CutMix
        for i in range(len(lam)):
            if lam[i] != 1.0 and use_cutmix[i]:
                corners[i], lam[i] = cutmix_bbox_and_lam(x.shape, lam[i], self.cutmix_minmax, self.correct_lam)
        if self.mode == "pair":
            lam, use_cutmix = np.concatenate([lam, lam[::-1]]), np.concatenate([use_cutmix, use_cutmix[::-1]])
            corners = np.concatenate([corners, corners[::-1]])
        blend = np.where(use_cutmix, 1.0, lam)
        params = to_device(np.concatenate([blend[:, None], lam[:, None], corners], 1).astype(np.float32))
        rows, cols = paddle.arange(h, dtype="float32"), paddle.arange(w, dtype="float32")
        in_rows = (rows >= params[:, 2:3]) & (rows < params[:, 3:4])
        in_cols = (cols >= params[:, 4:5]) & (cols < params[:, 5:6])
        boxes = (in_rows.unsqueeze(2) & in_cols.unsqueeze(1)).unsqueeze(1)
        partner = x.flip(0)
        blend = params[:, 0].reshape([n, 1, 1, 1]).astype(x.dtype)
        mixed = paddle.where(boxes, partner, x * blend + partner * (1.0 - blend))
        return mixed, params[:, 1:2]

    def _mix_batch(self, x):
        lam, use_cutmix = self._params_per_batch()
        if lam == 1.0:
            return x, 1.0
        if use_cutmix:
            (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(x.shape, lam, self.cutmix_minmax, self.correct_lam)
            if yh > yl and xh > xl:
                x = x.clone()
                x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
            return x, lam
        return x * lam + x.flip(0) * (1.0 - lam), lam

    def __call__(self, x, target):
        if x.shape[0] % 2 != 0:
            raise ValueError(f"mixup/cutmix needs an even batch size, got {x.shape[0]}")
        x, lam = self._mix_batch(x) if self.mode == "batch" else self._mix_per_sample(x)
        return x, mixup_target(target, self.num_classes, lam, self.label_smoothing)
