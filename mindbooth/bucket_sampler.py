"""The batch sampler of aspect-ratio buckets (mindbooth/buckets.py): every batch holds items of one bucket."""
import math

import numpy as np

from mindbooth.data import BatchSampler


class BucketBatchSampler(BatchSampler):
    """Batches of one bucket: each epoch (its own generator from seed and epoch number, so the order is the same on
    every rank and after a resume) shuffles the items, groups them by bucket, pads each group cyclically with its own
    items to whole global batches, and shuffles the batches. Rank r takes every num_shards-th index of a global batch
    (BatchSampler's sample_generators then key the samples by their place in it). The state is (epoch, position)."""

    def __init__(self, item_buckets, batch_size: int, seed: int, shard: int = 0, num_shards: int = 1):
        super().__init__(len(item_buckets), batch_size, seed, shard, num_shards)
        self.item_buckets = list(item_buckets)
        self.seed, self.epoch = seed, -1
        self.batches, self.position = [], 0

    def epoch_batches(self, epoch: int) -> list:
        rng = np.random.default_rng([self.seed, 3, epoch])
        global_batch = self.batch_size * self.num_shards
        groups = {}
        for index in rng.permutation(len(self.item_buckets)).tolist():
            groups.setdefault(self.item_buckets[index], []).append(index)
        batches = []
        for members in groups.values():
            padded = [members[k % len(members)] for k in range(math.ceil(len(members) / global_batch) * global_batch)]
            batches += [padded[k:k + global_batch] for k in range(0, len(padded), global_batch)]
        return [batches[k] for k in rng.permutation(len(batches)).tolist()]

    def next_indices(self) -> list:
        if self.position >= len(self.batches):
            self.epoch += 1
            self.batches, self.position = self.epoch_batches(self.epoch), 0
        batch = self.batches[self.position]
        self.position += 1
        return batch[self.shard::self.num_shards]

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict):
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.batches = self.epoch_batches(self.epoch) if self.epoch >= 0 else []
