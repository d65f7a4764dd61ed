"""A resumable, deterministic, elastic batch stream over WebDataset shards.

The data is cut into V *virtual streams* (V = `virtual_ranks`, fixed for the life of a
run). Which samples stream v trains on in an epoch, and how many batches that makes, is
data_pipeline/epoch_plan.py's arithmetic on per-shard sample counts: samples, not shards,
are split, so a set smaller than one shard still feeds every rank and worker, and every
sample is in exactly one stream's share of every epoch. A stream reads the shards its share
touches, keeps its samples, mixes them through a shuffle buffer seeded by (seed, epoch, v)
and cuts them into batches of one aspect-ratio bucket each (one bucket without buckets).
A stream's batches are therefore a pure function of (seed, V, v), whatever the world size.

A job with W ranks gives rank r the streams r, r+W, r+2W, ... (V/W of them) and takes
one batch from each in turn (a stream that is behind first); DataLoader worker w serves every
num_workers-th of them, matching the DataLoader's own round-robin. V defaults to ranks x workers;
for an epoch too small to give each stream SMALL_EPOCH_BATCHES batches it defaults to the world size,
and then every worker reads all of its rank's streams and collates every num_workers-th batch. The loader's whole state
is the number of batches consumed from each stream. Every stream yields the same number of
batches per epoch, known before reading, so restoring the state skips whole epochs unread
and replays the current one (read, not decoded): a restart continues exactly, and because
positions are kept per stream, not per rank, a restart with another world size (any W that
divides V) continues the same epoch with no sample seen twice or skipped.

Batches have a fixed size. A bucket's last batch in a stream is filled with copies weighted 0
(`loss_weight`), and a stream with fewer batches than the others adds whole batches weighted
0, so nothing is dropped and every rank takes the same steps. A sample that fails to decode
is quarantined and its place weighted 0 too. A batch whose samples all fail (one bad image
at batch size 1) is filled with the next sample of the same stream that decodes, looked up
in the stream's following batches (which still come out as usual), weighted 0. That choice
depends on the stream's data alone, so a resumed run makes it the same way.
"""
from __future__ import annotations

import itertools
import os
import signal
import threading

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from .epoch_plan import EpochPlan, keeps
from .quarantine import Quarantine
from .shards import DEFAULT_MAX_MEMBER_MB, count_samples, iter_samples
from .storage import DataError

# Below this many batches per stream and epoch, the default virtual_ranks is the world size, not ranks x
# workers: 40 images in 5 buckets on 2 ranks x 2 workers at batch 4 filled half of every epoch's batches.
SMALL_EPOCH_BATCHES = 32

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
    """Collated batches for one rank, continuing from `positions` (batches consumed per stream).

    `counts`: samples per shard, or per shard and bucket of `bucketer` (read from the shards when
    None). `repeats`: times each shard is in an epoch (1). `weights`: the loss weight of each
    shard's samples (1.0; DreamBooth's class images take prior_loss_weight)."""

    def __init__(self, urls: list[str], decode, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 1, virtual_ranks: int = 0,
                 counts: list | None = None, repeats: list[int] | None = None, weights: list[float] | None = None,
                 shuffle: bool = True, shuffle_buffer: int = 1000, resampled: bool = False, bucketer=None,
                 quarantine: Quarantine | None = None, endpoint_url: str | None = None,
                 checksums: list[str] | None = None, read_shard=None,
                 max_member_bytes: int = int(DEFAULT_MAX_MEMBER_MB * 2**20)):
        workers = max(1, num_workers)
        if not urls:
            raise DataError("the shard list is empty")
        self.read_shard = read_shard or iter_samples
        if counts is None:
            counts = count_samples(urls, endpoint_url, bucketer, self.read_shard, max_member_bytes)
        counts = [list(c) if isinstance(c, (list, tuple)) else [c] for c in counts]
        if len(counts) != len(urls):
            raise ValueError("counts must have one entry per shard")
        buckets = len(bucketer.buckets) if bucketer is not None else 1
        if any(len(c) != buckets for c in counts):
            if bucketer is None or any(len(c) != 1 for c in counts):
                raise ValueError(f"counts must give {buckets} bucket counts per shard")
            counts = count_samples(urls, endpoint_url, bucketer, self.read_shard, max_member_bytes)
        for name, values in (("repeats", repeats), ("weights", weights)):
            if values is not None and len(values) != len(urls):
                raise ValueError(f"{name} must have one entry per shard")
        V = virtual_ranks or world_size * workers
        if not virtual_ranks and workers > 1 and EpochPlan(counts, V, batch_size, seed, repeats=repeats) \
                .batches_per_stream(0) < SMALL_EPOCH_BATCHES:
            V = world_size  # a small epoch: a stream per worker would cut it into slivers of filled batches
        if V % world_size:
            raise DataError(f"virtual_ranks={V} must be a multiple of the world size {world_size}")
        # Workers take whole streams when they divide the rank's; otherwise each reads all of the rank's
        # streams (cheap for the small sets this is for) and collates every num_workers-th batch of them.
        self.shared_streams = (V // world_size) % workers != 0
        self.urls, self.decode, self.batch_size = list(urls), decode, batch_size
        self.rank, self.world_size, self.virtual_ranks = rank, world_size, V
        self.num_workers, self.loader_workers = workers, num_workers
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.bucketer = bucketer
        self.weights = [float(x) for x in weights] if weights is not None else [1.0] * len(urls)
        self.plan = EpochPlan(counts, V, batch_size, seed, shuffle=shuffle, resampled=resampled, repeats=repeats)
        self._check_epoch(0)
        self.positions = [0] * V  # batches consumed per stream; Loader.load_state_dict restores them
        self.quarantine, self.endpoint_url = quarantine, endpoint_url
        self.checksums = checksums  # check value per shard, verified while reading (latent caches)
        self.max_member_bytes = max_member_bytes  # larger tar members are skipped unread, their sample quarantined

    def _check_epoch(self, epoch: int) -> None:
        """Every stream needs a sample per epoch: what cannot hold is refused with the cheapest fix."""
        if self.plan.fewest_samples_per_stream(epoch) > 0:
            return
        n, V, W, nw = self.plan.samples(epoch), self.virtual_ranks, self.world_size, self.num_workers
        if V > W and n >= W:
            fix = f"set data.virtual_ranks to a multiple of {W} up to {n} (or 0: picked from the data)"
        else:
            fix = f"run on at most {n} ranks, or repeat the data (data.repeats)"
        raise DataError(f"epoch {epoch} has {n} samples, fewer than the {V} data streams ({W} ranks, "
                        f"data.virtual_ranks={V}) it must feed, each needing one: {fix}")

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

    def batches_per_epoch(self, epoch: int = 0) -> int:
        """Batches each rank yields in `epoch`."""
        return self.plan.batches_per_stream(epoch) * self.virtual_ranks // self.world_size

    def samples_per_epoch(self, epoch: int = 0) -> int:
        """Samples the whole job (all ranks) trains on in `epoch` (repeats included, fill not)."""
        return self.plan.samples(epoch)

    def slots_per_epoch(self, epoch: int = 0) -> int:
        """Batch places the whole job fills in `epoch`: its samples and the fill weighted 0."""
        return self.plan.batches_per_stream(epoch) * self.virtual_ranks * self.batch_size

    # -- one stream -----------------------------------------------------------------------
    def _share(self, epoch: int, stream: int):
        """(bucket, sample) of the stream's share of the epoch, in shard order. Samples the tar reader
        drops are reported once, by the stream that keeps the good sample before them in the shard (or,
        at its start, after them), though every stream whose share touches the shard reads them."""
        ranges = self.plan.ranges(epoch, stream)
        sums = self.checksums or [None] * len(self.urls)
        for shard, first, owns_empty in self.plan.visits(epoch, stream):
            seen, pending, previous_kept = [0] * len(first), [], None

            def held(url, key, message):
                pending.append((url, key, message))

            for s in self.read_shard(self.urls[shard], self.endpoint_url, on_error=held, sha256=sums[shard],
                                     max_member_bytes=self.max_member_bytes):
                k = self.bucketer(s) if self.bucketer is not None else 0
                kept = keeps(ranges[k], first[k] + seen[k])
                seen[k] += 1
                if pending:
                    self._report(pending, kept if previous_kept is None else previous_kept)
                previous_kept = kept
                if kept:
                    yield k, {**s, "__weight__": self.weights[shard]}
            if pending:
                self._report(pending, owns_empty if previous_kept is None else previous_kept)

    def _report(self, pending: list, mine: bool) -> None:
        if mine:
            for url, key, message in pending:
                if self.quarantine is None:
                    raise DataError(f"shard {url}: sample {key}: {message}" if key else f"shard {url}: {message}")
                self.quarantine(url, key, message)
        pending.clear()

    def _shuffled(self, epoch: int, stream: int):
        samples = self._share(epoch, stream)
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

    def _epoch_batches(self, epoch: int, stream: int):
        """The stream's batches of the epoch as (bucket, raw samples): exactly plan.batches_per_stream."""
        b, sizes = self.batch_size, self.plan.stream_sizes(epoch, stream)
        taken, made, pending, last = [0] * len(sizes), [0] * len(sizes), {}, None
        for k, s in self._shuffled(epoch, stream):
            if taken[k] == sizes[k]:  # more of a bucket than the counts said: the data changed; not this epoch
                continue
            taken[k] += 1
            last = pending.setdefault(k, [])
            last.append(s)
            if len(last) == b:
                yield k, pending.pop(k)
                made[k] += 1
        if last is None:
            raise DataError(f"stream {stream} read none of its {sum(sizes)} samples in epoch {epoch} from "
                            f"{[self.urls[v[0]] for v in self.plan.visits(epoch, stream)]}")
        filler = last[0]
        for k in range(len(sizes)):  # each bucket's last batch, filled; fewer samples than counted: filled too
            while made[k] * b < sizes[k]:
                real = pending.pop(k, [])
                yield k, real + [{**(real[0] if real else filler), "__weight__": 0.0}] * (b - len(real))
                made[k] += 1
        for _ in range(self.plan.batches_per_stream(epoch) - sum(made)):  # a stream with fewer batches than others
            yield 0 if self.bucketer is None else self.bucketer(filler), [{**filler, "__weight__": 0.0}] * b

    def _stream_batches(self, stream: int, skip: int):
        """Stream `stream`'s endless batches of raw samples, tagged with their epoch, from `skip` on."""
        epoch = 0
        while True:
            per_epoch = self.plan.batches_per_stream(epoch)
            if skip >= per_epoch:  # whole epoch consumed: jump over it unread
                skip, epoch = skip - per_epoch, epoch + 1
                continue
            self._check_epoch(epoch)
            for k, batch in self._epoch_batches(epoch, stream):
                if skip > 0:
                    skip -= 1
                else:
                    yield epoch, self._tag(epoch, k, batch)
            epoch += 1

    def _tag(self, epoch: int, bucket: int, batch: list[dict]) -> list[dict]:
        """Tell the decoder the epoch (`__epoch__`: per-epoch choices, such as a caption) and the batch's
        shape (`__size__`, (w, h)) when buckets are on."""
        size = {"__size__": self.bucketer.buckets[bucket]} if self.bucketer is not None else {}
        return [{**s, "__epoch__": epoch, **size} for s in batch]

    def _stand_in(self, ahead: _Ahead, stream: int, raw: list[dict]) -> list:
        """The next sample of `stream` after the all-failed batch `raw` that decodes, found in
        the stream's coming batches (left in place: they still come out in turn). Failures met
        here are not reported: they are when their own batch comes."""
        tried, i = 0, 0
        while tried < MAX_STAND_IN_SAMPLES:
            for s in ahead.peek(i)[1]:
                tried += 1
                try:
                    return self.decode(s)
                except DataError:
                    continue
            i += 1
        raise DataError(f"every sample of a batch (first: {raw[0].get('__url__')}:{raw[0].get('__key__')}) and the "
                        f"next {tried} samples of its stream {stream} failed to decode")

    def _collate(self, epoch: int, raw: list[dict], ahead: _Ahead | None = None, stream: int = 0) -> dict:
        decoded, weights, done = [], [], {}  # a sample and its fill copies are decoded once
        for s in raw:
            key = (s.get("__url__"), s.get("__key__"))
            if key not in done:
                try:
                    done[key] = self.decode(s)
                    if self.quarantine is not None and s["__weight__"]:
                        self.quarantine.ok()
                except DataError as e:
                    if self.quarantine is None:
                        raise
                    if s["__weight__"]:
                        self.quarantine(s.get("__url__"), s.get("__key__"), str(e))
                    done[key] = None
            decoded.append(done[key])
            weights.append(s["__weight__"] if done[key] is not None else 0.0)
        good = next((d for d in decoded if d is not None), None)
        if good is None:  # every rank must still take this step
            if ahead is None:
                raise DataError(f"every sample of a batch failed to decode (first: {raw[0].get('__url__')}:"
                                f"{raw[0].get('__key__')})")
            good = self._stand_in(ahead, stream, raw)
        batch = default_collate([d if d is not None else good for d in decoded])
        batch["loss_weight"] = torch.tensor(weights, dtype=torch.float32)
        batch["keys"] = [f"{s.get('__url__')}:{s.get('__key__')}" for s in raw]  # which samples (data.log_samples)
        batch["epoch"] = epoch
        # Bytes read for this batch, so the trainer can log read throughput (MB/s).
        batch["bytes"] = sum(len(v) for s in raw if s["__weight__"] for k, v in s.items() if not k.startswith("__"))
        return batch

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        workers = info.num_workers if info is not None else 1
        if workers != self.num_workers:
            raise ValueError(f"built for {self.num_workers} workers, running in {workers}")
        # This worker's streams, each from its own position, taken in turn: together with
        # the DataLoader's worker round-robin this gives the rank's stream round-robin.
        mine = self.streams_of(self.rank)
        if not self.shared_streams:
            mine = mine[worker::workers]
        gens = [_Ahead(self._stream_batches(v, self.positions[v])) for v in mine]
        for i in itertools.count():
            v, g = mine[i % len(mine)], gens[i % len(mine)]
            epoch, raw = next(g)
            if not self.shared_streams or i % workers == worker:  # the DataLoader takes batch i from worker i % n
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
