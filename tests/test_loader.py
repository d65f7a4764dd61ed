"""data_pipeline/loader.py: exact resume, equal batches per rank, disjoint ranks, seeded shuffle."""
from __future__ import annotations

import itertools
import signal

import pytest

from data_pipeline.loader import ShardBatches, make_loader
from data_pipeline.shards import ShardWriter
from data_pipeline.storage import DataError

UNEVEN = (5, 9, 13, 4, 11, 8, 6)


def decode(sample: dict) -> dict:
    return {"key": sample["__key__"]}


def build_shards(root, sizes) -> list[str]:
    """One shard per size; sample keys 'SS_III' (shard, index) are unique across shards."""
    urls = []
    for j, n in enumerate(sizes):
        url = str(root / f"s-{j:06d}.tar")
        with ShardWriter(url) as w:
            for i in range(n):
                w.write({"__key__": f"{j:02d}_{i:03d}", "txt": str(i).encode()})
        urls.append(url)
    return urls


def all_keys(sizes) -> list[str]:
    return [f"{j:02d}_{i:03d}" for j, n in enumerate(sizes) for i in range(n)]


def take(ds: ShardBatches, n: int) -> list[tuple[int, tuple[str, ...]]]:
    """The first n batches through the real DataLoader, as (epoch, keys)."""
    it = iter(make_loader(ds, prefetch_factor=2))
    try:
        return [(int(b["epoch"]), tuple(b["key"])) for b in itertools.islice(it, n)]
    finally:
        del it


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("uneven"), UNEVEN)


# -- exact resume ------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("with_counts", [True, False], ids=["counts", "no-counts"])
def test_resume_replays_the_same_stream(uneven, num_workers, with_counts):
    kw = dict(seed=5, num_workers=num_workers, counts=list(UNEVEN) if with_counts else None, shuffle_buffer=8)
    ds = ShardBatches(uneven, decode, 5, **kw)
    n_after = 8
    ref = take(ds, 13 + n_after)
    if with_counts:
        assert all(len(keys) == 5 for _, keys in ref)
    else:  # one rank without counts: an epoch's last batch is smaller, nothing is dropped
        assert sorted(k for e, keys in ref if e == 0 for k in keys) == sorted(all_keys(UNEVEN))
    if with_counts:
        per_epoch = ds.batches_per_epoch(0)
        assert per_epoch < 13  # the resume points below include one in a later epoch
        assert [e for e, _ in ref[:per_epoch + 1]] == [0] * per_epoch + [1]
    else:
        assert max(e for e, _ in ref[13:]) >= 1
    for start in (1, 5, 13):
        resumed = take(restored(ShardBatches(uneven, decode, 5, **kw), state_after(ShardBatches(uneven, decode, 5, **kw),
                                                                                    start)), n_after)
        assert resumed == ref[start:start + n_after], f"resumed after {start} batches"


def state_after(ds: ShardBatches, n: int) -> dict:
    """Consume n batches through a real loader, then take its state_dict()."""
    loader = make_loader(ds, prefetch_factor=2)
    it = iter(loader)
    for _ in range(n):
        next(it)
    state = loader.state_dict()
    del it
    return state


def restored(ds: ShardBatches, state: dict) -> ShardBatches:
    make_loader(ds).load_state_dict(state)  # sets the dataset's stream positions
    return ds


def test_exact_resume_two_ranks_two_workers_after_batch_13(uneven):
    """The issue's case: stop after batch 13 with 2 ranks x 2 workers, restore into fresh loaders."""
    def rank(r):
        return ShardBatches(uneven, decode, 2, seed=7, rank=r, world_size=2, num_workers=2, counts=list(UNEVEN),
                            shuffle_buffer=5)
    for r in (0, 1):
        ref = take(rank(r), 13 + 10)
        state = state_after(rank(r), 13)
        assert take(restored(rank(r), state), 10) == ref[13:]
    # Every rank computes the same job-wide state, so one rank's copy restores all of them.
    assert state_after(rank(0), 13) == state_after(rank(1), 13)


def epoch0_keys(batches) -> list[str]:
    return [k for e, keys in batches if e == 0 for k in keys]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 4)])
def test_elastic_resume_sees_each_sample_of_the_epoch_once(tmp_path, before, after):
    """Resume mid-epoch with another world size: the epoch's samples are exactly those of an
    uninterrupted run, none twice, none skipped."""
    urls = build_shards(tmp_path, (6, 9, 7, 8, 5, 10, 6, 9))
    kw = dict(seed=3, virtual_ranks=4, counts=[6, 9, 7, 8, 5, 10, 6, 9], shuffle_buffer=4, num_workers=0)

    def world(size):
        return [ShardBatches(urls, decode, 2, rank=r, world_size=size, **kw) for r in range(size)]

    per_rank = world(1)[0].batches_per_epoch(0)
    reference = epoch0_keys(take(world(1)[0], per_rank))
    assert len(reference) == len(set(reference)) == world(1)[0].samples_per_epoch(0)

    first = world(before)
    k = (per_rank // before) // 2 + 1  # batches each rank trains before the restart: mid-epoch
    seen = [key for ds in first for key in epoch0_keys(take(ds, k))]
    state = state_after(first[0], k)
    assert state == state_after(first[-1], k)
    # After the restart each rank runs to the end of epoch 0 (and a little into epoch 1).
    rest = [key for ds in world(after) for key in epoch0_keys(take(restored(ds, state), per_rank // after + 2))]
    assert sorted(seen + rest) == sorted(reference)


def test_resume_in_process_matches_worker_processes(uneven):
    """num_workers=0 reads in the training process; the order is that of one worker."""
    kw = dict(seed=2, counts=list(UNEVEN), shuffle_buffer=4)
    assert take(ShardBatches(uneven, decode, 4, num_workers=0, **kw), 12) == \
        take(ShardBatches(uneven, decode, 4, num_workers=1, **kw), 12)


# -- data parallel ranks ------------------------------------------------------------------------------

@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_get_equal_batches_and_disjoint_samples(uneven, num_workers):
    bs = 2
    ranks = [ShardBatches(uneven, decode, bs, seed=11, rank=r, world_size=2, num_workers=num_workers,
                          counts=list(UNEVEN), shuffle_buffer=6) for r in (0, 1)]
    e0, e1 = ranks[0].batches_per_epoch(0), ranks[0].batches_per_epoch(1)
    assert [r.batches_per_epoch(0) for r in ranks] == [e0, e0]
    assert [r.batches_per_epoch(1) for r in ranks] == [e1, e1]
    assert e0 > 0 and e1 > 0
    assert ranks[1].samples_per_epoch(0) == e0 * bs * 2
    streams = [take(r, e0 + e1 + 1) for r in ranks]
    for stream in streams:  # the epoch switches at the same batch on both ranks
        assert [e for e, _ in stream] == [0] * e0 + [1] * e1 + [2]
    keys = [[k for _, batch in stream[:e0] for k in batch] for stream in streams]
    both = keys[0] + keys[1]
    assert len(both) == 2 * e0 * bs
    assert len(set(both)) == len(both), "a sample was read twice within one epoch"
    assert set(both) <= set(all_keys(UNEVEN))
    shards_of = [{k.split("_")[0] for k in rank_keys} for rank_keys in keys]
    assert not shards_of[0] & shards_of[1], "a shard was read by both ranks in one epoch"
    epoch1 = [k for stream in streams for _, batch in stream[e0:e0 + e1] for k in batch]
    assert len(set(epoch1)) == len(epoch1)


# -- shuffling -------------------------------------------------------------------------------------------

def epoch_keys(stream, epoch):
    return [k for e, batch in stream if e == epoch for k in batch]


def test_shuffle_is_seeded_and_changes_per_epoch(uneven):
    def run(seed):
        ds = ShardBatches(uneven, decode, 4, seed=seed, num_workers=0, counts=list(UNEVEN), shuffle_buffer=10)
        n = ds.batches_per_epoch(0) + ds.batches_per_epoch(1)
        return take(ds, n)

    a, again, other = run(0), run(0), run(1)
    assert a == again
    assert epoch_keys(a, 0) != epoch_keys(a, 1)
    assert epoch_keys(a, 0) != epoch_keys(other, 0)
    assert epoch_keys(a, 0) != sorted(epoch_keys(a, 0))


def test_no_shuffle_keeps_file_order(uneven):
    ds = ShardBatches(uneven, decode, 4, num_workers=0, counts=list(UNEVEN), shuffle=False)
    per_epoch = ds.batches_per_epoch(0)
    assert per_epoch == sum(UNEVEN) // 4
    stream = take(ds, 2 * per_epoch)
    flat = all_keys(UNEVEN)[:per_epoch * 4]
    assert epoch_keys(stream, 0) == flat
    assert epoch_keys(stream, 1) == flat


# -- refusals ---------------------------------------------------------------------------------------------

def test_too_few_shards_for_ranks_and_workers(tmp_path):
    urls = build_shards(tmp_path, (4, 4, 4))
    with pytest.raises(DataError) as e:
        ShardBatches(urls, decode, 2, world_size=2, num_workers=2, counts=[4, 4, 4])
    assert str(e.value) == ("3 shards cannot feed 4 virtual ranks (2 ranks x 2 workers or more): "
                            "write at least 4 (smaller) shards")
    with pytest.raises(DataError, match=r"^3 shards cannot feed 4 virtual ranks \(1 ranks x 4 workers"):
        ShardBatches(urls, decode, 2, num_workers=4)
    with pytest.raises(DataError, match=r"^virtual_ranks=6 must be a multiple of world size 2 x num_workers 2"):
        ShardBatches(urls * 2, decode, 2, world_size=2, num_workers=2, virtual_ranks=6, counts=[4] * 6)
    ShardBatches(urls, decode, 2, num_workers=3)  # exactly enough


def test_counts_needed_for_several_ranks(tmp_path):
    urls = build_shards(tmp_path, (4, 4))
    with pytest.raises(DataError) as e:
        ShardBatches(urls, decode, 2, world_size=2, num_workers=0, counts=None)
    assert str(e.value).startswith("per-shard sample counts are needed to give every rank the same number of batches")
    with pytest.raises(DataError, match=r"^the shard list is empty$"):
        ShardBatches([], decode, 2)
    with pytest.raises(ValueError, match=r"^counts must have one entry per shard$"):
        ShardBatches(urls, decode, 2, counts=[4])


def test_wrong_worker_count_is_refused(tmp_path):
    urls = build_shards(tmp_path, (4, 4))
    ds = ShardBatches(urls, decode, 2, num_workers=2)
    with pytest.raises(ValueError, match=r"^built for 2 workers, running in 1$"):
        next(iter(ds))


def first_batch_or_timeout(ds, seconds: float):
    """next(iter(ds)) in this process, or the string 'hung' after `seconds`."""
    def alarm(*_):
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return next(iter(ds))
    except TimeoutError:
        return "hung"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_small_data_without_counts_gives_a_smaller_batch(tmp_path):
    urls = build_shards(tmp_path, (1, 1))
    ds = ShardBatches(urls, decode, 4, num_workers=0, shuffle=False)
    assert take(ds, 2) == [(0, ("00_000", "01_000")), (1, ("00_000", "01_000"))]


def test_a_stream_without_samples_is_an_error(tmp_path):
    urls = build_shards(tmp_path, (0, 0))
    with pytest.raises(DataError, match=r"^stream 0 found fewer than batch_size=4 samples in its shards$"):
        first_batch_or_timeout(ShardBatches(urls, decode, 4, num_workers=0), 5.0)


def test_slot_with_less_than_one_batch_is_an_error_with_counts(tmp_path):
    # With counts, an epoch in which some stream cannot fill one batch must raise, not skip
    # epochs forever.
    urls = build_shards(tmp_path, (1, 1))
    ds = ShardBatches(urls, decode, 4, num_workers=0, counts=[1, 1])
    assert ds.batches_per_epoch(0) == 0
    try:
        result = first_batch_or_timeout(ds, 2.0)
    except DataError as e:
        result = e
    assert result != "hung", "ShardBatches with counts loops forever when no slot can fill a batch"
    assert isinstance(result, DataError) and "batch_size=4" in str(result)


def test_s3_shards_stream_and_resume_like_local_ones(uneven, s3_bucket):
    """The same stream, and the same resume, when the shards live on an S3 endpoint."""
    import os

    import s3fs

    bucket, endpoint = s3_bucket
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    remote = []
    for url in uneven:
        fs.put_file(url, f"{bucket[5:]}/data/{os.path.basename(url)}")
        remote.append(f"{bucket}/data/{os.path.basename(url)}")
    kw = dict(seed=4, num_workers=2, counts=list(UNEVEN), shuffle_buffer=6)
    local = take(ShardBatches(uneven, decode, 3, **kw), 12)
    assert take(ShardBatches(remote, decode, 3, endpoint_url=endpoint, **kw), 12) == local
    state = state_after(ShardBatches(remote, decode, 3, endpoint_url=endpoint, **kw), 7)
    assert take(restored(ShardBatches(remote, decode, 3, endpoint_url=endpoint, **kw), state), 5) == local[7:]
