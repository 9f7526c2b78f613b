"""The study's reference point from outside MAE: a small convolutional network trained from scratch on the
labelled images alone (two 3x3 convolutions of 16 and 32 channels with max pooling, a 64-unit hidden
layer with dropout 0.25, about 106,000 parameters at 28x28 pixels). Adam, cosine learning rate over the same epochs as
the ViTs' fine-tuning, batch 128, random horizontal flips (or another augmentation); grey levels scaled to
[-1, 1]. A fit given a checkpoint file resumes from it, so a stopped sweep loses at most a minute."""
import math
import os
import random
import time

import numpy as np
import paddle
from paddle import nn

from util import compat
from util.checkpoint import load_optimizer_state, optimizer_state
from util.errors import CheckpointError
from util.weights import load_file, load_model_weights, save_file


class SmallCNN(nn.Layer):
    def __init__(self, classes, side=28):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2D(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2D(2),
                                      nn.Conv2D(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2D(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * (side // 4) ** 2, 64), nn.ReLU(),
                                        nn.Dropout(0.25), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def side_of(x):
    """The side of the square images whose grey levels are the rows of x."""
    side = math.isqrt(x.shape[1])
    if side * side != x.shape[1]:
        raise ValueError(f"rows of {x.shape[1]} grey levels are not square images")
    return side


def _images(x):
    """(n, side * side) or (n, side, side) grey levels in [0, 1] -> (n, 1, side, side) in [-1, 1]."""
    x = x.reshape(len(x), -1)
    return paddle.to_tensor(x.reshape(len(x), 1, side_of(x), side_of(x)) * 2.0 - 1.0, dtype="float32")


def predict(model, x, batch_size=1000):
    model.eval()
    with paddle.no_grad():
        return np.concatenate([model(_images(x[i:i + batch_size])).argmax(axis=1).numpy()
                               for i in range(0, len(x), batch_size)])


def save_fit(path, fit, epoch, loss, model, opt, schedule, rng):
    """The fit after `epoch` epochs: weights, Adam's moments, the schedule and the three random streams (the
    batch order, dropout's and the augmentation's), so that a resumed fit is the uninterrupted one."""
    save_file({"fit": fit, "epoch": epoch, "loss": loss, "model": model.state_dict(),
               "optimizer": optimizer_state(opt, model), "schedule": schedule.state_dict(),
               "order_rng": rng.bit_generator.state, "dropout_rng": compat.cpu_generator_state(),
               "augment_rng": random.getstate()}, path)


def resume_fit(path, fit, model, opt, schedule, rng):
    """Restore what save_fit wrote; returns (epochs done, last epoch's loss). A file of another fit (other
    data, learning rate, epochs or seed), or with a field missing or malformed, is refused, naming the field."""
    ckpt, _ = load_file(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("fit"), dict):
        raise CheckpointError(f"{path}: not a checkpoint of a CNN fit")
    for key in fit:
        if ckpt["fit"].get(key) != fit[key]:
            raise CheckpointError(f"{path}: a fit with {key} {ckpt['fit'].get(key)!r}, this one has {fit[key]!r}")
    epoch, loss = ckpt.get("epoch"), ckpt.get("loss")
    if type(epoch) is not int or not 0 < epoch <= fit["epochs"]:
        raise CheckpointError(f"{path}: 'epoch' is {epoch!r}, not a count of epochs from 1 to {fit['epochs']}")
    if not isinstance(loss, float):
        raise CheckpointError(f"{path}: 'loss' is {loss!r}, not a number")
    if not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path}: 'model' is not a dict of weights")
    load_model_weights(model, ckpt["model"], path)
    load_optimizer_state(opt, model, ckpt, path)

    def restore_augment_rng(state):
        version, internal, gauss = state
        random.setstate((version, tuple(internal), gauss))

    restores = {"schedule": schedule.set_state_dict, "order_rng": lambda s: setattr(rng.bit_generator, "state", s),
                "dropout_rng": compat.set_cpu_generator_state, "augment_rng": restore_augment_rng}
    for key, restore in restores.items():
        try:
            restore(ckpt.get(key))
        except (TypeError, ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: '{key}' cannot be restored ({e})") from None
    return epoch, loss


def train(x, y, classes, lr, epochs, seed, batch_size=128, augment=None, checkpoint=None, save_every=60.0):
    """The trained network and its final training loss (mean of the last epoch's batches). augment(index)
    gives the training rows of a batch (default: x's rows, each flipped with probability 1/2). With
    `checkpoint` (a file path) the fit resumes from that file if it exists and writes it at the end and
    every `save_every` seconds between epochs."""
    paddle.seed(seed)
    rng = np.random.default_rng(seed)
    model = SmallCNN(classes, side_of(x))
    steps = epochs * max(1, len(x) // batch_size)
    schedule = paddle.optimizer.lr.LambdaDecay(lr, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / steps)))
    opt = paddle.optimizer.Adam(learning_rate=schedule, parameters=model.parameters())
    fit = {"images": len(x), "classes": classes, "lr": lr, "epochs": epochs, "seed": seed,
           "batch_size": batch_size, "augment": augment is not None}
    done, loss = 0, None
    if checkpoint is not None and os.path.isfile(checkpoint):
        done, loss = resume_fit(checkpoint, fit, model, opt, schedule, rng)
    saved = time.monotonic()
    for epoch in range(done, epochs):
        model.train()
        order, losses = rng.permutation(len(x)), []
        for i in range(0, max(1, len(x) // batch_size) * batch_size, batch_size):
            index = order[i:i + batch_size]
            if augment is None:
                images = x[index].reshape(len(index), side_of(x), side_of(x))
                flip = rng.random(len(index)) < 0.5
                images[flip] = images[flip, :, ::-1]
            else:
                images = augment(index)
            batch_loss = nn.functional.cross_entropy(model(_images(images)), paddle.to_tensor(y[index]))
            opt.clear_grad()
            batch_loss.backward()
            opt.step()
            schedule.step()
            losses.append(batch_loss)
        loss = float(paddle.stack(losses).mean())
        if checkpoint is not None and (epoch + 1 == epochs or time.monotonic() - saved > save_every):
            save_fit(checkpoint, fit, epoch + 1, loss, model, opt, schedule, rng)
            saved = time.monotonic()
    return model, loss
