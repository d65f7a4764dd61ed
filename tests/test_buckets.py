"""Aspect-ratio buckets: one shape per batch, nothing cropped needlessly, resumable."""
import io
import itertools

import pytest
from PIL import Image

from data_pipeline.buckets import ImageBucketer, make_buckets, nearest_bucket
from data_pipeline.loader import ShardBatches, make_loader
from data_pipeline.shards import write_shards
from trainer.autoencoder.train import decode_image_sample

SHAPES = [(64, 64), (128, 64), (64, 128), (96, 64), (64, 96), (200, 40)]


def test_buckets_have_about_equal_area_and_bounded_aspect():
    buckets = make_buckets(512, 64, 2.0)
    assert (512, 512) in buckets and (704, 384) in buckets and (768, 320) not in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 0.5 <= w / h <= 2.0
        assert 0.85 * 512 * 512 <= w * h <= 1.15 * 512 * 512
        assert (h, w) in buckets
    assert buckets[nearest_bucket((1000, 500), buckets)] == (704, 384)
    assert buckets[nearest_bucket((500, 1000), buckets)] == (384, 704)
    assert make_buckets(64, 16, 2.0) == [(48, 96), (48, 80), (64, 64), (80, 48), (96, 48)]
    with pytest.raises(ValueError, match="multiple of the bucket step"):
        make_buckets(500, 64)


def image(size, split=True) -> bytes:
    """Left half red, right half blue: a square crop of a wide image loses most of both."""
    img = Image.new("RGB", size, (220, 20, 20))
    if split:
        img.paste((20, 20, 220), (size[0] // 2, 0, size[0], size[1]))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    samples = ({"__key__": f"{i:04d}", "png": image(SHAPES[i % len(SHAPES)]), "txt": b"x"} for i in range(48))
    return write_shards(samples, str(root), per_shard=8)


def decode(sample):
    out = decode_image_sample(sample, resolution=64)
    out["key"] = sample["__key__"]
    return out


def dataset(urls, **kw):
    return ShardBatches(urls, decode, 4, seed=1, shuffle_buffer=6,
                        bucketer=ImageBucketer(make_buckets(64, 16, 2.0)), **kw)


def test_every_batch_has_one_shape_and_an_epoch_has_every_sample_once(mixed):
    ds = dataset(mixed, num_workers=0)
    keys, shapes = [], set()
    for batch in make_loader(ds):
        if batch["epoch"] > 0:
            break
        assert batch["x"].ndim == 4  # stacking succeeded: one shape in the batch
        shapes.add(tuple(batch["x"].shape[2:]))
        keys += [k for k, w in zip(batch["key"], batch["loss_weight"]) if w > 0]
    assert sorted(keys) == [f"{i:04d}" for i in range(48)]
    assert len(shapes) >= 3  # wide, tall and square batches


def test_wide_images_keep_their_sides(mixed):
    ds = dataset(mixed, num_workers=0)
    for batch in itertools.islice(make_loader(ds), 20):
        h, w = batch["x"].shape[2:]
        if w >= 2 * h:  # a 2:1 bucket: both halves survive the crop
            x = batch["x"][0]
            assert x[0, :, : w // 4].mean() > 0.5 and x[2, :, -w // 4:].mean() > 0.5
            return
    pytest.fail("no 2:1 batch in the first 20")


def test_bucketed_stream_resumes_exactly(mixed):
    ref = [tuple(b["key"]) for b in itertools.islice(make_loader(dataset(mixed, num_workers=2)), 14)]
    loader = make_loader(dataset(mixed, num_workers=2))
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    del it
    resumed = make_loader(dataset(mixed, num_workers=2))
    resumed.load_state_dict(state)
    assert [tuple(b["key"]) for b in itertools.islice(resumed, 9)] == ref[5:]


def test_bucketed_ranks_stay_in_step_with_counts(mixed):
    ranks = [dataset(mixed, num_workers=0, rank=r, world_size=2, counts=[8] * 6) for r in (0, 1)]
    per_epoch = ranks[0].batches_per_epoch(0)
    assert per_epoch == ranks[1].batches_per_epoch(0) > 0
    seen = []
    for ds in ranks:
        batches = list(itertools.islice(make_loader(ds), per_epoch + 1))
        assert [int(b["epoch"]) for b in batches] == [0] * per_epoch + [1]
        seen += [k for b in batches[:per_epoch] for k, w in zip(b["key"], b["loss_weight"]) if w > 0]
    assert sorted(seen) == [f"{i:04d}" for i in range(48)]


# Five bucket shapes of make_buckets(64, 16, 2.0), in uneven numbers: 40 images.
FIVE = [(96, 48)] * 3 + [(80, 48)] * 7 + [(64, 64)] * 17 + [(48, 80)] * 9 + [(48, 96)] * 4


@pytest.fixture(scope="module")
def forty(tmp_path_factory):
    root = tmp_path_factory.mktemp("forty")
    samples = ({"__key__": f"{i:04d}", "png": image(size, split=False), "txt": b"x"} for i, size in enumerate(FIVE))
    return write_shards(samples, str(root), per_shard=1000)  # one shard


def weighed(batches, epoch):
    return [k for b in batches if int(b["epoch"]) == epoch for k, w in zip(b["key"], b["loss_weight"]) if w > 0]


def test_forty_images_in_five_buckets_all_seen_every_epoch_on_two_ranks_two_workers(forty):
    """#28: incomplete bucket batches are filled (weighted 0), never dropped: the fraction of the
    set seen per epoch is 1.0, on 2 ranks x 2 workers from one shard, also across a resume."""
    def rank(r):
        return dataset(forty, num_workers=2, rank=r, world_size=2)
    per_epoch = rank(0).batches_per_epoch(0)
    got = {r: list(itertools.islice(make_loader(rank(r)), 3 * per_epoch)) for r in (0, 1)}
    for epoch in (0, 1, 2):
        seen = weighed(got[0], epoch) + weighed(got[1], epoch)
        assert sorted(seen) == [f"{i:04d}" for i in range(40)], f"epoch {epoch}"
        assert len(set(seen)) / 40 == 1.0
    for b in got[0] + got[1]:
        assert b["x"].shape[0] == 4  # fixed batch size: the rest of a bucket's last batch is fill
    # A stop mid-epoch 1 and a resume continue exactly.
    loader = make_loader(rank(0))
    it = iter(loader)
    for _ in range(per_epoch + 3):
        next(it)
    state = loader.state_dict()
    del it
    for r in (0, 1):
        resumed = make_loader(rank(r))
        resumed.load_state_dict(state)
        assert [list(b["key"]) for b in itertools.islice(resumed, 5)] == \
            [list(b["key"]) for b in got[r][per_epoch + 3:per_epoch + 8]]
