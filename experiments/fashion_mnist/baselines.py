"""Baselines of the Fashion-MNIST study that need no training script: logistic regression and k-nearest
neighbours on raw pixels, and kNN on the frozen MAE encoder's features.

    python experiments/fashion_mnist/baselines.py --train 1=DIR 10=DIR 100=DIR --val DIR \
        --checkpoint PRETRAINED.pd --model vit_micro_patch4 --input_size 28 --log OUT/log.txt

Each `--train` folder is an ImageFolder of one label fraction (in percent). One JSON line per method and
fraction goes to --log; a method whose line is already there is skipped, so the stage resumes.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import util  # noqa: E402,F401  (first: filters Paddle's import-time warnings)
import numpy as np  # noqa: E402
import paddle  # noqa: E402

import models_vit  # noqa: E402
from util.checkpoint import load_pretrained  # noqa: E402
from util.datasets import ImageFolder, load_image  # noqa: E402
from util.transforms import eval_transform  # noqa: E402

K = 5  # neighbours (scikit-learn's default)
C = 1.0  # inverse L2 strength of the logistic regression (scikit-learn's default)


def raw_pixels(folder):
    """Grey levels in [0, 1], one 784-d row per image (the images are grey stored as RGB), and labels."""
    data = ImageFolder(folder)
    x = np.stack([np.asarray(load_image(p).convert("L"), dtype=np.float32).reshape(-1) / 255.0
                  for p, _ in data.samples])
    return x, np.array([t for _, t in data.samples], dtype=np.int64)


def encoder_features(folder, model, input_size, batch_size=500):
    """The class token after the final norm (what the linear probe sees), on the evaluation transform."""
    transform = eval_transform(input_size)
    data = ImageFolder(folder)
    feats = []
    with paddle.no_grad():
        for i in range(0, len(data.samples), batch_size):
            batch = np.stack([transform(load_image(p)) for p, _ in data.samples[i:i + batch_size]])
            feats.append(model.forward_features(transform.batch(batch)).numpy())
    return np.concatenate(feats)


def logistic_regression(x, y, classes, max_iter=5000):
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
        loss = paddle.nn.functional.cross_entropy(x @ w + b, y) + (w * w).sum() / (2 * C * x.shape[0])
        loss.backward()
        return loss

    opt.step(closure)
    closure()
    grad = float(paddle.concat([w.grad.flatten(), b.grad]).abs().max())
    return w.numpy(), b.numpy(), int(opt.state_dict()["state"]["n_iter"]), grad


def knn_predict(train_x, train_y, test_x, classes, chunk=1000):
    """Majority vote of the K nearest training rows by cosine similarity; a tie goes to the tied class whose
    nearest neighbour is nearer."""
    train = train_x / np.linalg.norm(train_x, axis=1, keepdims=True).clip(1e-12)
    test = test_x / np.linalg.norm(test_x, axis=1, keepdims=True).clip(1e-12)
    pred = []
    for i in range(0, len(test), chunk):
        sim = test[i:i + chunk] @ train.T
        near = np.argsort(-sim, axis=1, kind="stable")[:, :K]
        rows, labels = np.arange(len(near))[:, None], train_y[near]
        votes = np.zeros((len(near), classes))
        np.add.at(votes, (rows, labels), 1.0)
        first = np.full((len(near), classes), K)
        for rank in range(K - 1, -1, -1):  # ends with the rank of each class's nearest neighbour
            first[rows[:, 0], labels[:, rank]] = rank
        votes -= first / (K + 1)
        pred.append(votes.argmax(axis=1))
    return np.concatenate(pred)


def top1(pred, y):
    return float((pred == y).mean() * 100.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", nargs="+", required=True, metavar="PERCENT=DIR")
    parser.add_argument("--val", required=True, metavar="DIR")
    parser.add_argument("--checkpoint", required=True, help="MAE pre-training checkpoint")
    parser.add_argument("--model", default="vit_micro_patch4", choices=models_vit.MODELS)
    parser.add_argument("--input_size", type=int, default=28)
    parser.add_argument("--log", required=True, help="JSON lines file, appended to")
    args = parser.parse_args(argv)
    fractions = {}
    for item in args.train:
        percent, sep, folder = item.partition("=")
        if not sep or not percent.replace(".", "", 1).isdigit():
            parser.error(f"--train {item}: expected PERCENT=DIR")
        fractions[percent] = folder
    done = set()
    if os.path.isfile(args.log):
        with open(args.log, encoding="utf-8") as f:
            done = {(r["method"], r["percent"]) for r in map(json.loads, filter(str.strip, f))}
    paddle.set_device("cpu")
    classes = len(ImageFolder(args.val).classes)
    val_x, val_y = raw_pixels(args.val)
    model = models_vit.__dict__[args.model](num_classes=classes, img_size=args.input_size)
    load_pretrained(model, args.checkpoint)
    model.eval()
    val_f = encoder_features(args.val, model, args.input_size)
    for percent, folder in fractions.items():
        todo = [m for m in ("logistic_regression_pixels", "knn_pixels", "knn_mae") if (m, percent) not in done]
        if not todo:
            continue
        x, y = raw_pixels(folder)
        for method in todo:
            row = {"method": method, "percent": percent, "train_images": len(y), "test_images": len(val_y)}
            if method == "logistic_regression_pixels":
                w, b, iters, grad = logistic_regression(x, y, classes)
                row.update(test_acc1=top1((val_x @ w + b).argmax(axis=1), val_y), lbfgs_iterations=iters,
                           max_abs_gradient=grad)
            elif method == "knn_pixels":
                row.update(test_acc1=top1(knn_predict(x, y, val_x, classes), val_y), k=K)
            else:
                row.update(test_acc1=top1(knn_predict(encoder_features(folder, model, args.input_size), y, val_f,
                                                      classes), val_y), k=K)
            print(json.dumps(row), flush=True)
            with open(args.log, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
