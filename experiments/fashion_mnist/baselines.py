"""Baselines of the Fashion-MNIST study that need no training script: L-BFGS logistic regression and
k-nearest neighbours on raw pixels and on the frozen MAE encoder's features, and a small CNN from scratch,
trained with flips only and with the ViTs' training augmentation.

    python experiments/fashion_mnist/baselines.py --train 1:0=DIR 1:1=DIR ... 100:0=DIR --val DIR --test DIR \
        --checkpoint PRETRAINED.pd --epochs 1=100 10=50 100=15 --crop_pct 1 --crop_min 0.5 --log OUT/log.txt

Each `--train PERCENT:DRAW=DIR` is an ImageFolder of one label subset. Every method sees each image as the
ViTs' evaluation does (util.transforms.eval_transform with --crop_pct), so that the compared methods
classify the same pixels. A method's setting (C, k, the CNN's learning rate; for MAE features also the class
token or the average-pooled patch tokens) is chosen by top-1 on --val with draw 0 at 1% and at 10%, over the
grids of grids.py, continued past an end that holds the best; other draws use that choice, and 100% uses the
10% choice. Only the chosen setting is evaluated on --test. A method that draws nothing (logistic
regression, kNN) is not fitted again for a draw with an earlier draw's training folder and setting (at 100%
every draw has all the labels): its line repeats that draw's numbers, marked `same_as_draw`. One JSON line
per method, fraction and draw goes to --log; a line already there is skipped, so the stage resumes. A CNN
fit also resumes: it keeps its state in fits/ beside --log (every minute, cnn.train), and a line's files go
once it is written.
"""
import argparse
import glob
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

import util  # noqa: E402,F401  (first: filters Paddle's import-time warnings)
import numpy as np  # noqa: E402
import paddle  # noqa: E402

import cnn  # noqa: E402
from grids import BASELINE_GRIDS as GRIDS, BASELINE_METHODS as METHODS, EXTEND, beyond_edge  # noqa: E402
from records import drop_cut_line, read_baselines  # noqa: E402
import models_vit  # noqa: E402
from util.args import check_model_input, positive_int  # noqa: E402
from util.datasets import ImageFolder, load_image  # noqa: E402
from util.errors import DataError, WriteError, run as run_main  # noqa: E402
from util.transforms import eval_transform, finetune_transform  # noqa: E402
from util.weights import load_pretrained


def load_folder(folder, classes=None, classes_from=None):
    """The images of an ImageFolder as uint8 (n, H, W, 3) arrays, and their labels; with `classes`
    (those of the folder `classes_from`), the folder must hold exactly those, so that a label means one class
    everywhere. The images must share one size: the baselines compare them pixel by pixel."""
    data = ImageFolder(folder, classes=classes, classes_from=classes_from)
    images = [np.asarray(load_image(p)) for p, _ in data.samples]
    for (path, _), image in zip(data.samples, images):
        if image.shape != images[0].shape:
            raise DataError(f"{path}: {image.shape[1]}x{image.shape[0]} pixels, where {data.samples[0][0]} has "
                            f"{images[0].shape[1]}x{images[0].shape[0]}")
    return np.stack(images), np.array([t for _, t in data.samples], dtype=np.int64)


def pixels(images):
    """Grey levels in [0, 1], one row per image (the images are grey stored as RGB)."""
    return images[..., 0].reshape(len(images), -1).astype(np.float32) / 255.0


def mae_features(images, model, batch_size=500):
    """{'mae_cls', 'mae_avg'}: the frozen encoder's class token and its average-pooled patch tokens, both
    through the final norm (util.features, as main_extract.py and the k-NN monitor take them)."""
    normalize = eval_transform(images.shape[1]).batch
    feats = {"mae_cls": [], "mae_avg": []}
    with paddle.no_grad():
        for i in range(0, len(images), batch_size):
            batch = normalize(images[i:i + batch_size])
            for name in feats:
                feats[name].append(model.forward_features(batch, name[4:]).numpy())
    return {name: np.concatenate(f) for name, f in feats.items()}


def vit_augmentation(images, size, crop_min, seed):
    """augment(index) -> grey levels in [0, 1] of images[index] through the ViTs' training transform to
    size x size pixels (RandomResizedCrop of area crop_min..1 and a flip: util.transforms.finetune_transform
    without RandAugment or erasing), drawn from `seed`."""
    transform = finetune_transform(size, aa=None, reprob=0, scale=(crop_min, 1.0))
    random.seed(seed)
    return lambda index: pixels(np.stack([transform(images[i]) for i in index]))


def logistic_regression(x, y, classes, c=1.0, max_iter=5000):
    """Multinomial logistic regression, mean cross-entropy + ||W||^2 / (2 C n), solved by full-batch L-BFGS
    until the gradient vanishes (tolerance 1e-6) or max_iter; returns (W, b, iterations, gradient norm)."""
    paddle.seed(0)
    x, y = paddle.to_tensor(x, dtype="float64"), paddle.to_tensor(y)
    w = paddle.create_parameter([x.shape[1], classes], "float64",
                                default_initializer=paddle.nn.initializer.Constant(0.0))
    b = paddle.create_parameter([classes], "float64", default_initializer=paddle.nn.initializer.Constant(0.0))
    opt = paddle.optimizer.LBFGS(learning_rate=1.0, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=0.0,
                                 history_size=20, line_search_fn="strong_wolfe", parameters=[w, b])

    def closure():
        opt.clear_grad()
        loss = paddle.nn.functional.cross_entropy(x @ w + b, y) + (w * w).sum() / (2 * c * x.shape[0])
        loss.backward()
        return loss

    opt.step(closure)
    closure()
    grad = float(paddle.concat([w.grad.flatten(), b.grad]).abs().max())
    return w.numpy(), b.numpy(), int(opt.state_dict()["state"]["n_iter"]), grad


def knn_predict(train_x, train_y, test_x, classes, k=5, chunk=1000):
    """Majority vote of the k nearest training rows by cosine similarity; a tie goes to the tied class whose
    nearest neighbour is nearer."""
    train = train_x / np.linalg.norm(train_x, axis=1, keepdims=True).clip(1e-12)
    test = test_x / np.linalg.norm(test_x, axis=1, keepdims=True).clip(1e-12)
    k = min(k, len(train))
    pred = []
    for i in range(0, len(test), chunk):
        sim = test[i:i + chunk] @ train.T
        near = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        rows, labels = np.arange(len(near))[:, None], train_y[near]
        votes = np.zeros((len(near), classes))
        np.add.at(votes, (rows, labels), 1.0)
        first = np.full((len(near), classes), k)
        for rank in range(k - 1, -1, -1):  # ends with the rank of each class's nearest neighbour
            first[rows[:, 0], labels[:, rank]] = rank
        votes -= first / (k + 1)
        pred.append(votes.argmax(axis=1))
    return np.concatenate(pred)


def top1(pred, y):
    return float((pred == y).mean() * 100.0)


def fit(kind, setting, inputs, y, classes, epochs, seed, max_iter, crop_min, checkpoint=None):
    """(predict(features) -> labels, facts about the fit) for one method and setting; `inputs` holds every
    kind of feature of the training images, and their images ('raw'). A CNN resumes from `checkpoint`."""
    x = inputs[setting["features"]]
    if kind == "logreg":
        w, b, iterations, grad = logistic_regression(x, y, classes, setting["C"], max_iter)
        return (lambda v: (v @ w + b).argmax(axis=1)), {"lbfgs_iterations": iterations, "max_abs_gradient": grad}
    if kind == "knn":
        return (lambda v: knn_predict(x, y, v, classes, setting["k"])), {}
    augment = vit_augmentation(inputs["raw"], cnn.side_of(x), crop_min, seed) if kind == "cnn_vit_aug" else None
    model, loss = cnn.train(x, y, classes, setting["lr"], epochs, seed, augment=augment, checkpoint=checkpoint)
    return (lambda v: cnn.predict(model, v)), {"final_train_loss": loss, "epochs": epochs}


def fit_file(fits, method, percent, draw, setting=None):
    """The checkpoint file in the folder `fits` of one CNN fit, or with no setting the pattern of a line's."""
    name = "*" if setting is None else "_".join(f"{k}{v}" for k, v in sorted(setting.items()))
    return os.path.join(fits, f"{method}_{percent}pct_draw{draw}_{name}.pd")


def run(method, percent, draw, train, val, test, classes, epochs, chosen, max_iter, crop_min, fits=None):
    """The log row of one method on one label subset: the sweep on val when `chosen` is None, then the test
    top-1 of the chosen setting. CNN fits keep their checkpoints in the folder `fits`, if given."""
    kind, feature_names = METHODS[method]
    (x, y), (val_x, val_y), (test_x, test_y) = train, val, test
    sweep, best = [], None

    def evaluate(setting):
        nonlocal best
        f = setting["features"]
        checkpoint = fit_file(fits, method, percent, draw, setting) if fits and kind.startswith("cnn") else None
        predict, facts = fit(kind, setting, x, y, classes, epochs, draw, max_iter, crop_min, checkpoint)
        acc = top1(predict(val_x[f]), val_y)
        sweep.append({"setting": setting, "val_acc1": acc, **facts})
        if best is None or acc > best[0]:
            best = (acc, setting, predict, facts)
        return acc

    if chosen is not None:
        evaluate(chosen)
    for f in feature_names if chosen is None else ():
        name, values = GRIDS[kind][0], list(GRIDS[kind][1])
        scores = [evaluate({name: v, "features": f}) for v in values]
        while len(values) < len(GRIDS[kind][1]) + EXTEND:
            value = beyond_edge(values, scores)
            if value is not None:
                value = round(value) if kind == "knn" else float(f"{value:.4g}")
            if value is None or value < 1 and kind == "knn" or value in values:
                break
            values.append(value)
            scores.append(evaluate({name: value, "features": f}))
    acc, setting, predict, facts = best
    row = {"method": method, "percent": percent, "draw": draw, "train_images": len(y), "setting": setting,
           "val_acc1": acc, "test_acc1": top1(predict(test_x[setting["features"]]), test_y), **facts}
    if chosen is None:
        row["sweep"] = sweep
    return row


def same_fit(rows, method, percent, draw, setting, fractions):
    """The row of an earlier draw that this one would only repeat, or None: a method that draws nothing
    (logistic regression, kNN) on the same training folder with the same `setting` (at 100% every draw has all
    the labels) gives the same numbers, so its line is that draw's, marked `same_as_draw`."""
    if METHODS[method][0].startswith("cnn") or setting is None:
        return None
    folder = os.path.realpath(fractions[(percent, draw)])
    for d in range(draw):
        row = rows.get((method, percent, d))
        if row and "same_as_draw" not in row and row["setting"] == setting and (percent, d) in fractions \
                and os.path.realpath(fractions[(percent, d)]) == folder:
            return {k: v for k, v in row.items() if k != "sweep"}
    return None


def parse_fractions(parser, items):
    """{(percent, draw): folder} of --train; a fraction and draw given twice is refused."""
    fractions = {}
    for item in items:
        key, sep, folder = item.partition("=")
        percent, colon, draw = key.partition(":")
        if not sep or not colon or not percent.isdigit() or not draw.isdigit():
            parser.error(f"argument --train: {item}: expected PERCENT:DRAW=DIR")
        if (percent, int(draw)) in fractions:
            parser.error(f"argument --train: {key} given twice")
        fractions[(percent, int(draw))] = folder
    return fractions


def parse_epochs(parser, items, percents):
    """{percent: the CNN's epochs} of --epochs, one for each of `percents` (those of --train)."""
    epochs = {}
    for item in items:
        percent, sep, value = item.partition("=")
        if not sep or not percent.isdigit() or not value.isdigit() or int(value) < 1 or percent in epochs:
            parser.error(f"argument --epochs: {item}: expected PERCENT=N, N >= 1, each percent once")
        epochs[percent] = int(value)
    missing = sorted(set(percents) - set(epochs), key=int)
    if missing:
        parser.error(f"argument --epochs: no epochs for {', '.join(p + '%' for p in missing)} (given in --train)")
    return epochs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", nargs="+", required=True, metavar="PERCENT:DRAW=DIR")
    parser.add_argument("--val", required=True, metavar="DIR", help="ImageFolder of the validation images")
    parser.add_argument("--test", required=True, metavar="DIR", help="ImageFolder of the test images")
    parser.add_argument("--checkpoint", required=True, help="MAE pre-training checkpoint")
    parser.add_argument("--model", default="vit_micro_patch4", choices=models_vit.MODELS)
    parser.add_argument("--input_size", type=positive_int, default=28)
    parser.add_argument("--epochs", nargs="+", required=True, metavar="PERCENT=N", help="the CNN's epochs")
    parser.add_argument("--crop_pct", type=float, required=True, help="the ViTs' evaluation crop (1: the whole "
                        "image), applied to every image the baselines see")
    parser.add_argument("--crop_min", type=float, required=True, help="the ViTs' training crop's smallest area, "
                        "for the CNN trained with their augmentation")
    parser.add_argument("--max_iter", type=int, default=5000, help="L-BFGS iterations at most")
    parser.add_argument("--log", required=True, help="JSON lines file, appended to")
    args = parser.parse_args(argv)
    check_model_input(parser, args.model, args.input_size, models_vit.MODELS)
    for flag in ("crop_pct", "crop_min"):
        if not 0.0 < getattr(args, flag) <= 1.0:
            parser.error(f"argument --{flag}: needs 0 < value <= 1, got {getattr(args, flag)}")
    if args.max_iter < 1:
        parser.error(f"argument --max_iter: must be >= 1, got {args.max_iter}")
    fractions = parse_fractions(parser, args.train)
    epochs = parse_epochs(parser, args.epochs, {percent for percent, _ in fractions})
    fits = os.path.join(os.path.dirname(os.path.abspath(args.log)), "fits")
    try:
        os.makedirs(fits, exist_ok=True)
    except OSError as e:
        parser.error(f"argument --log: cannot make {fits} for the CNN fits' checkpoints ({e.strerror or e})")
    found, cut = read_baselines(args.log)
    if cut:
        drop_cut_line(args.log)
        print(f"{args.log}: its last line was cut off (by a kill?): dropped, its work is done again")
    rows = {(r["method"], r["percent"], r["draw"]): r for r in found}
    paddle.set_device("cpu")
    classes = ImageFolder(args.val).classes
    model = models_vit.__dict__[args.model](num_classes=len(classes), img_size=args.input_size, global_pool=False)
    load_pretrained(model, args.checkpoint)
    model.eval()

    evaluation = eval_transform(args.input_size, args.crop_pct)

    def inputs(folder):
        raw, y = load_folder(folder, classes, args.val)
        seen = np.stack([evaluation(image) for image in raw])
        return {"raw": raw, "pixels": pixels(seen), **mae_features(seen, model)}, y

    val, test = inputs(args.val), inputs(args.test)
    order = sorted(fractions, key=lambda key: (int(key[0]), key[1]))
    loaded = (None, None)  # (folder, its inputs): the draws of 100% share one folder, read once
    for percent, draw in order:
        todo = [m for m in METHODS if (m, percent, draw) not in rows]
        if not todo:
            continue
        folder = os.path.realpath(fractions[(percent, draw)])
        if loaded[0] != folder:
            loaded = (folder, inputs(fractions[(percent, draw)]))
        train = loaded[1]
        for method in todo:
            source = None if draw == 0 and percent in ("1", "10") else rows.get((method, "10" if percent == "100"
                                                                                  else percent, 0))
            if source is None and not (draw == 0 and percent in ("1", "10")):
                parser.error(f"{method} at {percent}% draw {draw}: its setting comes from draw 0, not given")
            setting = None if source is None else source["setting"]
            same = same_fit(rows, method, percent, draw, setting, fractions)
            row = {**same, "draw": draw, "same_as_draw": same["draw"]} if same else run(
                method, percent, draw, train, val, test, len(classes), epochs[percent], setting, args.max_iter,
                args.crop_min, fits)
            rows[(method, percent, draw)] = row
            print(json.dumps({k: v for k, v in row.items() if k != "sweep"}), flush=True)
            try:
                with open(args.log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as e:
                raise WriteError(f"{args.log}: cannot append the line of {method} at {percent}% draw {draw} "
                                 f"({e.strerror or e}); rerun to do it again") from None
            for path in glob.glob(fit_file(fits, method, percent, draw)):
                os.remove(path)


if __name__ == "__main__":
    run_main(main)
