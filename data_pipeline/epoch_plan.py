"""Which samples each data stream trains on in an epoch, and how many batches that makes.

An epoch is every sample of every shard once (a shard listed r times, for repeats, r times),
in an order drawn from (seed, epoch): the shards are permuted (or, resampled, drawn with
replacement) and read one after another. Within each aspect-ratio bucket k (one bucket when
there are none) that order numbers the bucket's n_k samples 0 .. n_k-1, rotated by a random
offset per epoch. Stream v of V gets one contiguous range of those numbers per bucket; the
ranges differ in size by at most one sample. So a stream reads only the shards its ranges
touch (about 1/V of the data, plus the shards at its edges), samples are split across streams
whatever the number of shards (40 images in one shard feed 32 streams), and every sample is
in exactly one stream's share per epoch.

A stream cuts its share into batches of one bucket each: sum_k ceil(n_vk / b) batches. The
last batch of a bucket is filled up to b with copies weighted 0 (fixed shapes: nothing
recompiles), and a stream with fewer batches than the epoch's most (P) adds whole batches
weighted 0. The extra samples of a bucket (n_k mod V) are handed out in turn across all
buckets, so that stream batch counts differ by at most one and few such batches exist. Every
stream then yields exactly P batches per epoch, known before anything is read: ranks take the
same number of steps, a resume jumps over whole epochs unread, and it can use any world size
that divides V.

Everything here is arithmetic on per-shard (per-bucket) sample counts, the same in every
process that computes it.
"""
from __future__ import annotations

import functools

import numpy as np


class EpochPlan:
    """The epoch-by-epoch split of samples into `streams` streams of batches of `batch_size`.

    `counts[s][k]`: samples of shard s in bucket k. `repeats[s]`: times shard s is in an epoch.
    """

    def __init__(self, counts: list[list[int]], streams: int, batch_size: int, seed: int, *,
                 shuffle: bool = True, resampled: bool = False, repeats: list[int] | None = None):
        self.counts = np.asarray(counts, dtype=np.int64).reshape(len(counts), -1)
        self.V, self.b, self.seed, self.shuffle, self.resampled = streams, batch_size, seed, shuffle, resampled
        self.repeats = list(repeats) if repeats is not None else [1] * len(counts)
        # The epoch's shard list before it is ordered: shard s appears repeats[s] times.
        self.listing = np.repeat(np.arange(len(counts)), self.repeats)

    @property
    def buckets(self) -> int:
        return self.counts.shape[1]

    def order(self, epoch: int) -> np.ndarray:
        """Shard indices in the order epoch `epoch` reads them."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.resampled:  # with replacement: for sets too large to ever finish an epoch
            return self.listing[rng.integers(0, len(self.listing), size=len(self.listing))]
        return self.listing[rng.permutation(len(self.listing))] if self.shuffle else self.listing

    @functools.lru_cache(maxsize=4)
    def _epoch(self, epoch: int):
        """(order, starts[i][k]: bucket-k samples before order position i, n[k], offset[k], sizes[v][k])."""
        order = self.order(epoch)
        per = self.counts[order]
        starts = np.zeros((len(order) + 1, self.buckets), dtype=np.int64)
        np.cumsum(per, axis=0, out=starts[1:])
        n = starts[-1]
        rng = np.random.default_rng([self.seed, epoch, 2])
        offset = (rng.integers(0, np.maximum(n, 1)) if self.shuffle else np.zeros_like(n)).astype(np.int64)
        sizes = np.tile(n // self.V, (self.V, 1))
        # n_k mod V streams get one sample more of bucket k. Where that makes a batch more (n_k // V
        # is a multiple of b) the turns run on across buckets, so batch counts differ by at most one.
        turn = {True: int(rng.integers(self.V)) if self.shuffle else 0, False: 0}
        for k in range(self.buckets):
            extra = int(n[k] % self.V)
            costly = (n[k] // self.V) % self.b == 0
            for j in range(extra):
                sizes[(turn[costly] + j) % self.V, k] += 1
            turn[costly] += extra
        return order, starts, n, offset, sizes

    # -- what every process needs ----------------------------------------------------------------
    def samples(self, epoch: int) -> int:
        """Samples in the epoch (all streams)."""
        return int(self._epoch(epoch)[2].sum())

    def stream_sizes(self, epoch: int, stream: int) -> list[int]:
        """Samples per bucket in stream `stream`'s share of the epoch."""
        return self._epoch(epoch)[4][stream].tolist()

    @functools.lru_cache(maxsize=16)
    def batches_per_stream(self, epoch: int) -> int:
        """P: batches every stream yields in the epoch."""
        sizes = self._epoch(epoch)[4]
        return int(((sizes + self.b - 1) // self.b).sum(axis=1).max())

    def fewest_samples_per_stream(self, epoch: int) -> int:
        return int(self._epoch(epoch)[4].sum(axis=1).min())

    # -- what one stream reads ---------------------------------------------------------------------
    def ranges(self, epoch: int, stream: int) -> list[list[tuple[int, int]]]:
        """Per bucket, the [lo, hi) intervals of (unrotated) bucket positions the stream takes."""
        _, _, n, offset, sizes = self._epoch(epoch)
        lo = sizes[:stream].sum(axis=0)
        out = []
        for k in range(self.buckets):
            a, size, total = int(lo[k] + offset[k]), int(sizes[stream, k]), int(n[k])
            if size == 0:
                out.append([])
                continue
            a %= total
            out.append([(a, a + size)] if a + size <= total else [(a, total), (0, a + size - total)])
        return out

    def visits(self, epoch: int, stream: int) -> list[tuple[int, list[int], bool]]:
        """The stream's reads in the epoch, in order: (shard index, the bucket positions of the shard's
        first sample of each bucket, whether the stream owns the shard's problems if it yields no sample)
        for every order position whose samples its ranges touch. A shard without samples (by its count)
        is read by one stream too, the one owning the position after it, so its damage is reported."""
        order, starts, n, offset, sizes = self._epoch(epoch)
        touched = set()
        for k, intervals in enumerate(self.ranges(epoch, stream)):
            col = starts[:, k]
            for a, z in intervals:  # order positions i whose span [col[i], col[i+1]) meets [a, z)
                first = int(np.searchsorted(col, a, side="right")) - 1
                last = int(np.searchsorted(col, z, side="left")) - 1
                touched.update(i for i in range(max(first, 0), last + 1) if col[i + 1] > col[i])
        # Who reports a shard's problems when it yields no sample: the owner of the position after it.
        k = int(np.argmax(n > 0)) if n.any() else 0
        ends = np.cumsum(sizes[:, k])

        def owner(i: int) -> int:
            return int(np.searchsorted(ends, (int(starts[i, k]) - int(offset[k])) % max(int(n[k]), 1), side="right"))

        for i in np.flatnonzero(self.counts[order].sum(axis=1) == 0).tolist():
            if owner(i) == stream:
                touched.add(i)
        touched = {i: owner(i) == stream for i in touched}
        return [(int(order[i]), starts[i].tolist(), touched[i]) for i in sorted(touched)]


def keeps(intervals: list[tuple[int, int]], position: int) -> bool:
    return any(a <= position < z for a, z in intervals)


def padding_share(plan: EpochPlan, epoch: int = 0) -> float:
    """Share of the epoch's batch slots that are weighted-0 fill, not samples."""
    slots = plan.batches_per_stream(epoch) * plan.V * plan.b
    return 1.0 - plan.samples(epoch) / slots if slots else 0.0


