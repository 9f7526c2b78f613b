"""Encoder features without masking, gathered over the ranks, and the weighted k-NN classifier on them: the
k-NN monitor of pre-training and main_extract.py.

The default feature is the average of the patch tokens through the final norm: MAE trains every patch
token through the decoder's reconstruction, while the class token gets no loss of its own in pre-training
(the paper's linear probe needs an extra BatchNorm for it); 'cls' gives the class token through the final
norm."""
import time

import numpy as np
import paddle
import paddle.distributed as dist

from util.dist import get_rank, get_world_size

POOLS = ("avg", "cls")


def encoder_features(model, images, pool="avg"):
    """[N, D] features of an MAE (models_mae) or ViT (models_vit) encoder on a normalised batch, with every
    patch visible. 'avg': the mean of the patch tokens through fc_norm (a global-pool ViT) or else the final
    norm; 'cls': the class token through the final norm."""
    x = model.patch_embed(images) + model.pos_embed[:, 1:, :]
    cls = (model.cls_token + model.pos_embed[:, :1, :]).expand([x.shape[0], -1, -1])
    x = paddle.concat([cls, x], axis=1)
    for blk in model.blocks:
        x = blk(x)
    if pool == "cls":
        return model.norm(x)[:, 0]
    norm = model.fc_norm if getattr(model, "global_pool", False) else model.norm
    return norm(x[:, 1:, :].mean(axis=1))


def has_pool(model, pool):
    """Whether the model holds the norm that `pool` needs (a global-pool ViT has no final norm)."""
    return pool == "avg" or isinstance(getattr(model, "norm", None), paddle.nn.Layer)


def rank_share(count):
    """The dataset indices this rank takes: every world_size-th, from its rank (none when count is smaller
    than the rank)."""
    return list(range(get_rank(), count, get_world_size()))


def feature_batches(model, loader, pool="avg", label="", print_every=50):
    """[batch, D] float32 NumPy features of each batch of `loader`, in eval mode without gradients (the
    model's mode is restored afterwards). Prints progress every `print_every` batches."""
    start, was_training = time.time(), model.training
    model.eval()
    try:
        with paddle.no_grad():
            for i, (images, *_) in enumerate(loader):
                yield encoder_features(model, images, pool).astype("float32").numpy()
                if print_every and (i + 1) % print_every == 0:
                    print(f"{label} features: {i + 1}/{len(loader)} batches ({time.time() - start:.0f} s)")
    finally:
        model.train(was_training)


def gather_rows(share, count):
    """The [count, D] rows of a dataset on every rank, from each rank's rows of rank_share(count) (as
    [n_rank, D] float32, zero rows included): one fixed-size all_gather of tensors, every share padded to the
    largest."""
    world = get_world_size()
    if world == 1:
        return share
    rows = -(-count // world)
    padded = np.zeros((rows, share.shape[1]), np.float32)
    padded[:len(share)] = share
    shares = []
    dist.all_gather(shares, paddle.to_tensor(padded))
    out = np.zeros((count, share.shape[1]), np.float32)
    for r, part in enumerate(shares):
        n = len(range(r, count, world))
        out[r::world] = part.numpy()[:n]
    return out


def extract(model, loader_for, count, pool="avg", label="", print_every=50):
    """Features of the `count` samples of a dataset, in its order, on every rank: each rank takes its
    rank_share (loader_for(indices) -> a loader of (images, labels) over those indices), then the shares
    are gathered."""
    dim = model.cls_token.shape[-1]
    batches = list(feature_batches(model, loader_for(rank_share(count)), pool, label, print_every))
    return gather_rows(np.concatenate(batches) if batches else np.zeros((0, dim), np.float32), count)


def knn_top1(train_features, train_labels, test_features, test_labels, classes, k=20, t=0.07, chunk=1024):
    """Top-1 (%) of the weighted k-NN classifier (as in instance discrimination): cosine similarity, the k
    nearest training samples vote with weight exp(similarity / t). Each query's weights are taken relative to
    its nearest neighbour's, exp((similarity - nearest) / t): the same vote (one factor per query), and no
    overflow at any temperature."""
    # float64: exp(similarity / 0.07) turns float32 rounding of near neighbours into flipped votes
    train = paddle.nn.functional.normalize(paddle.to_tensor(train_features, dtype="float64"), axis=1)
    test = paddle.nn.functional.normalize(paddle.to_tensor(test_features, dtype="float64"), axis=1)
    train_labels = paddle.to_tensor(np.asarray(train_labels, np.int64))
    k = min(k, train.shape[0])
    correct = 0
    for i in range(0, test.shape[0], chunk):
        sim, near = paddle.topk(test[i:i + chunk] @ train.T, k, axis=1)
        votes = paddle.nn.functional.one_hot(paddle.gather(train_labels, near.flatten()).reshape(near.shape),
                                             classes).astype("float64")
        scores = (votes * paddle.exp((sim - sim[:, :1]) / t).unsqueeze(-1)).sum(axis=1)
        correct += int((scores.argmax(axis=1).numpy() == np.asarray(test_labels[i:i + chunk])).sum())
    return 100.0 * correct / max(1, test.shape[0])


class _Batches:
    def __init__(self, indices, batch_size):
        self.batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def loaders_over(dataset, batch_size, num_workers=0):
    """indices -> a loader of (images, labels) batches over those samples of `dataset`, in order."""
    from util.datasets import Loader
    return lambda indices: Loader(dataset, _Batches(indices, batch_size), num_workers)


def knn_monitor(model, args):
    """epoch -> {'knn_acc1': top-1 of the weighted k-NN on val/ against train/ features} every --knn_freq
    epochs and at the last, else {}: how good the encoder's features are while pre-training runs (eval
    transform, no masking, average-pooled patch tokens; --knn_train_per_class keeps a class-balanced subset
    of train/ so that ImageNet-size runs stay cheap). A missing val/ stops the run at start."""
    import os

    from util.datasets import DataError, ImageFolder
    from util.transforms import eval_transform

    transform = eval_transform(args.input_size, args.crop_pct)
    train = ImageFolder(os.path.join(args.data_path, "train"), transform=transform)
    val = ImageFolder(os.path.join(args.data_path, "val"), transform=transform, classes=train.classes,
                      classes_from=train.root)
    if args.knn_train_per_class:
        rng = np.random.default_rng(args.seed)
        by_class = {}
        for sample in train.samples:
            by_class.setdefault(sample[1], []).append(sample)
        smallest = min(by_class, key=lambda c: len(by_class[c]))
        if len(by_class[smallest]) < args.knn_train_per_class:
            raise DataError(f"--knn_train_per_class {args.knn_train_per_class}: class folder "
                            f"{os.path.join(train.root, train.classes[smallest])} holds {len(by_class[smallest])} "
                            "images; choose at most that (0: all)")
        train.samples = [s for c in sorted(by_class) for s in
                         (by_class[c][i] for i in sorted(rng.permutation(len(by_class[c]))[:args.knn_train_per_class]))]
    print(f"k-NN monitor: {len(train)} train / {len(val)} val images, k={args.knn_k}, t={args.knn_t}, "
          f"every {args.knn_freq} epoch(s)")
    labels = [np.array([t for _, t in d.samples]) for d in (train, val)]

    def monitor(epoch):
        if (epoch + 1) % args.knn_freq and epoch + 1 != args.epochs:
            return {}
        feats = [extract(model, loaders_over(d, args.batch_size, args.num_workers), len(d), "avg", label=name)
                 for d, name in ((train, "k-NN train"), (val, "k-NN val"))]
        acc = knn_top1(feats[0], labels[0], feats[1], labels[1], len(train.classes), args.knn_k, args.knn_t)
        print(f"k-NN monitor (epoch {epoch}): top-1 {acc:.2f}%")
        return {"knn_acc1": acc}

    return monitor
