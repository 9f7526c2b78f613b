"""The training sample stream, independent of how the effective batch is split over processes and
accumulation steps: what lets a run continue on another number of processes with the same samples."""
import numpy as np


class EffectiveBatchSampler:
    """Batches of dataset indices for one process. Each epoch is one permutation of the dataset drawn from the
    epoch number (the draw of Paddle's DistributedBatchSampler, without its padding to a multiple of the
    process count), cut into effective batches of batch_size * accum_iter * world_size samples, the last
    incomplete one left out (drop_last, as the official). Each effective batch is accum_iter micro-batches of
    batch_size * world_size consecutive samples, of which process `rank` takes the rank-th batch_size. So
    the samples of every optimizer step are the same whatever the split, and a run that stopped after S
    samples of an epoch continues with the next ones."""

    def __init__(self, count, batch_size, accum_iter=1, world_size=1, rank=0):
        self.count, self.batch_size, self.accum_iter = count, batch_size, accum_iter
        self.world_size, self.rank, self.epoch = world_size, rank, 0

    @property
    def effective_batch(self):
        return self.batch_size * self.accum_iter * self.world_size

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        """Iterations per epoch: whole optimizer steps only."""
        return self.count // self.effective_batch * self.accum_iter

    def __iter__(self):
        order = np.random.RandomState(self.epoch).permutation(self.count)
        micro = self.batch_size * self.world_size
        for i in range(len(self)):
            start = i * micro + self.rank * self.batch_size
            yield order[start:start + self.batch_size].tolist()
