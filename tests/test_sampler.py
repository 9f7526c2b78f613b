"""The training sample stream (util.sampler): Paddle's order where Paddle's sampler is split-invariant, the
same samples in every optimizer step however the effective batch is split, whole steps only."""
import numpy as np
import paddle
import pytest

from util.sampler import EffectiveBatchSampler


def batches(count, batch_size, accum_iter, world_size, epoch=3):
    """Every rank's batches of one epoch: [rank][iteration] -> indices."""
    out = []
    for rank in range(world_size):
        sampler = EffectiveBatchSampler(count, batch_size, accum_iter, world_size, rank)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("count,batch_size,world_size", [(100, 8, 1), (100, 5, 2), (96, 4, 4)])
def test_paddles_order_where_it_does_not_pad(count, batch_size, world_size):
    """Where the dataset divides by the process count, Paddle's DistributedBatchSampler (shuffle, drop_last,
    seeded by the epoch) gives the same batches, so that such runs train as before."""
    ours = batches(count, batch_size, 1, world_size)
    for rank in range(world_size):
        paddles = paddle.io.DistributedBatchSampler(np.zeros(count), batch_size, num_replicas=world_size, rank=rank,
                                                    shuffle=True, drop_last=True)
        paddles.set_epoch(3)
        assert ours[rank] == list(paddles)


def test_every_optimizer_step_takes_the_same_samples_whatever_the_split():
    steps = {}
    for batch_size, accum_iter, world_size in ((8, 1, 1), (4, 2, 1), (4, 1, 2), (2, 2, 2), (1, 2, 4)):
        per_rank = batches(50, batch_size, accum_iter, world_size)
        iterations = len(per_rank[0])
        assert iterations == 50 // 8 * accum_iter  # whole steps only: 2 samples left out, as drop_last
        steps[(batch_size, accum_iter, world_size)] = [
            sorted(i for rank in per_rank for it in range(s * accum_iter, (s + 1) * accum_iter) for i in rank[it])
            for s in range(iterations // accum_iter)]
    first = steps[(8, 1, 1)]
    assert all(split == first for split in steps.values())
    assert len({i for step in first for i in step}) == 48  # no sample twice in an epoch


def test_a_stopped_epoch_continues_with_the_samples_not_yet_seen():
    """6 iterations of 2 processes x 4 = 48 samples; a single process with batch 4 continues at iteration 12."""
    two = batches(80, 4, 1, 2)
    seen = [i for it in range(6) for rank in two for i in rank[it]]
    one = batches(80, 4, 2, 1)[0]
    rest = [i for it in range(12, len(one)) for i in one[it]]
    assert sorted(seen + rest) == sorted(i for rank in two for batch in rank for i in batch)
    assert not set(seen) & set(rest)


def test_epochs_draw_other_orders():
    assert batches(40, 4, 1, 1, epoch=0) != batches(40, 4, 1, 1, epoch=1)


def test_the_effective_batch_check_names_what_keeps_it():
    from types import SimpleNamespace

    from util.checkpoint import check_effective_batch
    from util.errors import CheckpointError

    ckpt = {"args": {"batch_size": 64, "accum_iter": 1, "world_size": 8}}  # 512
    check_effective_batch(ckpt, SimpleNamespace(batch_size=32, accum_iter=4, world_size=4), "c")
    with pytest.raises(CheckpointError, match=r"with 4 process\(es\) to keep it: --batch_size 64 --accum_iter 2, "
                                              r"--batch_size 128 --accum_iter 1, --batch_size 32 --accum_iter 4$"):
        check_effective_batch(ckpt, SimpleNamespace(batch_size=64, accum_iter=1, world_size=4), "c")
    with pytest.raises(CheckpointError, match=r"with 3 process\(es\) to keep it: no --batch_size x --accum_iter does"):
        check_effective_batch(ckpt, SimpleNamespace(batch_size=64, accum_iter=1, world_size=3), "c")
    # an official checkpoint records no world_size: it continues unchecked, as every resume did before
    check_effective_batch({"args": {"batch_size": 64, "accum_iter": 1}},
                          SimpleNamespace(batch_size=8, accum_iter=1, world_size=1), "c")


def test_accum_iter_takes_auto_or_a_positive_number():
    from helpers import parse_flags
    for bad, why in (("x", "must be a whole number >= 1 or 'auto', got 'x'"), ("0", "must be >= 1, got 0")):
        res = parse_flags("main_pretrain.py", "--accum_iter", bad, "--data_path", "d")
        assert res.returncode == 2 and f"argument --accum_iter: {why}" in res.stderr
    assert parse_flags("main_pretrain.py", "--accum_iter", "auto", "--data_path", "d").returncode == 0
