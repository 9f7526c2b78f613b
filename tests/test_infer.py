"""Inference, reconstruction pictures and export, with bad input."""
import collections
import json
import os

import numpy as np
import paddle
import pytest
from PIL import Image

from conftest import ROOT, golden
from helpers import run_script
from models_vit import vit_micro_patch4
from util.datasets import load_image
from util.transforms import eval_transform
from util.errors import CheckpointError
from util.weights import load_checkpoint, load_model_weights, save_file

CAT = os.path.join(ROOT, "demo", "chelsea.png")
VIT = golden("vit_tiny_gp.pth")  # an official-format fine-tuned classifier, 10 classes


def _by_hand(path, crop_pct=None):
    model = vit_micro_patch4(num_classes=10, global_pool=True)
    load_model_weights(model, load_checkpoint(VIT)["model"], VIT)
    model.eval()
    tf = eval_transform(32, crop_pct)
    x = tf.batch(tf(load_image(path))[None])
    probs = paddle.nn.functional.softmax(model(x), -1).numpy()[0]
    top = np.argsort(-probs)[:5]
    return top.tolist(), probs[top]


def test_top5_equals_transform_and_model_by_hand():
    out = run_script("main_infer.py", "--model", "vit_micro_patch4", "--resume", VIT, "--img_path", CAT, "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ids, probs = _by_hand(CAT)
    assert result["path"] == CAT and result["topk_ids"] == ids
    assert np.allclose(result["topk_probs"], probs, atol=1e-5)
    assert result["topk_names"] == [str(i) for i in ids]


def test_evaluation_crop_follows_the_checkpoint(tmp_path):
    """A model fine-tuned with --crop_pct 1 is classified on the whole image unless --crop_pct says otherwise;
    an export carries it along."""
    path = str(tmp_path / "whole.pd")
    save_file({"model": load_checkpoint(VIT)["model"], "args": {"crop_pct": 1.0}}, path)
    for flags, crop_pct in (([], 1.0), (["--crop_pct", "0.875"], 0.875)):
        out = run_script("main_infer.py", "--model", "vit_micro_patch4", "--resume", path, "--img_path", CAT, "--json",
                         *flags)
        assert out.returncode == 0, out.stderr[-2000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        ids, probs = _by_hand(CAT, crop_pct)
        assert result["topk_ids"] == ids and np.allclose(result["topk_probs"], probs, atol=1e-5)
    assert _by_hand(CAT, 1.0)[1][0] != pytest.approx(_by_hand(CAT)[1][0], abs=1e-4)  # the crop does matter
    out = run_script("main_export.py", "--model", "vit_micro_patch4", "--resume", path, "--output",
                     str(tmp_path / "export" / "m"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.load(open(tmp_path / "export" / "m.info"))["crop_pct"] == 1.0


def test_json_output_holds_results_only():
    """What loading says (here: the position embedding interpolated) goes to stderr; every stdout line of --json
    is a result (the weights cast from float16: test_bad_input)."""
    out = run_script("main_infer.py", "--model", "vit_micro_patch4", "--resume", VIT, "--img_path", CAT, CAT,
                     "--json", "--input_size", "48")
    assert out.returncode == 0, out.stderr[-2000:]
    assert [json.loads(line)["path"] for line in out.stdout.splitlines()] == [CAT, CAT]
    assert "Position interpolate from 8x8 to 12x12" in out.stderr


def test_folder_text_output_and_class_names(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"thing {i}" for i in range(10)))
    out = run_script("main_infer.py", "--model", "vit_micro_patch4", "--resume", VIT, "--img_path",
                     os.path.join(ROOT, "demo"), "--class_names", str(names), "--topk", "3")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    n = len([f for f in os.listdir(os.path.join(ROOT, "demo")) if f.endswith((".png", ".jpg"))])
    assert sum(line.endswith((".png", ".jpg")) for line in lines) == n >= 3
    assert sum(line.strip().startswith(("1.", "2.", "3.")) for line in lines) == 3 * n
    assert "thing" in lines[1]
    bad = tmp_path / "few.txt"
    bad.write_text("a\nb\n")
    out = run_script("main_infer.py", "--model", "vit_micro_patch4", "--resume", VIT, "--img_path", CAT,
                     "--class_names", str(bad))
    assert out.returncode == 1 and "2 class names for a 10-class model" in out.stderr and out.stdout == ""


def test_imagenet_class_names_ship():
    from util.classifier import class_names
    names = class_names(num_classes=1000)
    assert len(names) == 1000 and names[0].startswith("tench") and names[281].startswith("tabby")


def test_odd_image_modes_are_classified(tmp_path):
    rgb = load_image(CAT).resize((40, 40))
    cmyk = tmp_path / "cmyk.jpg"
    rgb.convert("CMYK").save(cmyk)
    deep = tmp_path / "deep.png"
    Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)).save(deep)
    assert Image.open(deep).mode.startswith("I")
    palette = tmp_path / "palette.png"
    rgb.convert("P").save(palette)
    out = run_script("main_infer.py", "--model", "vit_micro_patch4", "--resume", VIT, "--json", "--img_path",
                     str(cmyk), str(deep), str(palette))
    assert out.returncode == 0, out.stderr[-2000:]
    assert len([json.loads(line) for line in out.stdout.strip().splitlines()]) == 3


def test_a_folder_is_classified_a_batch_at_a_time(tmp_path, monkeypatch):
    """Memory holds one batch of decoded images, not the folder; each batch goes to the device as uint8 and
    comes back as logits (one upload, one read); the results do not depend on the batch size."""
    import main_infer

    for i in range(5):
        load_image(CAT).resize((40 + 8 * i, 48)).save(tmp_path / f"{i}.png")
    sizes, decode, calls = [], main_infer.load_batch, collections.Counter()

    def load_batch(paths, transform):
        sizes.append(len(paths))
        return decode(paths, transform)

    def counted(fn, kind):
        def call(*args, **kwargs):
            calls[kind] += 0 < len(sizes) and batch_size == 2  # the first run's batches, its model in place
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(main_infer, "load_batch", load_batch)
    for name in ("numpy", "item", "tolist", "__float__"):
        monkeypatch.setattr(paddle.Tensor, name, counted(getattr(paddle.Tensor, name), "reads"))
    monkeypatch.setattr(paddle, "to_tensor", counted(paddle.to_tensor, "uploads"))
    results = {}
    for batch_size in (2, 16):
        args = main_infer.get_args_parser().parse_args(["--model", "vit_micro_patch4", "--resume", VIT, "--img_path",
                                                        str(tmp_path), "--batch_size", str(batch_size)])
        results[batch_size] = main_infer.predict(args)
    assert sizes == [2, 2, 1, 5]
    assert calls == {"reads": 3, "uploads": 3}, calls  # per batch: the uint8 images up, the logits down
    (paths, top, probs, _), (paths16, top16, probs16, _) = results[2], results[16]
    assert paths == paths16 and len(paths) == 5 and top.shape == (5, 5)
    assert (top == top16).all() and np.allclose(probs, probs16, atol=1e-6)
    assert (np.diff(probs, axis=1) <= 0).all() and (probs.sum(1) <= 1 + 1e-6).all()


@pytest.mark.parametrize("case", ["missing", "not_image", "truncated", "in_a_later_batch"])
def test_bad_images_are_named_and_nothing_is_printed(tmp_path, case):
    path = tmp_path / "x.png"
    if case == "not_image":
        path.write_text("hello")
    elif case in ("truncated", "in_a_later_batch"):
        path.write_bytes(open(CAT, "rb").read()[:2000])
    batch = ["--batch_size", "1"] if case == "in_a_later_batch" else []
    out = run_script("main_infer.py", "--model", "vit_micro_patch4", "--resume", VIT, "--img_path", CAT, str(path),
                     *batch)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {path}")


def test_wrong_checkpoints():
    out = run_script("main_infer.py", "--model", "vit_micro_patch4", "--resume", golden("mae_tiny.pth"),
                     "--img_path", CAT)
    assert out.returncode == 1 and "mae_tiny.pth: no classifier head" in out.stderr
    out = run_script("main_infer.py", "--model", "vit_tiny_patch4", "--resume", VIT, "--img_path", CAT)
    assert out.returncode == 1 and "vit_tiny_gp.pth does not fit" in out.stderr.strip().splitlines()[-1]


def _body(path, size=32):
    """The picture below its row of headings (which is not white only: the text is drawn)."""
    from main_visualize import heading_height
    grid = np.asarray(Image.open(path))
    band = grid[:heading_height(size)]
    assert (band == 255).mean() > 0.5 and (band < 128).any()
    return grid[heading_height(size):]


def _panels(path, size=32):
    grid = _body(path, size)
    return [grid[:, i * size:(i + 1) * size] for i in range(4)]


def test_visualisation_png(tmp_path):
    out_png = str(tmp_path / "recon.png")
    args = ["main_visualize.py", "--model", "mae_vit_micro_patch4", "--resume", golden("mae_tiny.pth"),
            "--norm_pix_loss", "--img_path", CAT, os.path.join(ROOT, "demo", "coffee.png"), "--output", out_png]
    out = run_script(*args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "un-normalised with the mean and std of nearby visible patches" in out.stdout
    grid = Image.open(out_png)
    assert grid.size == (4 * 32, 2 * 32 + 12) and grid.mode == "RGB"
    original, masked, recon, both = _panels(out_png)
    patches = masked[:32].reshape(8, 4, 8, 4, 3).transpose(0, 2, 1, 3, 4).reshape(64, 16, 3)
    blank = np.all(patches == np.array([123, 116, 103]), axis=(1, 2))  # x * (1 - mask) = 0: the ImageNet mean
    assert blank.sum() == 48  # 75% of 64 patches removed
    orig = original[:32].reshape(8, 4, 8, 4, 3).transpose(0, 2, 1, 3, 4).reshape(64, 16, 3)
    assert np.abs(patches[~blank].astype(int) - orig[~blank]).max() <= 1  # visible patches kept
    again = str(tmp_path / "again.png")
    run_script(*args[:-1], again)
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(grid))  # same seed, same mask
    other = str(tmp_path / "other.png")
    run_script(*args[:-1], other, "--seed", "7")
    assert not np.array_equal(_panels(other)[1], masked)
    large = str(tmp_path / "large.png")
    run_script(*args[:-1], large, "--scale", "3")  # each pixel as a 3 x 3 block
    assert np.array_equal(_body(large, 96)[::3, ::3], _body(out_png))
    assert Image.open(large).size == (3 * 4 * 32, 3 * 2 * 32 + 12)


def test_visualisation_refuses_encoder_only(tmp_path):
    state = {k: v for k, v in load_checkpoint(golden("mae_tiny.pth"))["model"].items() if not k.startswith("decoder")}
    enc = str(tmp_path / "encoder_only.pd")
    save_file({"model": state}, enc)
    out_png = tmp_path / "r.png"
    out = run_script("main_visualize.py", "--model", "mae_vit_micro_patch4", "--resume", enc, "--img_path", CAT,
                     "--output", str(out_png))
    assert out.returncode == 1 and "no decoder weights" in out.stderr and not out_png.exists()


def test_export_parity(tmp_path):
    prefix = str(tmp_path / "export" / "vit_micro")
    out = run_script("main_export.py", "--model", "vit_micro_patch4", "--resume", VIT, "--output", prefix)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.load(open(prefix + ".info"))
    assert (info["input_size"], info["num_classes"]) == (32, 10)
    model = vit_micro_patch4(num_classes=10, global_pool=True)
    load_model_weights(model, load_checkpoint(VIT)["model"], VIT)
    model.eval()
    x = np.random.RandomState(0).randn(3, 3, 32, 32).astype(np.float32)
    ref = model(paddle.to_tensor(x)).numpy()
    loaded = paddle.jit.load(prefix)
    assert np.abs(loaded(paddle.to_tensor(x)).numpy() - ref).max() <= 1e-5
    import main_infer
    assert np.abs(main_infer.ExportedModel(prefix, device="cpu")(x) - ref).max() <= 1e-5
    out = run_script("main_infer.py", "--exported", prefix, "--img_path", CAT, "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip())["topk_ids"] == _by_hand(CAT)[0]


def test_onnx_export_matches(tmp_path):
    pytest.importorskip("paddle2onnx")
    ort = pytest.importorskip("onnxruntime")
    prefix = str(tmp_path / "m")
    out = run_script("main_export.py", "--model", "vit_micro_patch4", "--resume", VIT, "--output", prefix, "--onnx")
    assert out.returncode == 0, out.stderr[-2000:]
    x = np.random.RandomState(0).randn(2, 3, 32, 32).astype(np.float32)
    session = ort.InferenceSession(prefix + ".onnx")
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    model = vit_micro_patch4(num_classes=10, global_pool=True)
    load_model_weights(model, load_checkpoint(VIT)["model"], VIT)
    model.eval()
    assert np.abs(got - model(paddle.to_tensor(x)).numpy()).max() <= 1e-5


def test_exported_files_are_checked_against_each_other(tmp_path):
    """Files of two exports mixed, a cut-off program, bad --output prefixes: one line each."""
    ckpt = load_checkpoint(VIT)
    five = str(tmp_path / "five.pd")
    model = {k: (v[..., :5] if k.startswith("head.") else v) for k, v in ckpt["model"].items()}
    save_file({"model": model}, five)
    a, b = str(tmp_path / "a" / "m"), str(tmp_path / "b" / "m")
    for resume, prefix in ((VIT, a), (five, b)):
        out = run_script("main_export.py", "--model", "vit_micro_patch4", "--resume", resume, "--output", prefix)
        assert out.returncode == 0, out.stderr[-2000:]
    info = json.load(open(a + ".info"))
    with open(b + ".pdiparams", "rb") as src, open(a + ".pdiparams", "wb") as dst:
        dst.write(src.read())
    out = run_script("main_infer.py", "--exported", a, "--img_path", CAT)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"error: {a}.pdiparams: not the file {a}.info was exported with (its SHA-256 differs); export again or "
        "keep the files of one export together"] and out.stdout == ""
    del info["sha256"]  # an export description without digests: the program's output is checked instead
    json.dump(info, open(a + ".info", "w"))
    out = run_script("main_infer.py", "--exported", a, "--img_path", CAT)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1 and out.stdout == ""
    assert out.stderr.startswith(f"error: {a}"), out.stderr
    json.dump(dict(info, num_classes=10), open(b + ".info", "w"))  # b's files, another export's description
    out = run_script("main_infer.py", "--exported", b, "--img_path", CAT)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"error: {b}: the program gives [1, 5] for one image, {b}.info says 10 classes; the files come from "
        "different exports"]
    program = open(b + ".json", "rb").read()
    open(b + ".json", "wb").write(program[:len(program) // 2])
    out = run_script("main_infer.py", "--exported", b, "--img_path", CAT)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith(f"error: {b}.json/.pdiparams: Paddle Inference cannot run them")
    for bad in ("", "new_dir/", str(tmp_path)):
        out = run_script("main_export.py", "--model", "vit_micro_patch4", "--resume", VIT, "--output", bad)
        assert out.returncode == 2 and "argument --output:" in out.stderr and "is a folder, not a path prefix" \
            in out.stderr, (bad, out.stderr)
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = run_script("main_export.py", "--model", "vit_micro_patch4", "--resume", VIT, "--output",
                     str(blocker / "m"))
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"error: cannot write {blocker / 'm'}: File exists"], out.stderr


def test_outputs_past_the_recorded_classes_are_named_as_no_class(tmp_path):
    """A head wider than the class folders it was trained on (--nb_classes 1000, the official default, on a
    10-class dataset): output i < 10 is class folder i, the others are named <no class i>, never ImageNet's
    names; the same through --data_path of those folders and through an export. More recorded classes than
    outputs, or recorded classes that are not names, are refused naming the checkpoint or .info."""
    demo = os.path.join(ROOT, "demo", "fashion_mnist_small")
    folders = sorted(os.listdir(os.path.join(demo, "train")))
    wide = str(tmp_path / "wide.pd")
    save_file({"model": vit_micro_patch4(num_classes=1000).state_dict(), "classes": folders}, wide)
    expected = folders + [f"<no class {i}>" for i in range(10, 1000)]
    prefix = str(tmp_path / "export" / "wide")
    assert run_script("main_export.py", "--model", "vit_micro_patch4", "--resume", wide, "--output",
                      prefix).returncode == 0
    for source in (["--resume", wide], ["--resume", wide, "--data_path", demo], ["--exported", prefix]):
        out = run_script("main_infer.py", "--model", "vit_micro_patch4", *source, "--img_path", CAT, "--json",
                         "--topk", "1000")
        assert out.returncode == 0, out.stderr[-2000:]
        result = json.loads(out.stdout)
        assert result["topk_names"] == [expected[i] for i in result["topk_ids"]], source
    head = {k: v for k, v in load_checkpoint(VIT)["model"].items()}
    for classes in (["a", "b", "c"] * 4, "abcdefghij", [1, 2]):
        bad = str(tmp_path / "bad.pd")
        save_file({"model": head, "classes": classes}, bad)
        out = run_script("main_infer.py", "--model", "vit_micro_patch4", "--resume", bad, "--img_path", CAT)
        assert out.returncode == 1 and out.stderr.strip().splitlines() == [
            f"error: {bad}: its recorded classes are not a list of at most 10 names, one per output of its "
            "head"] and out.stdout == "", (classes, out.stderr)
    info = json.load(open(prefix + ".info"))
    json.dump(dict(info, class_names=folders * 101), open(prefix + ".info", "w"))
    out = run_script("main_infer.py", "--exported", prefix, "--img_path", CAT)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"error: {prefix}.info: its recorded classes are not a list of at most 1000 names, one per output of "
        "its head"], out.stderr


@pytest.mark.parametrize("seed", ["-1", str(2 ** 31), "x"])
def test_bad_seeds_are_flag_errors(seed):
    for script in ("main_visualize.py", "main_pretrain.py"):
        extra = ["--img_path", CAT, "--resume", VIT] if script == "main_visualize.py" else []
        out = run_script(script, "--seed", seed, *extra)
        assert out.returncode == 2 and "argument --seed" in out.stderr and "Traceback" not in out.stderr


def test_exported_model_runs_on_the_chosen_gpu(tmp_path, monkeypatch):
    """--device gpu:N reaches Paddle Inference's config (read on CPU through a recording Config)."""
    import main_infer
    prefix = str(tmp_path / "m")
    for ext in (".json", ".pdiparams"):
        open(prefix + ext, "w").close()
    json.dump({"input_size": 32, "num_classes": 10}, open(prefix + ".info", "w"))
    calls = []

    class Config:
        def __init__(self, *files):
            pass

        def __getattr__(self, name):
            return lambda *args: calls.append((name, args))

    def no_predictor(config):
        raise RuntimeError("stop here")

    monkeypatch.setattr(paddle.inference, "Config", Config)
    monkeypatch.setattr(paddle.inference, "create_predictor", no_predictor)
    for device, index in (("gpu:3", 3), ("gpu", 0)):
        calls.clear()
        with pytest.raises(CheckpointError):
            main_infer.ExportedModel(prefix, device)
        assert ("enable_use_gpu", (256, index)) in calls
