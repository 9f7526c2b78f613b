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

from util.dist import all_reduce_sum, get_rank, get_world_size
from util.errors import DataError

POOLS = ("avg", "cls")


def rank_share(count):
    """The dataset indices this rank takes: every world_size-th, from its rank (none when count is smaller
    than the rank)."""
    return list(range(get_rank(), count, get_world_size()))


def feature_batches(model, loader, pool="avg", label="", print_every=50, amp_dtype=None):
    """[batch, D] float32 NumPy features of each batch of `loader`, in eval mode without gradients (the
    model's mode is restored afterwards), under autocast to `amp_dtype` when given (GPU). Prints progress
    every `print_every` batches."""
    start, was_training = time.time(), model.training
    model.eval()
    try:
        with paddle.no_grad(), paddle.amp.auto_cast(enable=amp_dtype is not None, dtype=amp_dtype or "float16"):
            for i, (images, *_) in enumerate(loader):
                yield model.forward_features(images, pool).astype("float32").numpy()
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


def extract(model, loader_for, count, pool="avg", label="", print_every=50, amp_dtype=None):
    """Features of the `count` samples of a dataset, in its order, on every rank: each rank takes its
    rank_share (loader_for(indices) -> a loader of (images, labels) over those indices), then the shares
    are gathered."""
    dim = model.cls_token.shape[-1]
    batches = list(feature_batches(model, loader_for(rank_share(count)), pool, label, print_every, amp_dtype))
    return gather_rows(np.concatenate(batches) if batches else np.zeros((0, dim), np.float32), count)


MARGIN = 8  # candidates beyond k that the float32 pass keeps for the exact re-scoring
BLOCK_ROWS, BLOCK_QUERIES = 4096, 256  # a block of similarities selected at a time: it stays in the cache
PRODUCT_QUERIES = 2048  # queries multiplied with a bank block at once: 32 MB of similarities, whatever Q
RESCORE_QUERIES = 256  # queries whose candidates are re-scored at a time (float64: 256 x keep x D)


def _unit(rows):
    """Rows scaled to unit length in float64 (zero rows stay zero, as paddle's normalize with eps 1e-12)."""
    rows = np.asarray(rows, np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def _keep_best(best_v, best_i, sims, start, keep):
    """Fold a block's float32 similarities (columns = bank rows from `start`) into the running `keep` best
    per query, looking only at entries above a threshold: a query's worst kept value, or for the first block
    the keep-th best of a strided sample of its columns (never above the block's own keep-th best); only the
    queries with such entries are merged."""
    q, c = sims.shape
    if np.isneginf(best_v).all():
        over = np.arange(q)
        sample = sims[:, ::max(1, c // (8 * keep))]
        low = np.partition(sample, sample.shape[1] - keep, axis=1)[:, sample.shape[1] - keep, None] \
            if sample.shape[1] > keep else np.full((q, 1), -np.inf, np.float32)
        rows, cols = np.nonzero(sims >= low)
    else:
        worst = best_v.min(axis=1, keepdims=True)
        over = np.flatnonzero(sims.max(axis=1, keepdims=True) > worst)  # one fast pass; most queries stop here
        if not over.size:
            return
        rows, cols = np.nonzero(sims[over] > worst[over])
    v = np.concatenate([best_v[over].ravel(), sims[over[rows], cols]])
    r = np.concatenate([np.repeat(np.arange(len(over)), keep), rows])
    i = np.concatenate([best_i[over].ravel(), cols + start])
    order = np.lexsort((-v, r))
    rank = np.arange(len(order)) - np.searchsorted(r[order], r[order])
    chosen = order[rank < keep]
    best_v[over], best_i[over] = v[chosen].reshape(-1, keep), i[chosen].reshape(-1, keep)


def nearest(bank, queries, k):
    """(similarities [Q, k] float64, bank rows [Q, k]) of each query's k nearest rows of `bank` by cosine
    similarity, best first (ties: the lower row), equal to a float64 search. The bank (NumPy, memory-mapped
    ones included) is read block by block in float32 keeping k + MARGIN candidates, which are re-scored in
    float64; a query whose candidates could miss a neighbour (float32's error bound) is searched again in
    float64."""
    n = len(bank)
    k, keep = min(k, n), min(k + MARGIN, n)
    q64 = _unit(queries)
    q32 = q64.astype(np.float32)
    best_v = np.full((len(q64), keep), -np.inf, np.float32)
    best_i = np.zeros((len(q64), keep), np.int64)
    rows = BLOCK_ROWS
    for start in range(0, n, rows):
        block = np.array(bank[start:start + rows], np.float32)
        block /= np.maximum(np.sqrt(np.einsum("ij,ij->i", block, block)), 1e-12)[:, None]
        for p in range(0, len(q32), PRODUCT_QUERIES):  # large products: the matrix product's own speed
            sims = q32[p:p + PRODUCT_QUERIES] @ block.T
            for a in range(0, len(sims), BLOCK_QUERIES):
                b = min(a + BLOCK_QUERIES, len(sims))
                _keep_best(best_v[p + a:p + b], best_i[p + a:p + b], sims[a:b], start, keep)
    sims = np.empty(best_i.shape)
    for a in range(0, len(q64), RESCORE_QUERIES):
        b = a + RESCORE_QUERIES
        cand = np.asarray(bank[best_i[a:b].ravel()], np.float64).reshape(-1, keep, q64.shape[1])
        norms = np.maximum(np.sqrt(np.einsum("qkd,qkd->qk", cand, cand)), 1e-12)
        sims[a:b] = np.einsum("qd,qkd->qk", q64[a:b], cand) / norms
    order = np.lexsort((best_i, -sims))  # per query: the most similar first, ties by row
    sims, idx = np.take_along_axis(sims, order, 1)[:, :k], np.take_along_axis(best_i, order, 1)[:, :k]
    error = q64.shape[1] * 2.0 ** -23  # twice the bound on a float32 dot product of unit vectors: D * 2^-24
    unsure = np.flatnonzero(best_v.min(axis=1) + error >= sims[:, -1]) if keep < n else []
    for qi in unsure:
        row = np.concatenate([_unit(bank[s:s + rows]) @ q64[qi] for s in range(0, n, rows)])
        near = np.lexsort((np.arange(n), -row))[:k]
        sims[qi], idx[qi] = row[near], near
    return sims, idx


def knn_vote(sims, labels, classes, t):
    """Predicted classes of the weighted k-NN vote: each neighbour adds exp((similarity - nearest) / t) to its
    class (the weights exp(similarity / t) up to one factor per query, without overflow at any t)."""
    scores = np.zeros((len(sims), classes))
    np.add.at(scores, (np.repeat(np.arange(len(sims)), sims.shape[1]), labels.ravel()),
              np.exp((sims - sims[:, :1]) / t).ravel())
    return scores.argmax(axis=1)


def knn_top1(train_features, train_labels, test_features, test_labels, classes, k=20, t=0.07, chunk=1024):
    """Top-1 (%) of the weighted k-NN classifier (as in instance discrimination): cosine similarity, the k
    nearest training samples vote with weight exp(similarity / t). The neighbours are those of a float64
    search (see nearest); `chunk` queries at a time. Inputs it would have to guess about are a DataError
    (check_knn_inputs)."""
    train_labels, test_labels = check_knn_inputs(train_features, train_labels, test_features, test_labels, classes,
                                                 k, t)
    correct = 0
    for i in range(0, len(test_labels), chunk):
        sims, idx = nearest(train_features, test_features[i:i + chunk], k)
        correct += int((knn_vote(sims, train_labels[idx], classes, t) == test_labels[i:i + chunk]).sum())
    return 100.0 * correct / len(test_labels)


def check_knn_inputs(train_features, train_labels, test_features, test_labels, classes, k, t):
    """The labels as int64 arrays, or a DataError naming the argument: features that are not [rows, D] with
    one whole-number label per row in [0, classes) (a folder of images without class folders is extracted
    with labels -1), train and test of different D, no rows, a row not finite, classes or k < 1, t not a
    positive number."""
    if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or classes < 1:
        raise DataError(f"classes: {classes!r} is not a whole number >= 1")
    checked = []
    for name, features, labels in (("train", train_features, train_labels), ("test", test_features, test_labels)):
        labels = np.asarray(labels)
        if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
            raise DataError(f"{name}_labels: not a list of whole numbers ({labels.dtype}, shape {list(labels.shape)})")
        if len(np.shape(features)) != 2 or len(features) != len(labels):
            raise DataError(f"{name}_features: shape {list(np.shape(features))} for {len(labels)} {name}_labels; "
                            "one [D] row per label")
        outside = labels[(labels < 0) | (labels >= classes)]
        if outside.size:
            raise DataError(f"{name}_labels: {outside[0]} is not a class in [0, {classes}) (a folder of images "
                            "without class folders is extracted with labels -1)")
        checked.append(labels.astype(np.int64))
    if np.shape(train_features)[1] != np.shape(test_features)[1]:
        raise DataError(f"test_features: {np.shape(test_features)[1]} numbers per row, train_features "
                        f"{np.shape(train_features)[1]}")
    for name, features in (("train_features", train_features), ("test_features", test_features)):
        if not len(features):
            raise DataError(f"{name}: no rows")
        for start in range(0, len(features), BLOCK_ROWS):  # a NaN row would be left out, or vote by chance
            bad = np.flatnonzero(~np.isfinite(np.asarray(features[start:start + BLOCK_ROWS])).all(axis=1))
            if bad.size:
                raise DataError(f"{name}: row {start + bad[0]} is not finite (NaN or infinite)")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise DataError(f"k: {k!r} is not a whole number >= 1")
    if not (isinstance(t, (int, float, np.number)) and np.isfinite(t) and t > 0):
        raise DataError(f"t: {t!r} is not a positive number")
    return checked


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


DEFAULT_PER_CLASS = 50  # the monitor's training images per class unless --knn_train_per_class says otherwise


def class_subset(data, per_class, seed, strict):
    """`per_class` samples of each class of an ImageFolder (drawn from `seed`, kept in the dataset's order),
    as a SampleIndex; a class with fewer is a DataError when `strict`, else taken whole."""
    import os

    from util.image_index import SampleIndex

    labels = data.samples.labels if hasattr(data.samples, "labels") else np.array([t for _, t in data.samples])
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(len(data.classes) + 1))
    rng, chosen = np.random.default_rng(seed), []
    for c in range(len(data.classes)):
        members = order[bounds[c]:bounds[c + 1]]
        if strict and len(members) < per_class:
            raise DataError(f"--knn_train_per_class {per_class}: class folder "
                            f"{os.path.join(data.root, data.classes[c])} holds {len(members)} images; choose at most "
                            "that (0: all)")
        if len(members):
            chosen += list(members[np.sort(rng.permutation(len(members))[:per_class])])
    return SampleIndex([data.samples[i][0] for i in chosen], labels[chosen])


def knn_monitor(model, args):
    """epoch -> {'knn_acc1': top-1 of the weighted k-NN on val/ against train/ features} every --knn_freq
    epochs and at the last, else {}: how good the encoder's features are while pre-training runs (eval
    transform, no masking, average-pooled patch tokens, autocast as training on GPU). A class-balanced subset
    of train/ (--knn_train_per_class, default DEFAULT_PER_CLASS) keeps a pass at ImageNet size near 8% of an
    epoch (see docs/recipes.md). Each rank keeps the features of its share of train/ and searches them; the
    ranks exchange only each query's k best (fixed-size collectives). A missing val/ stops the run at start."""
    import os

    from util.datasets import ImageFolder
    from util.transforms import eval_transform

    transform = eval_transform(args.input_size, args.crop_pct)
    train = ImageFolder(os.path.join(args.data_path, "train"), transform=transform)
    val = ImageFolder(os.path.join(args.data_path, "val"), transform=transform, classes=train.classes,
                      classes_from=train.root)
    per_class = DEFAULT_PER_CLASS if args.knn_train_per_class is None else args.knn_train_per_class
    if per_class:
        train.samples = class_subset(train, per_class, args.seed, strict=args.knn_train_per_class is not None)
    print(f"k-NN monitor: {len(train)} train / {len(val)} val images, k={args.knn_k}, t={args.knn_t}, "
          f"every {args.knn_freq} epoch(s)")
    train_labels, val_labels = train.samples.labels, val.samples.labels  # arrays: no pass over N in Python
    amp = args.amp_dtype if args.device.startswith("gpu") and not args.no_amp else None

    def monitor(epoch):
        if (epoch + 1) % args.knn_freq and epoch + 1 != args.epochs:
            return {}
        mine = rank_share(len(train))
        batches = list(feature_batches(model, loaders_over(train, args.batch_size, args.num_workers)(mine), "avg",
                                       "k-NN train", amp_dtype=amp))
        bank = np.concatenate(batches) if batches else np.zeros((0, model.cls_token.shape[-1]), np.float32)
        queries = extract(model, loaders_over(val, args.batch_size, args.num_workers), len(val), "avg",
                          label="k-NN val", amp_dtype=amp)
        sims, idx = nearest_over_ranks(bank, np.asarray(mine, np.int64), queries, args.knn_k)
        acc = 100.0 * float((knn_vote(sims, train_labels[idx], len(train.classes), args.knn_t) == val_labels).mean())
        print(f"k-NN monitor (epoch {epoch}): top-1 {acc:.2f}%")
        return {"knn_acc1": acc}

    return monitor


def nearest_over_ranks(bank, rows, queries, k):
    """nearest() of the queries in the union of every rank's bank (this rank's: `bank`, whose rows are dataset
    rows `rows`): each rank's k best are gathered (fixed-size tensors, padded for a rank with fewer rows) and
    the k best of all kept, ties by dataset row."""
    k = min(k, int(all_reduce_sum([float(len(bank))])[0]))
    sims = np.full((len(queries), k), -np.inf)
    idx = np.full((len(queries), k), np.iinfo(np.int64).max, np.int64)
    if len(bank):
        local_sims, local_idx = nearest(bank, queries, k)
        sims[:, :local_sims.shape[1]], idx[:, :local_sims.shape[1]] = local_sims, rows[local_idx]
    if get_world_size() > 1:
        gathered_sims, gathered_idx = [], []
        dist.all_gather(gathered_sims, paddle.to_tensor(sims))
        dist.all_gather(gathered_idx, paddle.to_tensor(idx))
        sims = np.concatenate([t.numpy() for t in gathered_sims], axis=1)
        idx = np.concatenate([t.numpy() for t in gathered_idx], axis=1)
    order = np.lexsort((idx, -sims))[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)
