"""A resumable, deterministic, elastic batch stream over WebDataset shards.

The data is cut into V *virtual streams* (V = `virtual_ranks`, fixed for the life of a
run). Each epoch the shard list is permuted by (seed, epoch) and stream v reads shards
v, v+V, ... of the permutation through a shuffle buffer seeded by (seed, epoch, v). A
stream's batches are therefore a pure function of (seed, V, v), whatever the world size.

A job with W ranks gives rank r the streams r, r+W, r+2W, ... (V/W of them) and takes
one batch from each in turn (a stream that is behind first); DataLoader worker w serves every num_workers-th of them,
matching the DataLoader's own round-robin. The loader's whole state is the number of
batches consumed from each stream. Restoring it replays each stream from its position
(the skipped batches are read but not decoded), so a restart continues exactly; and
because positions are kept per stream, not per rank, a restart with another world size
(any W that divides V) continues the same epoch with no sample seen twice or skipped.

When per-shard counts are known (latent caches record them), every stream yields the
same number of batches per epoch: as many as the poorest stream can fill. The samples
beyond that are left out of that epoch; they differ from epoch to epoch because the
shard permutation does. Without counts (one rank only) each stream's last batch of an
epoch is smaller instead, and nothing is left out. With aspect-ratio buckets every batch
holds one bucket's shape; a stream then yields (bucket count - 1) batches fewer per epoch
than its counts could fill, so that it can always fill what it promised. Samples that fail to decode are quarantined: their batch comes
out smaller instead of being refilled, so batch boundaries stay a function of the raw
data and resuming stays exact. A batch whose samples all fail (one bad image at batch
size 1) cannot come out empty, since every rank must take the same number of steps: it
becomes the next sample of the same stream that decodes, looked up in the stream's
following batches (which still come out as usual). That choice depends on the stream's
data alone, so a resumed run makes it the same way.
"""
from __future__ import annotations

import functools
import os
import signal
import threading

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from .quarantine import Quarantine
from .shards import DEFAULT_MAX_MEMBER_MB, iter_samples
from .storage import DataError


class _Plan:
    """The epoch-by-epoch assignment of shards to virtual streams."""

    def __init__(self, n_shards: int, virtual_ranks: int, batch_size: int, seed: int,
                 counts: list[int] | None, shuffle: bool, resampled: bool, slack: int = 0):
        self.n, self.V, self.b, self.seed = n_shards, virtual_ranks, batch_size, seed
        self.counts, self.shuffle, self.resampled, self.slack = counts, shuffle, resampled, slack

    def shards(self, epoch: int, stream: int) -> list[int]:
        rng = np.random.default_rng([self.seed, epoch])
        if self.resampled:  # with replacement: for sets too large to ever finish an epoch
            order = rng.integers(0, self.n, size=self.n)
        else:
            order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        return order[stream::self.V].tolist()

    @functools.lru_cache(maxsize=64)
    def batches_per_stream(self, epoch: int) -> int | None:
        if self.counts is None:
            return None
        fill = min(sum(self.counts[i] for i in self.shards(epoch, v)) // self.b for v in range(self.V))
        return max(0, fill - self.slack)


# How many samples after an all-failed batch are tried for a stand-in before giving up:
# that many failures in a row exceed any sensible max_error_rate anyway.
MAX_STAND_IN_SAMPLES = 1000


class _Ahead:
    """An iterator that can look at its coming items without consuming them."""

    def __init__(self, it):
        self.it, self.buffer = it, []

    def __next__(self):
        return self.buffer.pop(0) if self.buffer else next(self.it)

    def peek(self, i: int):
        while len(self.buffer) <= i:
            self.buffer.append(next(self.it))
        return self.buffer[i]


class ShardBatches(IterableDataset):
    """Collated batches for one rank, continuing from `positions` (batches consumed per stream)."""

    def __init__(self, urls: list[str], decode, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 1, virtual_ranks: int = 0,
                 counts: list[int] | None = None, shuffle: bool = True, shuffle_buffer: int = 1000,
                 resampled: bool = False, bucketer=None,
                 quarantine: Quarantine | None = None, endpoint_url: str | None = None,
                 checksums: list[str] | None = None, read_shard=None,
                 max_member_bytes: int = int(DEFAULT_MAX_MEMBER_MB * 2**20)):
        V = virtual_ranks or world_size * max(1, num_workers)
        per_rank = V // world_size
        if V % world_size or per_rank % max(1, num_workers):
            raise DataError(f"virtual_ranks={V} must be a multiple of world size {world_size} x "
                            f"num_workers {max(1, num_workers)}")
        if not urls:
            raise DataError("the shard list is empty")
        if len(urls) < V:
            raise DataError(f"{len(urls)} shards cannot feed {V} virtual ranks ({world_size} ranks x "
                            f"{max(1, num_workers)} workers or more): write at least {V} (smaller) shards")
        if counts is None and world_size > 1:
            raise DataError("per-shard sample counts are needed to give every rank the same number of "
                            "batches; read a latent cache (its manifest has them)")
        if counts is not None and len(counts) != len(urls):
            raise ValueError("counts must have one entry per shard")
        self.urls, self.decode, self.batch_size = list(urls), decode, batch_size
        self.rank, self.world_size, self.virtual_ranks = rank, world_size, V
        self.num_workers, self.loader_workers = max(1, num_workers), num_workers
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        # With aspect-ratio buckets a stream can hold up to one unfinished batch per bucket,
        # so it is promised that many batches fewer than its counts would fill.
        self.bucketer = bucketer
        slack = len(bucketer.buckets) - 1 if bucketer is not None else 0
        self.plan = _Plan(len(urls), V, batch_size, seed, counts, shuffle, resampled, slack)
        self.positions = [0] * V  # batches consumed per stream; Loader.load_state_dict restores them
        self.quarantine, self.endpoint_url = quarantine, endpoint_url
        self.checksums = checksums  # sha256 per shard, verified while reading (latent caches)
        self.max_member_bytes = max_member_bytes  # larger tar members are skipped unread, their sample quarantined
        # Reads one shard, called as iter_samples is (`sha256=` gets checksums[i]); latent caches
        # pass latents.read_cached_shard, whose per-shard check is the order of the keys.
        self.read_shard = read_shard or iter_samples

    # -- which streams a rank serves, in the order its batches come from them ------------
    def streams_of(self, rank: int) -> list[int]:
        """Rank `rank`'s streams in round-robin order. A stream that is behind comes first, so
        that after n batches the turn continues where it was (stream n % per_rank)."""
        streams = range(rank, self.virtual_ranks, self.world_size)
        return sorted(streams, key=lambda v: (self.positions[v], v))

    def positions_after(self, consumed: int) -> list[int]:
        """Stream positions of the whole job after every rank consumed `consumed` more batches."""
        per_rank = self.virtual_ranks // self.world_size
        out = list(self.positions)
        for r in range(self.world_size):
            for j, v in enumerate(self.streams_of(r)):
                out[v] += (consumed - j + per_rank - 1) // per_rank if consumed > j else 0
        return out

    def batches_per_epoch(self, epoch: int = 0) -> int | None:
        """Batches each rank yields in `epoch`, or None when counts are unknown."""
        n = self.plan.batches_per_stream(epoch)
        return None if n is None else n * self.virtual_ranks // self.world_size

    def samples_per_epoch(self, epoch: int = 0) -> int | None:
        """Samples the whole job (all ranks) trains on in `epoch`."""
        n = self.plan.batches_per_stream(epoch)
        return None if n is None else n * self.virtual_ranks * self.batch_size

    # -- one stream -----------------------------------------------------------------------
    def _raw_samples(self, epoch: int, stream: int):
        shards = self.plan.shards(epoch, stream)
        sums = self.checksums or [None] * len(self.urls)
        samples = (s for i in shards
                   for s in self.read_shard(self.urls[i], self.endpoint_url, on_error=self.quarantine, sha256=sums[i],
                                            max_member_bytes=self.max_member_bytes))
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from samples
            return
        rng = np.random.default_rng([self.seed, epoch, stream, 1])
        buf = []
        for s in samples:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], s = s, buf[j]
            yield s
        for j in rng.permutation(len(buf)):
            yield buf[j]

    def _stream_batches(self, stream: int, skip: int):
        """Stream `stream`'s endless batches of raw samples, tagged with their epoch, from `skip` on."""
        epoch = 0
        while True:
            limit = self.plan.batches_per_stream(epoch)
            if limit == 0:
                raise DataError(f"in epoch {epoch} a stream of virtual_ranks={self.virtual_ranks} gets fewer than "
                                f"batch_size={self.batch_size} samples; use fewer ranks or workers, more shards, "
                                "or a smaller batch")
            if limit is not None and skip >= limit:  # whole epoch consumed: jump over it unread
                skip, epoch = skip - limit, epoch + 1
                continue
            made, pending = 0, {}  # bucket -> samples waiting for a full batch
            for s in self._raw_samples(epoch, stream):
                k = self.bucketer(s) if self.bucketer is not None else 0
                batch = pending.setdefault(k, [])
                batch.append(s)
                if len(batch) < self.batch_size:
                    continue
                del pending[k]
                if skip > 0:
                    skip -= 1
                else:
                    yield epoch, self._tag(k, batch)
                made += 1
                if made == limit:
                    break
            if limit is None:  # one rank: the epoch's last, smaller batches are not dropped
                for k in sorted(pending):
                    if skip > 0:
                        skip -= 1
                    else:
                        yield epoch, self._tag(k, pending[k])
                    made += 1
            if limit is not None and made < limit:
                raise DataError(f"stream {stream} read fewer samples in epoch {epoch} than the shard counts "
                                f"promise: {[self.urls[i] for i in self.plan.shards(epoch, stream)]}")
            if made == 0:
                raise DataError(f"stream {stream} found fewer than batch_size={self.batch_size} samples in its shards")
            epoch += 1

    def _tag(self, bucket: int, batch: list[dict]) -> list[dict]:
        """Tell the decoder the batch's shape (`__size__`, (w, h)) when buckets are on."""
        if self.bucketer is not None:
            size = self.bucketer.buckets[bucket]
            batch = [{**s, "__size__": size} for s in batch]
        return batch

    def _stand_in(self, ahead: _Ahead, stream: int, raw: list[dict]) -> list:
        """The next sample of `stream` after the all-failed batch `raw` that decodes, found in
        the stream's coming batches (left in place: they still come out in turn). Failures met
        here are not reported: they are when their own batch comes."""
        tried, i = 0, 0
        while tried < MAX_STAND_IN_SAMPLES:
            for s in ahead.peek(i)[1]:
                tried += 1
                try:
                    return [self.decode(s)]
                except DataError:
                    continue
            i += 1
        raise DataError(f"every sample of a batch (first: {raw[0].get('__url__')}:{raw[0].get('__key__')}) and the "
                        f"next {tried} samples of its stream {stream} failed to decode")

    def _collate(self, epoch: int, raw: list[dict], ahead: _Ahead | None = None, stream: int = 0) -> dict:
        decoded = []
        for s in raw:
            try:
                decoded.append(self.decode(s))
                if self.quarantine is not None:
                    self.quarantine.ok()
            except DataError as e:
                if self.quarantine is None:
                    raise
                self.quarantine(s.get("__url__"), s.get("__key__"), str(e))
        stand_in = not decoded and ahead is not None
        if stand_in:  # every rank must still take this step
            decoded = self._stand_in(ahead, stream, raw)
        if not decoded:
            raise DataError(f"every sample of a batch failed to decode (first: {raw[0].get('__url__')}:"
                            f"{raw[0].get('__key__')})")
        batch = default_collate(decoded)
        if stand_in:  # its own turn comes later: here it only fills the step, and weighs nothing in the loss
            batch["loss_weight"] = torch.zeros(len(decoded))
        batch["epoch"] = epoch
        # Bytes read for this batch, so the trainer can log read throughput (MB/s).
        batch["bytes"] = sum(len(v) for s in raw for k, v in s.items() if not k.startswith("__"))
        return batch

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        workers = info.num_workers if info is not None else 1
        if workers != self.num_workers:
            raise ValueError(f"built for {self.num_workers} workers, running in {workers}")
        # This worker's streams, each from its own position, taken in turn: together with
        # the DataLoader's worker round-robin this gives the rank's stream round-robin.
        mine = self.streams_of(self.rank)[worker::workers]
        gens = [_Ahead(self._stream_batches(v, self.positions[v])) for v in mine]
        while True:
            for v, g in zip(mine, gens):
                epoch, raw = next(g)
                yield self._collate(epoch, raw, g, v)


def _sigterm_from_parent_only(worker_id: int) -> None:
    """A worker ends on SIGTERM from its parent (the loader shutting down; torch's own handler
    does the same) and leaves any other SIGTERM to the parent. SLURM sends SIGTERM to every
    process of a job at once, and the training process may then stop at the next step with a
    checkpoint, which it cannot once its workers died (torch raises "DataLoader worker is
    killed by signal"). A worker still ends with its loader, with its parent, or on SIGKILL."""
    if not hasattr(signal, "sigwaitinfo"):  # not on macOS: keep torch's behaviour
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask

    def wait() -> None:  # sigwaitinfo, unlike a handler, tells who sent it
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=wait, name="sigterm", daemon=True).start()


class Loader:
    """The DataLoader of a rank, with `state_dict()` / `load_state_dict()` for checkpoints.

    The state is `{"virtual_ranks": V, "positions": [...]}`: batches consumed per stream by
    the whole job. Every rank can compute it (ranks consume in lockstep), so any rank's
    copy, saved with a checkpoint, restores all of them, also under another world size.
    """

    def __init__(self, dataset: ShardBatches, prefetch_factor: int = 4):
        self.dataset, self.prefetch_factor = dataset, prefetch_factor
        self.consumed, self._iter = 0, None

    def state_dict(self) -> dict:
        return {"virtual_ranks": self.dataset.virtual_ranks, "positions": self.dataset.positions_after(self.consumed)}

    def load_state_dict(self, state: dict) -> None:
        if self._iter is not None:
            raise RuntimeError("load_state_dict must come before iterating")
        if state["virtual_ranks"] != self.dataset.virtual_ranks:
            raise DataError(f"the checkpoint's loader has virtual_ranks={state['virtual_ranks']}, this run "
                            f"{self.dataset.virtual_ranks}; set data.virtual_ranks={state['virtual_ranks']}")
        if len(state["positions"]) != self.dataset.virtual_ranks:
            raise DataError(f"loader state has {len(state['positions'])} stream positions, this run has "
                            f"virtual_ranks={self.dataset.virtual_ranks}")
        self.dataset.positions, self.consumed = list(state["positions"]), 0

    def __iter__(self):
        n = self.dataset.loader_workers
        # Pinned host memory where a GPU trains: the step's non_blocking copies then overlap its kernels.
        self._iter = iter(DataLoader(self.dataset, batch_size=None, num_workers=n, in_order=True,
                                     pin_memory=torch.cuda.is_available(),
                                     prefetch_factor=self.prefetch_factor if n > 0 else None,
                                     worker_init_fn=_sigterm_from_parent_only if n > 0 else None))
        return self

    def __next__(self) -> dict:
        batch = next(self._iter)
        self.consumed += 1
        return batch


def make_loader(dataset: ShardBatches, prefetch_factor: int = 4) -> Loader:
    return Loader(dataset, prefetch_factor)
