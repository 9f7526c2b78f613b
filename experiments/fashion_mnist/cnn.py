"""The study's reference point from outside MAE: a small convolutional network trained from scratch on the
labelled images alone (two 3x3 convolutions of 16 and 32 channels with max pooling, a 64-unit hidden
layer with dropout 0.25, about 106,000 parameters). Adam, cosine learning rate over the same epochs as
the ViTs' fine-tuning, batch 128, random horizontal flips (or another augmentation); grey levels scaled to
[-1, 1]."""
import math

import numpy as np
import paddle
from paddle import nn


class SmallCNN(nn.Layer):
    def __init__(self, classes):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2D(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2D(2),
                                      nn.Conv2D(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2D(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Dropout(0.25),
                                        nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def _images(x):
    """(n, 784) grey levels in [0, 1] -> (n, 1, 28, 28) in [-1, 1]."""
    return paddle.to_tensor(x.reshape(-1, 1, 28, 28) * 2.0 - 1.0, dtype="float32")


def predict(model, x, batch_size=1000):
    model.eval()
    with paddle.no_grad():
        return np.concatenate([model(_images(x[i:i + batch_size])).argmax(axis=1).numpy()
                               for i in range(0, len(x), batch_size)])


def train(x, y, classes, lr, epochs, seed, batch_size=128, augment=None):
    """The trained network and its final training loss (mean of the last epoch's batches). augment(index)
    gives the training rows of a batch (default: x's rows, each flipped with probability 1/2)."""
    paddle.seed(seed)
    rng = np.random.default_rng(seed)
    model = SmallCNN(classes)
    steps = epochs * max(1, len(x) // batch_size)
    schedule = paddle.optimizer.lr.LambdaDecay(lr, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / steps)))
    opt = paddle.optimizer.Adam(learning_rate=schedule, parameters=model.parameters())
    for _ in range(epochs):
        model.train()
        order, losses = rng.permutation(len(x)), []
        for i in range(0, max(1, len(x) // batch_size) * batch_size, batch_size):
            index = order[i:i + batch_size]
            if augment is None:
                images = x[index].reshape(-1, 28, 28)
                flip = rng.random(len(index)) < 0.5
                images[flip] = images[flip, :, ::-1]
            else:
                images = augment(index)
            loss = nn.functional.cross_entropy(model(_images(images)), paddle.to_tensor(y[index]))
            opt.clear_grad()
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss)
    return model, float(paddle.stack(losses).mean())
