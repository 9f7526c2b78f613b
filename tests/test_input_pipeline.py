"""The fast input pipeline against a plain Pillow one with torchvision/timm semantics (what the pipeline
replaced): same decoded pixels, same resized pixels, same random decisions, same normalised floats."""
import math
import os
import random
import subprocess
import sys

import numpy as np
import paddle
import pytest
from PIL import Image

from conftest import ROOT
from helpers import descendants
from util import fast_image, transforms
from util.auto_augment import rand_augment_transform
from util.datasets import ImageFolder, Loader, read_rgb
from util.transforms import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, BatchNormalize, eval_transform,
                             finetune_transform, pretrain_transform)

PHOTOS = [os.path.join(ROOT, "demo", p) for p in ("chelsea.png", "coffee.png", "rocket.jpg")]


def _jpegs(tmp_path):
    """The shipped photos as JPEGs of every common kind: 4:2:0 / 4:4:4 / 4:2:2, progressive, grayscale."""
    paths = []
    for i, photo in enumerate(PHOTOS):
        img = Image.open(photo).convert("RGB")
        for name, kw in (("420", dict(quality=90, subsampling="4:2:0")), ("444", dict(quality=95, subsampling=0)),
                         ("422", dict(quality=75, subsampling=1)), ("prog", dict(quality=90, progressive=True))):
            paths.append(str(tmp_path / f"{i}_{name}.jpg"))
            img.save(paths[-1], **kw)
        paths.append(str(tmp_path / f"{i}_gray.jpg"))
        img.convert("L").save(paths[-1], quality=90)
    return paths


def test_jpeg_decoder_equals_pillow(tmp_path):
    for path in _jpegs(tmp_path) + [PHOTOS[2]]:
        with Image.open(path) as img:
            ref = np.asarray(img.convert("RGB"))
        assert np.array_equal(read_rgb(path), ref), path


def test_bicubic_resize_equals_pillow():
    """Crops (views) of real photos, shrunk, enlarged and stretched along one side only."""
    rng = np.random.default_rng(0)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in PHOTOS]
    assert fast_image.available()
    cases = equal = 0
    for a in photos:
        for size in [(224, 224), (256, 341), (7, 300), (600, 33)] + [tuple(rng.integers(1, 500, 2)) for _ in range(20)]:
            h, w = int(rng.integers(1, a.shape[0] + 1)), int(rng.integers(1, a.shape[1] + 1))
            top, left = int(rng.integers(0, a.shape[0] - h + 1)), int(rng.integers(0, a.shape[1] - w + 1))
            for crop, out in (((a[top:top + h, left:left + w]), size), (a[top:top + h, left:left + w], (h, 224)),
                              (a[top:top + h, left:left + w], (224, w))):
                ref = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(out[::-1], Image.BICUBIC))
                got = fast_image.resize_bicubic(crop, out)
                assert got.shape == ref.shape and np.abs(got.astype(int) - ref).max() <= 1
                cases, equal = cases + 1, equal + np.array_equal(got, ref)
    assert equal == cases  # bit-exact with the Pillow installed here; 1 level is the documented bound


def test_mirror_equals_the_reversed_view(monkeypatch):
    a = np.asarray(Image.open(PHOTOS[0]).convert("RGB"))
    assert fast_image.available()
    for view in (a, a[5:205, 7:150], a[:1, :1], a[:, ::2]):  # whole, a crop, one pixel, a strided view
        got = fast_image.mirror(view)
        assert got.flags["C_CONTIGUOUS"] and np.array_equal(got, view[:, ::-1])
    monkeypatch.setattr(fast_image, "lib", None)  # not built: NumPy flips
    assert np.array_equal(fast_image.mirror(a[5:205, 7:150]), a[5:205, 7:150, :][:, ::-1])


def test_affine_warp_equals_pillow(monkeypatch):
    """Shears, translations (the steps along one axis), rotations and arbitrary maps of real photo crops
    (views) and noise, bilinear and bicubic, with a fill colour: the pixels of Image.transform(AFFINE)."""
    rng = np.random.default_rng(1)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in PHOTOS]
    assert fast_image.available()
    for i in range(120):
        a = photos[i % 3]
        h, w = int(rng.integers(2, 120)), int(rng.integers(2, 120))
        top, left = int(rng.integers(0, a.shape[0] - h + 1)), int(rng.integers(0, a.shape[1] - w + 1))
        img = a[top:top + h, left:left + w] if i % 4 else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        t = rng.uniform(-1, 1)
        angle = math.radians(rng.uniform(-30, 30))
        matrix = [(1, 0.3 * t, 0, 0, 1, 0), (1, 0, 0, 0.3 * t, 1, 0), (1, 0, 0.45 * w * t, 0, 1, 0),
                  (1, 0, 0, 0, 1, 0.45 * h * t), (math.cos(angle), math.sin(angle), 3 * t, -math.sin(angle),
                                                  math.cos(angle), -2 * t), tuple(rng.uniform(-2, 2, 6))][i % 6]
        for resample in (Image.BILINEAR, Image.BICUBIC):
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            ref = np.asarray(Image.fromarray(np.ascontiguousarray(img)).transform(
                (w, h), Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill))
            assert np.array_equal(fast_image.affine(img, matrix, resample, fill), ref), (i, resample, matrix)
    with pytest.raises(TypeError):  # signed bytes are not pixels: Pillow refuses them, the C never reads them
        fast_image.affine(img.astype(np.int8), matrix, Image.BICUBIC, fill)
    monkeypatch.setattr(fast_image, "lib", None)  # not built: Pillow warps
    assert np.array_equal(fast_image.affine(img, matrix, Image.BICUBIC, fill), np.asarray(Image.fromarray(
        np.ascontiguousarray(img)).transform((w, h), Image.Transform.AFFINE, matrix, Image.BICUBIC, fillcolor=fill)))


def test_other_pillow_releases_resize_themselves(monkeypatch):
    """The C resampling follows one Pillow release: with another installed, Pillow's own pixels are used."""
    import PIL
    a = np.asarray(Image.open(PHOTOS[0]).convert("RGB"))[5:205, 7:150]
    monkeypatch.setattr(PIL, "__version__", "12.3.0")
    assert not fast_image.follows_installed_pillow()
    calls = []
    monkeypatch.setattr(fast_image, "lib", type("Lib", (), {"resize_bicubic_rgb": calls.append})())
    ref = np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((90, 64), Image.BICUBIC))
    assert np.array_equal(fast_image.resize_bicubic(a, (64, 90)), ref) and calls == []
    monkeypatch.setattr(PIL, "__version__", f"{fast_image.PILLOW_FOLLOWED}.1.0")
    assert fast_image.follows_installed_pillow()


def test_without_a_compiler_pillow_resizes(tmp_path):
    code = ("import numpy as np; from util import fast_image; a = np.zeros((30, 40, 3), np.uint8); "
            "print(fast_image.available(), fast_image.resize_bicubic(a, (10, 12)).shape)")
    env = dict(os.environ, CC="false", PADDLE_EXTENSION_DIR=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.split() == ["False", "(10,", "12,", "3)"], res.stderr
    assert res.stderr.count("warning: native CPU code mae_fast_image not used") == 1


def _normalized(img):
    x = np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0
    return (x - np.asarray(IMAGENET_DEFAULT_MEAN, np.float32).reshape(3, 1, 1)) / np.asarray(
        IMAGENET_DEFAULT_STD, np.float32).reshape(3, 1, 1)


def _reference(img, size, scale, aa, reprob):
    """RandomResizedCrop + flip (+ RandAugment) + ToTensor/Normalize (+ RandomErasing, pixel mode) on PIL
    images, drawing from `random` in torchvision's and timm's order; erasing noise from np.random."""
    width, height = img.size
    for _ in range(10):
        target_area = width * height * random.uniform(*scale)
        aspect = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = random.randint(0, height - h), random.randint(0, width - w)
            break
    else:
        raise AssertionError("the test photos always fit")
    img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    if random.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if aa:  # Pillow warps (RandAugment's rotation matrix is checked against Image.rotate in test_augment)
        lib, fast_image.lib = fast_image.lib, None
        try:
            img = rand_augment_transform(aa, dict(translate_const=int(size * 0.45), img_mean=(124, 116, 104),
                                                  interpolation=Image.BICUBIC))(img)
        finally:
            fast_image.lib = lib
    x = _normalized(img)
    boxes = []
    if reprob and random.random() <= reprob:
        for _ in range(10):
            area = random.uniform(0.02, 1 / 3) * size * size
            ratio = math.exp(random.uniform(math.log(0.3), math.log(1 / 0.3)))
            eh, ew = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if ew < size and eh < size:
                boxes.append((random.randint(0, size - eh), random.randint(0, size - ew), eh, ew))
                break
    return x, boxes


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_same_decisions_and_pixels_as_the_pillow_pipeline(kind):
    size = 64
    tf = pretrain_transform(size) if kind == "pretrain" else finetune_transform(size, reprob=0.9)
    scale, aa, reprob = ((0.2, 1.0), None, 0) if kind == "pretrain" else ((0.08, 1.0), "rand-m9-mstd0.5-inc1", 0.9)
    photos = [Image.open(p).convert("RGB") for p in PHOTOS]
    erased = 0
    for seed in range(30):
        img = photos[seed % 3]
        random.seed(seed)
        np.random.seed(seed)
        want, boxes = _reference(img, size, scale, aa, reprob)
        random.seed(seed)
        np.random.seed(seed)
        out = tf(np.asarray(img))
        if isinstance(out, tuple):
            got = tf.erasing.fill(tf.batch(out[0][None]), paddle.to_tensor(out[1][None])).numpy()[0]
        else:
            got = tf.batch(out[None]).numpy()[0]
        keep = np.ones((size, size), bool)
        for top, left, h, w in boxes:
            keep[top:top + h, left:left + w] = False
            erased += 1
        assert np.array_equal(got[:, keep], want[:, keep]), seed  # crop, flip, RandAugment: the same pixels
        if boxes:
            assert not np.isclose(got[:, ~keep], want[:, ~keep]).all()  # erased: noise, not the image
        if isinstance(out, tuple):
            assert [tuple(b[:4]) for b in out[1] if b[2]] == boxes  # the same erasing boxes
    assert kind == "pretrain" or erased > 15


def test_batch_normalisation_equals_per_sample(monkeypatch):
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (5, 7, 9, 3), dtype=np.uint8)
    want = np.stack([_normalized(img) for img in batch])
    got = BatchNormalize()(batch).numpy()
    assert got.dtype == np.float32 and np.abs(got - want).max() <= 1e-6
    assert np.array_equal(BatchNormalize()(paddle.to_tensor(batch)).numpy(), got)
    with monkeypatch.context() as m:  # the device path (GPU, or no native code): the same values, bit for bit
        m.setattr(transforms, "fast_image_available", lambda: False)
        assert np.array_equal(BatchNormalize()(paddle.to_tensor(batch)).numpy(), got)


def test_eval_transform_equals_pillow_resize_and_crop():
    for path in PHOTOS:
        img = Image.open(path).convert("RGB")
        w, h = img.size
        ow, oh = (36, int(36 * h / w)) if w <= h else (int(36 * w / h), 36)
        ref = img.resize((ow, oh), Image.BICUBIC)
        top, left = int(round((oh - 32) / 2.0)), int(round((ow - 32) / 2.0))
        ref = np.asarray(ref.crop((left, top, left + 32, top + 32)))
        assert np.array_equal(eval_transform(32)(img), ref)


def test_loader_yields_normalised_float_batches(tmp_path):
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    for i, path in enumerate(PHOTOS * 2):
        Image.open(path).convert("RGB").save(folder / f"{i}.jpg", quality=90)
    data = ImageFolder(str(tmp_path / "train"), transform=finetune_transform(32, reprob=1.0))
    sampler = paddle.io.BatchSampler(data, batch_size=3, drop_last=True)
    batches = {}
    for workers in (0, 2):
        batches[workers] = [[t.numpy() for t in batch] for batch in Loader(data, sampler, workers)]
        assert [x.shape for x, _, _ in batches[workers]] == [(3, 3, 32, 32)] * 2
        assert all(x.dtype == np.float32 for x, _, _ in batches[workers])
        assert all(boxes.shape == (3, 1, 4) and (boxes[:, 0, 2] > 0).all() for _, boxes, _ in batches[workers])
    for a, b in zip(batches[0], batches[2]):  # workers or not, the same seeded samples and erasing boxes
        assert all(np.array_equal(u, v) for u, v in zip(a, b))


def test_a_pass_broken_off_ends_its_workers_at_once(tmp_path):
    """A stop breaks a pass off while the engine still holds it: end_pass ends the workers then (through
    util.compat.end_loader_workers, Paddle's iterator's _try_shutdown_all), and the next pass starts anew;
    closing an old pass late ends only its own workers."""
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    for i in range(12):
        Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB").save(folder / f"{i}.jpg", quality=90)
    data = ImageFolder(str(tmp_path / "train"), transform=eval_transform(32))
    loader = Loader(data, paddle.io.BatchSampler(data, batch_size=2), 2)
    before = set(descendants(os.getpid()))
    held = iter(loader)
    next(held)
    workers = set(descendants(os.getpid())) - before
    assert len(workers) >= 2 and loader.running is not None
    loader.end_pass()
    assert loader.running is None and not workers & set(descendants(os.getpid()))
    assert len([batch for batch in loader]) == 6 and loader.running is None  # a whole pass ends its own
    stale, fresh = iter(loader), iter(loader)
    next(stale)
    next(fresh)
    stale.close()  # a pass broken off earlier and closed late leaves the pass under way running
    assert loader.running is not None and len([batch for batch in fresh]) == 5


def test_decoding_stops_or_skips_at_a_bad_jpeg(tmp_path):
    good = tmp_path / "good.jpg"
    Image.open(PHOTOS[0]).convert("RGB").save(good, quality=90)
    data = good.read_bytes()
    for name, content in (("cut.jpg", data[: len(data) // 3]), ("junk.jpg", data[:20] + bytes(300))):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(Exception, match=name):
            read_rgb(str(tmp_path / name))
