"""Augmentations and criteria against timm's documented behaviour: statistics over many draws and
fixed-seed properties."""
import math
import os
import random

import numpy as np
import paddle
import pytest
from PIL import Image

import util.misc as misc
from util import auto_augment as aa, fast_image
from util.losses import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy, build_criterion
from util.mixup import Mixup, cutmix_bbox_and_lam, mixup_target
from util.random_erasing import RandomErasing
from util.transforms import (RandomResizedCrop, SingleDrawResizedCrop, eval_transform, finetune_transform,
                             linprobe_transform, pretrain_transform)

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")


def _photo(size=64, seed=0):
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.stack([(xx * 4 + rng.randint(0, 40)) % 256, (yy * 3) % 256, ((xx + yy) * 2) % 256], -1)
    return Image.fromarray(img.astype(np.uint8))


def test_rand_augment_config_of_the_official_recipe():
    tf = finetune_transform(224)
    ra = next(t for t in tf.transforms if isinstance(t, aa.RandAugment))
    assert ra.num_layers == 2
    assert [op.name for op in ra.ops] == aa.RAND_INCREASING_TRANSFORMS
    for op in ra.ops:
        assert (op.prob, op.magnitude, op.magnitude_std) == (0.5, 9, 0.5)
        assert op.kwargs == {"fillcolor": (124, 116, 104), "resample": Image.BICUBIC}
        assert op.hparams["translate_const"] == 100
    plain = aa.rand_augment_transform("rand-m7-n3", {})
    assert plain.num_layers == 3 and [op.name for op in plain.ops] == aa.RAND_TRANSFORMS
    with pytest.raises(ValueError, match="rand-"):
        aa.rand_augment_transform("original", {})


def test_magnitude_is_gaussian_and_clipped():
    op = aa.AugmentOp("Rotate", prob=1.0, magnitude=9, hparams={"magnitude_std": 0.5})
    seen = []
    op.level_fn = lambda level, _: seen.append(level) or (0.0,)
    random.seed(0)
    for _ in range(4000):
        op(_photo(8))
    seen = np.array(seen)
    assert seen.max() <= 10.0 and seen.min() >= 0.0
    assert abs(seen.mean() - 8.98) < 0.03  # N(9, 0.5) clipped at 10 moves the mean a little
    assert 0.02 < (seen == 10.0).mean() < 0.04  # P(N(9, .5) > 10) = 0.023


def test_level_to_argument_mappings():
    random.seed(1)
    assert {abs(aa._rotate_arg(9, {})[0]) for _ in range(10)} == {27.0}
    assert {aa._rotate_arg(10, {})[0] for _ in range(50)} == {30.0, -30.0}
    assert aa._posterize_increasing_arg(10, {}) == (0,) and aa._posterize_increasing_arg(0, {}) == (4,)
    assert aa._solarize_increasing_arg(9, {}) == (256 - 230,)
    assert aa._solarize_add_arg(10, {}) == (110,)
    assert {round(v, 6) for v in (aa._enhance_increasing_arg(10, {})[0] for _ in range(50))} == {0.1, 1.9}
    assert abs(aa._shear_arg(10, {})[0]) == pytest.approx(0.3)
    assert abs(aa._translate_rel_arg(10, {})[0]) == pytest.approx(0.45)


def test_every_op_runs_and_posterize_zero_bits_is_black():
    img = _photo(32)
    for name in aa.OPS:
        for given in (img, np.asarray(img)):
            out = np.asarray(aa.AugmentOp(name, prob=1.0, magnitude=9, hparams={"translate_const": 14})(given))
            assert out.shape == (32, 32, 3) and out.dtype == np.uint8, name
    black = aa.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(img)
    assert np.asarray(black).max() == 0
    shifted = aa.translate_x_rel(img, 0.5, fillcolor=(124, 116, 104), resample=Image.BICUBIC)
    assert tuple(np.asarray(shifted)[5, -1]) == (124, 116, 104)  # vacated area is the fill colour


def test_affine_ops_equal_pillows_on_arrays_and_images():
    """Rotations (any angle, the quarter turns, past 360 and negative), shears and translations of arrays and
    PIL images: the pixels of timm's calls, Image.rotate and Image.transform, for both resamplings."""
    rng = np.random.default_rng(0)
    assert fast_image.available()
    for i in range(60):
        img = _photo(40, seed=i).crop((0, 0, int(rng.integers(5, 40)), int(rng.integers(5, 40))))
        resample = (Image.BILINEAR, Image.BICUBIC)[i % 2]
        kw = dict(fillcolor=(124, 116, 104), resample=resample)
        v = float(rng.uniform(-1, 1))
        degrees = [30 * v, 90.0, -90.0, 180.0, 360.0, 390 * v, 0.0, -27.0][i % 8]
        for given in (img, np.asarray(img)):
            shear, pct, pixels = 0.3 * v, 0.45 * v, 14 * v
            width, height = img.size
            pairs = [(aa.rotate(given, degrees, **kw), img.rotate(degrees, **kw))]
            for op, arg, m in ((aa.shear_x, shear, (1, shear, 0, 0, 1, 0)),
                               (aa.shear_y, shear, (1, 0, 0, shear, 1, 0)),
                               (aa.translate_x_rel, pct, (1, 0, pct * width, 0, 1, 0)),
                               (aa.translate_y_rel, pct, (1, 0, 0, 0, 1, pct * height)),
                               (aa.translate_x_abs, pixels, (1, 0, pixels, 0, 1, 0)),
                               (aa.translate_y_abs, pixels, (1, 0, 0, 0, 1, pixels))):
                pairs.append((op(given, arg, **kw), img.transform(img.size, Image.Transform.AFFINE, m, **kw)))
            for got, want in pairs:
                assert np.array_equal(np.asarray(got), np.asarray(want)), (i, degrees, resample)


@pytest.mark.parametrize("warps", ["C", "Pillow"])
def test_rand_augment_equals_timm_pixel_for_pixel(warps, monkeypatch):
    """The official policy on photo crops, seeded per image as timm's outputs were made
    (tests/reference/make_timm_rand_augment.py, timm 0.3.2): the same pixels, with the C warps and with
    Pillow's."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_timm", os.path.join(REFERENCE, "make_timm_rand_augment.py"))
    make_timm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_timm)
    want = np.load(os.path.join(REFERENCE, "timm_rand_augment.npz"))["outputs"]
    if warps == "Pillow":
        monkeypatch.setattr(fast_image, "lib", None)
    else:
        assert fast_image.available()
    augment = aa.rand_augment_transform(make_timm.POLICY, make_timm.HPARAMS)
    inputs = make_timm.inputs()
    changed = 0
    for i, img in enumerate(inputs):
        random.seed(i)
        np.random.seed(i)
        got = np.asarray(augment(img))
        assert np.array_equal(got, want[i]), i
        changed += not np.array_equal(got, img)
    assert changed > len(inputs) // 2  # most images were changed by some op


def test_op_probability_is_one_half():
    op = aa.AugmentOp("Invert", prob=0.5, magnitude=9)
    img = _photo(8)
    random.seed(2)
    applied = np.mean([not np.array_equal(np.asarray(op(img)), np.asarray(img)) for _ in range(2000)])
    assert abs(applied - 0.5) < 0.04


def test_rand_augment_fixed_seed_is_reproducible():
    tf = finetune_transform(32)

    def draw():
        random.seed(5)
        np.random.seed(5)
        paddle.seed(5)
        img, boxes = tf(_photo(48))
        return tf.erasing.fill(tf.batch(img[None]), paddle.to_tensor(boxes[None])).numpy()[0]

    a, b = draw(), draw()
    assert a.shape == (3, 32, 32) and a.dtype == np.float32 and np.array_equal(a, b)


def test_random_resized_crop_statistics_and_fallback():
    random.seed(0)
    crop = RandomResizedCrop(16, scale=(0.2, 1.0))
    img = np.asarray(_photo(100))
    areas, ratios = [], []
    for _ in range(3000):
        top, left, h, w = crop.get_params(img)
        assert 0 <= top <= 100 - h and 0 <= left <= 100 - w
        areas.append(h * w / 1e4)
        ratios.append(w / h)
    assert min(areas) > 0.19 and max(areas) <= 1.0
    assert abs(np.mean(np.log(ratios))) < 0.02  # log-uniform around 1
    impossible = RandomResizedCrop(16, scale=(2.0, 3.0))  # never fits: centre crop of the whole (ratio-clamped)
    assert impossible.get_params(img) == (0, 0, 100, 100)
    wide = np.zeros((100, 300, 3), np.uint8)
    assert impossible.get_params(wide) == (0, 83, 100, 133)  # width clamped to 4/3 of the height
    assert crop(img).shape == (16, 16, 3)


def test_linprobe_crop_is_one_draw_clamped():
    random.seed(0)
    crop = SingleDrawResizedCrop(8, scale=(1.0, 1.0), ratio=(4.0, 4.0))
    top, left, h, w = crop.get_params(np.asarray(_photo(40)))
    assert (w, h) == (40, 20) and left == 0  # w = 80 clamped to the image, h = 20


def test_eval_transform_sizes():
    assert eval_transform(224).transforms[0].size == 256
    assert eval_transform(448).transforms[0].size == 448
    assert eval_transform(32).transforms[0].size == 36
    out = eval_transform(32)(Image.new("RGB", (60, 40)))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_small_image_recipe_flags():
    """--crop_pct 1 evaluates a 28 px image as it is; --crop_scale reaches every training crop; the defaults
    stay the official ones."""
    img = np.asarray(_photo(28))[:28, :28]
    assert np.array_equal(eval_transform(28, 1.0)(img), img)
    assert not np.array_equal(eval_transform(28)(img), img)  # the official: resize to 32, crop 28
    assert eval_transform(28, 0.5).transforms[0].size == 56
    assert finetune_transform(28).transforms[0].scale == (0.08, 1.0)
    assert finetune_transform(28, scale=(0.5, 1.0)).transforms[0].scale == (0.5, 1.0)
    assert pretrain_transform(28).transforms[0].scale == (0.2, 1.0)
    assert pretrain_transform(28, (0.6, 0.9)).transforms[0].scale == (0.6, 0.9)
    assert linprobe_transform(28, (0.3, 1.0)).transforms[0].scale == (0.3, 1.0)
    from helpers import parse_flags
    for script, default in (("main_pretrain", [0.2, 1.0]), ("main_finetune", [0.08, 1.0]),
                            ("main_linprobe", [0.08, 1.0])):
        module = __import__(script)
        args = module.parse_args(["--model", "vit_micro_patch4" if script != "main_pretrain" else
                                  "mae_vit_micro_patch4"])
        assert list(args.crop_scale) == default and args.crop_pct is None
        for bad in (["--crop_scale", "0", "1"], ["--crop_scale", "0.6", "0.5"], ["--crop_scale", "0.5", "1.5"],
                    ["--crop_pct", "0"], ["--crop_pct", "1.2"]):
            out = parse_flags(script + ".py", *bad)
            assert out.returncode == 2 and bad[0] in out.stderr.strip().splitlines()[-1], (script, bad, out.stderr)


def _erase(re, x):
    """The two halves of random erasing on one normalised CHW image: boxes drawn, then filled on the device;
    (the erased image, its boxes)."""
    boxes = re.draw(*x.shape[1:])
    return re.fill(paddle.to_tensor(x[None]), paddle.to_tensor(boxes[None])).numpy()[0], boxes


@pytest.mark.parametrize("native", [True, False])
def test_random_erasing_statistics(native, monkeypatch):
    """Both fills: the native one on the CPU and the batched device one (what a GPU runs)."""
    if not native:
        monkeypatch.setattr(fast_image, "available", lambda: False)
    random.seed(0)
    re = RandomErasing(0.25, mode="pixel", max_count=1)
    erased, areas = 0, []
    for _ in range(2000):
        x, boxes = _erase(re, np.full((3, 40, 40), 7.0, np.float32))
        hit = x[0] != 7.0
        top, left, h, w = boxes[0]
        assert hit.sum() == h * w and hit[top:top + h, left:left + w].all()
        if hit.any():
            erased += 1
            areas.append(hit.mean())
            assert np.allclose(x[:, hit][1:].std(), 1.0, atol=0.5) or hit.sum() < 30
    assert abs(erased / 2000 - 0.25) < 0.03
    assert min(areas) >= 0.015 and max(areas) <= 1 / 3 + 0.02
    random.seed(3)
    x, _ = _erase(RandomErasing(1.0, mode="const"), np.ones((3, 20, 20), np.float32))
    assert (x == 0).any() and set(np.unique(x)) == {0.0, 1.0}
    x, _ = _erase(RandomErasing(1.0, mode="rand"), np.ones((3, 20, 20), np.float32))
    erased = x[:, x[0] != 1.0]
    assert erased.size and np.all(erased == erased[:, :1])  # one colour per channel
    with pytest.raises(ValueError):
        RandomErasing(mode="noise")


@pytest.mark.parametrize("native", [True, False])
def test_random_erasing_same_seed_same_pixels(native, monkeypatch):
    """Exact resume needs the fill to depend on the step's seed only."""
    if not native:
        monkeypatch.setattr(fast_image, "available", lambda: False)
    re = RandomErasing(1.0, mode="pixel", max_count=2)
    random.seed(1)
    boxes = paddle.to_tensor(np.stack([re.draw(24, 24) for _ in range(4)]))
    filled = []
    for _ in range(2):
        misc.seed_everything(3, 0, 7)
        filled.append(re.fill(paddle.zeros([4, 3, 24, 24]), boxes).numpy())
    misc.seed_everything(3, 0, 8)
    other = re.fill(paddle.zeros([4, 3, 24, 24]), boxes).numpy()
    assert np.array_equal(filled[0], filled[1]) and not np.array_equal(filled[0], other)


def test_random_erasing_count():
    """count is uniform in [1, max_count]; each box then gets area / count."""
    random.seed(0)
    re = RandomErasing(1.0, mode="pixel", min_area=0.01, max_area=0.02, max_count=3)
    counts = [int((re.draw(64, 64)[:, 2] > 0).sum()) for _ in range(600)]
    assert sorted(set(counts)) == [1, 2, 3] and all(abs(counts.count(c) / 600 - 1 / 3) < 0.06 for c in (1, 2, 3))


def _batch():
    x = paddle.to_tensor(np.arange(4 * 3 * 8 * 8, dtype=np.float32).reshape([4, 3, 8, 8]))
    return x, paddle.to_tensor([0, 1, 2, 3])


def test_mixup_only():
    np.random.seed(0)
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=5)
    x, y = _batch()
    out, target = mix(x, y)
    t = target.numpy()
    lam = (t[0, 0] - 0.02) / 0.9  # on = 0.92, off = 0.02: target[0, 0] = lam * 0.92 + (1 - lam) * 0.02
    assert np.allclose(out.numpy(), lam * x.numpy() + (1 - lam) * x.numpy()[::-1], atol=1e-3)
    assert np.allclose(t.sum(1), 1.0) and np.allclose(t[0, 3], (1 - lam) * 0.9 + 0.02, atol=1e-6)


def test_cutmix_box_and_lambda():
    np.random.seed(1)
    mix = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=4)
    x, y = _batch()
    out, target = mix(x, y)
    changed = (out.numpy() != x.numpy())[0, 0]
    lam = target.numpy()[0, 0]
    assert changed.sum() == pytest.approx((1 - lam) * 64)  # lam corrected to the pasted area
    ys, xs = np.nonzero(changed)
    assert np.array_equal(out.numpy()[0][:, ys, xs], x.numpy()[3][:, ys, xs])


def test_switch_prob_and_mix_prob():
    np.random.seed(0)
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, num_classes=4)
    draws = [mix._params_per_batch()[1] for _ in range(2000)]
    assert abs(np.mean(draws) - 0.5) < 0.04
    never = Mixup(mixup_alpha=0.8, prob=0.0, label_smoothing=0.1, num_classes=4)
    x, y = _batch()
    out, target = never(x, y)
    assert np.array_equal(out.numpy(), x.numpy())
    assert np.allclose(target.numpy(), mixup_target(y, 4, 1.0, 0.1).numpy())
    assert np.allclose(target.numpy()[0], [0.925, 0.025, 0.025, 0.025])


def test_cutmix_minmax_box_sizes():
    np.random.seed(0)
    mix = Mixup(mixup_alpha=0.0, cutmix_alpha=0.0, cutmix_minmax=[0.25, 0.5], label_smoothing=0.0, num_classes=4)
    assert mix.cutmix_alpha == 1.0
    for _ in range(50):
        x, y = _batch()
        out, target = mix(x, y)
        area = 1 - target.numpy()[0, 0]
        assert 0.25 * 0.25 - 1e-6 <= area <= 0.5 * 0.5


def test_mixup_errors():
    with pytest.raises(ValueError, match="even batch"):
        Mixup(mixup_alpha=1.0, num_classes=3)(paddle.zeros([3, 3, 4, 4]), paddle.to_tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="mixup_alpha > 0"):
        Mixup(mixup_alpha=0.0, cutmix_alpha=0.0)
    with pytest.raises(ValueError, match="batch, pair, elem"):
        Mixup(mode="sample")


def test_criteria():
    logits = paddle.to_tensor(np.random.RandomState(0).randn(6, 5).astype(np.float32))
    labels = paddle.to_tensor([0, 1, 2, 3, 4, 0])
    ce = paddle.nn.functional.cross_entropy(logits, labels).item()
    assert SoftTargetCrossEntropy()(logits, mixup_target(labels, 5)).item() == pytest.approx(ce, rel=1e-6)
    logp = paddle.nn.functional.log_softmax(logits, -1).numpy()
    nll = -logp[np.arange(6), labels.numpy()]
    expected = (0.9 * nll + 0.1 * -logp.mean(1)).mean()
    assert LabelSmoothingCrossEntropy(0.1)(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    mix = Mixup(mixup_alpha=0.8, num_classes=5)
    assert isinstance(build_criterion(mix, 0.1), SoftTargetCrossEntropy)
    assert isinstance(build_criterion(None, 0.1), LabelSmoothingCrossEntropy)
    assert build_criterion(None, 0.0)(logits, labels).item() == pytest.approx(ce, rel=1e-6)


def test_lam_distribution_is_beta():
    np.random.seed(0)
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, num_classes=4)
    lams = np.array([mix._params_per_batch()[0] for _ in range(4000)])
    assert abs(lams.mean() - 0.5) < 0.02 and abs(lams.var() - 0.25 / (2 * 0.8 + 1)) < 0.01
    assert math.isclose(np.median(lams), 0.5, abs_tol=0.03)


def _per_sample_reference(x, seed, mode, mixup_alpha, cutmix_alpha, switch_prob, prob):
    """The per-sample loop of timm's 'elem' / 'pair' modes, one sample at a time on numpy arrays."""
    np.random.seed(seed)
    n = len(x)
    m = n if mode == "elem" else n // 2
    use_cutmix = np.random.rand(m) < switch_prob
    lam_mix = np.where(use_cutmix, np.random.beta(cutmix_alpha, cutmix_alpha, size=m),
                       np.random.beta(mixup_alpha, mixup_alpha, size=m))
    lam = np.where(np.random.rand(m) < prob, lam_mix.astype(np.float32), np.ones(m, np.float32))
    out = x.copy()
    for i in range(m):
        j = n - i - 1
        if lam[i] == 1.0:
            continue
        if use_cutmix[i]:
            (yl, yh, xl, xh), lam[i] = cutmix_bbox_and_lam(x[i].shape, lam[i])
            out[i][:, yl:yh, xl:xh] = x[j][:, yl:yh, xl:xh]
            if mode == "pair":
                out[j][:, yl:yh, xl:xh] = x[i][:, yl:yh, xl:xh]
        else:
            out[i] = x[i] * lam[i] + x[j] * (1 - lam[i])
            if mode == "pair":
                out[j] = x[j] * lam[i] + x[i] * (1 - lam[i])
    return out, (lam if mode == "elem" else np.concatenate([lam, lam[::-1]]))


@pytest.mark.parametrize("mode", ["elem", "pair"])
def test_per_sample_modes_match_the_sample_loop(mode):
    x = np.random.RandomState(3).rand(8, 3, 16, 16).astype(np.float32)
    y = paddle.to_tensor([0, 1, 2, 3, 4, 5, 6, 7])
    for seed in range(5):
        expected, lam = _per_sample_reference(x, seed, mode, 0.8, 1.0, 0.5, 0.8)
        np.random.seed(seed)
        mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8, mode=mode, label_smoothing=0.1, num_classes=8)
        out, target = mix(paddle.to_tensor(x), y)
        assert np.allclose(out.numpy(), expected, atol=1e-6)
        t = target.numpy()
        assert np.allclose(np.diag(t), lam * 0.9 + 0.1 / 8, atol=1e-6)
        assert np.allclose(t[np.arange(8), 7 - np.arange(8)], (1 - lam) * 0.9 + 0.1 / 8, atol=1e-6)
    assert len(set(lam.tolist())) > 2  # per-sample lam, not one per batch
    if mode == "pair":
        assert np.array_equal(lam, lam[::-1])


def test_mask_noise_is_uniform_on_float32s_grid_and_drawn_per_sample():
    """Pre-training's mask noise (official: torch.rand(N, L) per batch): per sample, uniform in [0, 1) on the
    2^-24 grid, drawn with the sample's augmentation from (seed, epoch, index), so the same sample draws the
    same noise in any batch."""
    from util.datasets import sample_random_state
    from util.transforms import MaskNoise, pretrain_transform

    tf = pretrain_transform(32, num_patches=64)
    assert isinstance(tf.transforms[-1], MaskNoise)
    img = np.random.RandomState(0).randint(0, 256, (40, 40, 3), dtype=np.uint8)
    draws = {}
    for key in ((0, 0, 5), (0, 0, 6), (0, 1, 5), (0, 0, 5)):
        with sample_random_state(*key):
            pixels, noise = tf(img)
        assert pixels.shape == (32, 32, 3) and noise.shape == (64,) and noise.dtype == np.float32
        assert draws.setdefault(key, noise) is noise or np.array_equal(draws[key], noise)
    assert not np.array_equal(draws[(0, 0, 5)], draws[(0, 0, 6)]) and not np.array_equal(draws[(0, 0, 5)],
                                                                                            draws[(0, 1, 5)])
    many = np.concatenate([MaskNoise(64)(None)[1] for _ in range(2000)])
    assert many.min() >= 0.0 and many.max() < 1.0 and np.all(many * 2.0 ** 24 == np.round(many * 2.0 ** 24))
    assert abs(many.mean() - 0.5) < 0.005 and abs(many.var() - 1 / 12) < 0.002
