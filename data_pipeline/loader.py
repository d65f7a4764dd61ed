"""A resumable, deterministic batch stream over WebDataset shards for data-parallel training.

Order is a pure function of (seed, epoch, rank, worker): each epoch the shard list is
permuted by (seed, epoch) and dealt out to the world's reader slots (rank x worker); each
slot streams its shards through a seeded shuffle buffer and cuts batches. The DataLoader
takes batches from its workers round-robin, so batch b of a rank comes from worker
b % workers. The loader's whole state is therefore one number, the batches this rank has
consumed: restoring it replays the same stream from that point (skipped batches are read
but not decoded).

When per-shard sample counts are known (latent caches have them in their manifest), every
rank gets the same number of batches per epoch: each slot yields as many batches as the
poorest slot can fill, and the few samples beyond that are left out of that epoch (they are
different ones each epoch, since the shard permutation changes).
"""
from __future__ import annotations

import logging
import random
from typing import Callable

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from .shards import iter_samples
from .storage import DataError

log = logging.getLogger(__name__)


class ShardBatches(IterableDataset):
    """Endless stream of collated batches for one rank, starting after `start_batch`."""

    def __init__(self, urls: list[str], decode: Callable[[dict], dict], batch_size: int, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 1,
                 counts: list[int] | None = None, shuffle: bool = True, shuffle_buffer: int = 1000,
                 start_batch: int = 0, endpoint_url: str | None = None):
        if not urls:
            raise DataError("the shard list is empty")
        slots = world_size * max(1, num_workers)
        if len(urls) < slots:
            raise DataError(f"{len(urls)} shards cannot feed {world_size} ranks x {max(1, num_workers)} "
                            f"workers: write at least {slots} shards (smaller ones), or use fewer workers")
        if counts is None and world_size > 1:
            raise DataError("per-shard sample counts are needed to give every rank the same number of "
                            "batches; read a latent cache (its manifest has them)")
        if counts is not None and len(counts) != len(urls):
            raise ValueError("counts must have one entry per shard")
        self.urls, self.decode, self.batch_size = list(urls), decode, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers = max(1, num_workers)  # reader slots per rank
        self.loader_workers = num_workers  # 0: read in the training process itself
        self.counts, self.shuffle, self.shuffle_buffer = counts, shuffle, shuffle_buffer
        self.start_batch, self.endpoint_url = start_batch, endpoint_url

    # -- the deterministic plan ------------------------------------------------------
    def _slot_shards(self, epoch: int) -> list[list[int]]:
        order = np.arange(len(self.urls))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
        slots = self.world_size * self.num_workers
        return [order[s::slots].tolist() for s in range(slots)]

    def batches_per_worker(self, epoch: int) -> int | None:
        """Batches every worker of every rank yields in `epoch`, or None when counts are unknown."""
        if self.counts is None:
            return None
        per_slot = [sum(self.counts[i] for i in shards) // self.batch_size for shards in self._slot_shards(epoch)]
        return min(per_slot)

    def batches_per_epoch(self, epoch: int = 0) -> int | None:
        n = self.batches_per_worker(epoch)
        return None if n is None else n * self.num_workers

    def samples_per_epoch(self, epoch: int = 0) -> int | None:
        """Samples the whole job (all ranks) trains on in `epoch`."""
        n = self.batches_per_epoch(epoch)
        return None if n is None else n * self.batch_size * self.world_size

    # -- streaming -----------------------------------------------------------------------
    def _raw_samples(self, epoch: int, worker: int):
        shards = self._slot_shards(epoch)[self.rank * self.num_workers + worker]
        stream = (s for i in shards for s in iter_samples(self.urls[i], self.endpoint_url))
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from stream
            return
        rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}")
        buf = []
        for s in stream:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            j = rng.randrange(len(buf))
            buf[j], s = s, buf[j]
            yield s
        rng.shuffle(buf)
        yield from buf

    def _worker_batches(self, worker: int, skip: int):
        """This worker's endless list of raw batches; the first `skip` are passed over."""
        epoch = 0
        while True:
            limit = self.batches_per_worker(epoch)
            if limit == 0:
                raise DataError(f"in epoch {epoch} a reader slot of {self.world_size} ranks x {self.num_workers} workers "
                                f"gets fewer than batch_size={self.batch_size} samples; use fewer ranks or workers, "
                                "more shards, or a smaller batch")
            if limit is not None and skip >= limit:  # whole epoch already consumed: jump over it
                skip -= limit
                epoch += 1
                continue
            made, batch = 0, []
            for s in self._raw_samples(epoch, worker):
                batch.append(s)
                if len(batch) == self.batch_size:
                    if skip > 0:
                        skip -= 1
                    else:
                        yield epoch, batch
                    made, batch = made + 1, []
                    if limit is not None and made == limit:
                        break
            if limit is not None and made < limit:
                raise DataError(f"reader slot {self.rank}/{worker} read fewer samples than the shard counts promise "
                                f"in epoch {epoch}: shards {[self.urls[i] for i in self._slot_shards(epoch)[self.rank * self.num_workers + worker]]}")
            if made == 0:
                raise DataError(f"reader slot {self.rank}/{worker} found fewer than batch_size="
                                f"{self.batch_size} samples in its shards")
            epoch += 1

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        workers = info.num_workers if info is not None else 1
        if workers != self.num_workers:
            raise ValueError(f"built for {self.num_workers} workers, running in {workers}")
        # Batch b of this rank's stream belongs to reader slot b % workers. The DataLoader
        # always asks worker 0 first, so after a restart at start_batch, worker w plays
        # slot (w + start_batch) % workers and skips that slot's batches below start_batch.
        slot = (worker + self.start_batch) % workers
        skip = (self.start_batch - slot + workers - 1) // workers if self.start_batch > slot else 0
        for epoch, raw in self._worker_batches(slot, skip):
            batch = default_collate([self.decode(s) for s in raw])
            batch["epoch"] = epoch
            yield batch


def make_loader(dataset: ShardBatches, prefetch_factor: int = 4) -> DataLoader:
    """DataLoader over a ShardBatches: the dataset batches; workers are read in order."""
    n = dataset.loader_workers
    return DataLoader(dataset, batch_size=None, num_workers=n, in_order=True,
                      prefetch_factor=prefetch_factor if n > 0 else None)
