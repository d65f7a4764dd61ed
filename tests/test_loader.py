"""data_pipeline/loader.py: exact resume, equal batches per rank, every sample once per epoch, seeded shuffle."""
from __future__ import annotations

import itertools

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
    """The first n batches through the real DataLoader, as (epoch, keys); fill weighted 0 is shown as '-'."""
    it = iter(make_loader(ds, prefetch_factor=2))
    try:
        return [(int(b["epoch"]), tuple(k if w > 0 else "-" for k, w in zip(b["key"], b["loss_weight"].tolist())))
                for b in itertools.islice(it, n)]
    finally:
        del it


def trained(batches, epoch=None) -> list[str]:
    """Keys trained on (weight > 0), of one epoch or all."""
    return [k for e, keys in batches if epoch is None or e == epoch for k in keys if k != "-"]


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
    assert all(len(keys) == 5 for _, keys in ref)  # fixed batch shape: the last of an epoch is filled
    per_epoch = ds.batches_per_epoch(0)
    assert per_epoch < 13  # the resume points below include one in a later epoch
    assert [e for e, _ in ref[:per_epoch + 1]] == [0] * per_epoch + [1]
    assert sorted(trained(ref, 0)) == sorted(all_keys(UNEVEN))  # nothing dropped
    for start in (1, 5, 13):
        state = state_after(ShardBatches(uneven, decode, 5, **kw), start)
        resumed = take(restored(ShardBatches(uneven, decode, 5, **kw), state), n_after)
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


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 4)])
def test_elastic_resume_sees_each_sample_of_the_epoch_once(tmp_path, before, after):
    """Resume mid-epoch with another world size: the epoch's samples are exactly all samples,
    none twice, none skipped."""
    sizes = (6, 9, 7, 8, 5, 10, 6, 9)
    urls = build_shards(tmp_path, sizes)
    kw = dict(seed=3, virtual_ranks=4, counts=list(sizes), shuffle_buffer=4, num_workers=0)

    def world(size):
        return [ShardBatches(urls, decode, 2, rank=r, world_size=size, **kw) for r in range(size)]

    per_rank = world(1)[0].batches_per_epoch(0)
    assert world(1)[0].samples_per_epoch(0) == sum(sizes)
    first = world(before)
    k = (per_rank // before) // 2 + 1  # batches each rank trains before the restart: mid-epoch
    seen = [key for ds in first for key in trained(take(ds, k), 0)]
    state = state_after(first[0], k)
    assert state == state_after(first[-1], k)
    # After the restart each rank runs to the end of epoch 0 (and a little into epoch 1).
    rest = [key for ds in world(after) for key in trained(take(restored(ds, state), per_rank // after + 2), 0)]
    assert sorted(seen + rest) == sorted(all_keys(sizes))


def test_resume_in_process_matches_worker_processes(uneven):
    """num_workers=0 reads in the training process; the order is that of one worker."""
    kw = dict(seed=2, counts=list(UNEVEN), shuffle_buffer=4)
    assert take(ShardBatches(uneven, decode, 4, num_workers=0, **kw), 12) == \
        take(ShardBatches(uneven, decode, 4, num_workers=1, **kw), 12)


# -- data parallel ranks ------------------------------------------------------------------------------

@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_get_equal_batches_and_every_sample_once(uneven, num_workers):
    bs = 2
    ranks = [ShardBatches(uneven, decode, bs, seed=11, rank=r, world_size=2, num_workers=num_workers,
                          counts=list(UNEVEN), shuffle_buffer=6) for r in (0, 1)]
    e0, e1 = ranks[0].batches_per_epoch(0), ranks[0].batches_per_epoch(1)
    assert [r.batches_per_epoch(0) for r in ranks] == [e0, e0]
    assert [r.batches_per_epoch(1) for r in ranks] == [e1, e1]
    assert ranks[1].samples_per_epoch(0) == sum(UNEVEN) <= ranks[1].slots_per_epoch(0) == e0 * bs * 2
    streams = [take(r, e0 + e1 + 1) for r in ranks]
    for stream in streams:  # the epoch switches at the same batch on both ranks
        assert [e for e, _ in stream] == [0] * e0 + [1] * e1 + [2]
    for epoch in (0, 1):
        both = trained(streams[0], epoch) + trained(streams[1], epoch)
        assert sorted(both) == sorted(all_keys(UNEVEN)), f"epoch {epoch}: a sample twice or left out"
    assert set(trained(streams[0], 0)) != set(trained(streams[0], 1))  # shares change per epoch


@pytest.mark.parametrize("world, workers, batch", [(2, 2, 2), (8, 4, 1), (4, 1, 3)])
def test_one_small_shard_feeds_many_ranks_and_workers(tmp_path, world, workers, batch):
    """#28: 40 images in one shard, 2 ranks x 2 workers and 8 x 4: every image exactly once per epoch."""
    urls = build_shards(tmp_path, (40,))
    ranks = [ShardBatches(urls, decode, batch, seed=1, rank=r, world_size=world, num_workers=workers,
                          shuffle_buffer=8) for r in range(world)]
    per_epoch = ranks[0].batches_per_epoch(0)
    got = [take(ds, 2 * per_epoch) for ds in ranks]
    for epoch in (0, 1):
        assert sorted(k for g in got for k in trained(g, epoch)) == sorted(all_keys((40,)))
    # Filling is bounded: at most one batch per stream more than the samples need.
    assert ranks[0].slots_per_epoch(0) <= 40 + world * workers * batch


# -- shuffling -------------------------------------------------------------------------------------------

def test_shuffle_is_seeded_and_changes_per_epoch(uneven):
    def run(seed):
        ds = ShardBatches(uneven, decode, 4, seed=seed, num_workers=0, counts=list(UNEVEN), shuffle_buffer=10)
        n = ds.batches_per_epoch(0) + ds.batches_per_epoch(1)
        return take(ds, n)

    a, again, other = run(0), run(0), run(1)
    assert a == again
    assert trained(a, 0) != trained(a, 1)
    assert trained(a, 0) != trained(other, 0)
    assert trained(a, 0) != sorted(trained(a, 0))


def test_no_shuffle_keeps_file_order(uneven):
    ds = ShardBatches(uneven, decode, 4, num_workers=0, counts=list(UNEVEN), shuffle=False)
    per_epoch = ds.batches_per_epoch(0)
    assert per_epoch == -(-sum(UNEVEN) // 4)
    stream = take(ds, 2 * per_epoch)
    assert trained(stream, 0) == all_keys(UNEVEN) == trained(stream, 1)


# -- refusals ---------------------------------------------------------------------------------------------

def test_too_few_samples_for_ranks_and_workers(tmp_path):
    urls = build_shards(tmp_path, (2, 1))
    # A set this small: its streams are one per rank, and the two workers of a rank share them.
    ds = ShardBatches(urls, decode, 2, world_size=2, num_workers=2, counts=[2, 1])
    assert ds.virtual_ranks == 2 and ds.shared_streams
    with pytest.raises(DataError) as e:
        ShardBatches(urls, decode, 2, world_size=4, rank=1, num_workers=0, counts=[2, 1])
    assert str(e.value) == ("epoch 0 has 3 samples, fewer than the 4 data streams (4 ranks, data.virtual_ranks=4) it "
                            "must feed, each needing one: run on at most 3 ranks, or repeat the data (data.repeats)")
    with pytest.raises(DataError, match=r"fewer than the 4 data streams \(2 ranks, data.virtual_ranks=4\) .*: set "
                                        r"data.virtual_ranks to a multiple of 2 up to 3 \(or 0: picked from the data\)$"):
        ShardBatches(urls, decode, 2, world_size=2, num_workers=2, virtual_ranks=4, counts=[2, 1])
    with pytest.raises(DataError, match=r"^virtual_ranks=5 must be a multiple of the world size 2$"):
        ShardBatches(urls * 4, decode, 2, world_size=2, num_workers=2, virtual_ranks=5, counts=[2, 1] * 4)
    ShardBatches(urls, decode, 2, num_workers=0, virtual_ranks=3)  # exactly enough: one sample per stream


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_sharing_a_ranks_streams_give_the_batches_of_one_reader(uneven, workers):
    """With fewer streams per rank than workers, each worker collates every n-th batch of all of them:
    the batches are those of one process reading them, in the same order, and they resume alike."""
    kw = dict(seed=6, counts=list(UNEVEN), shuffle_buffer=4, virtual_ranks=2, world_size=2, rank=1)
    one = take(ShardBatches(uneven, decode, 3, num_workers=0, **kw), 20)
    assert take(ShardBatches(uneven, decode, 3, num_workers=workers, **kw), 20) == one
    state = state_after(ShardBatches(uneven, decode, 3, num_workers=workers, **kw), 7)
    assert take(restored(ShardBatches(uneven, decode, 3, num_workers=workers, **kw), state), 13) == one[7:]


def test_bad_arguments(tmp_path):
    urls = build_shards(tmp_path, (4, 4))
    with pytest.raises(DataError, match=r"^the shard list is empty$"):
        ShardBatches([], decode, 2)
    with pytest.raises(ValueError, match=r"^counts must have one entry per shard$"):
        ShardBatches(urls, decode, 2, counts=[4])


def test_wrong_worker_count_is_refused(tmp_path):
    urls = build_shards(tmp_path, (4, 4))
    ds = ShardBatches(urls, decode, 2, num_workers=2)
    with pytest.raises(ValueError, match=r"^built for 2 workers, running in 1$"):
        next(iter(ds))


def test_small_data_fills_the_batch(tmp_path):
    urls = build_shards(tmp_path, (1, 1))
    ds = ShardBatches(urls, decode, 4, num_workers=0, shuffle=False)
    assert take(ds, 2) == [(0, ("00_000", "01_000", "-", "-")), (1, ("00_000", "01_000", "-", "-"))]


def test_shards_without_samples_are_an_error(tmp_path):
    urls = build_shards(tmp_path, (0, 0))
    with pytest.raises(DataError, match=r"^epoch 0 has 0 samples, fewer than the 1 data streams"):
        ShardBatches(urls, decode, 4, num_workers=0)


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
