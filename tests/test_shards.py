"""Shards on local disk and S3 (moto on 127.0.0.1): writing, reading, errors, image decoding,
and the launch/make_shards.py folder converter."""
from __future__ import annotations

import io
import os
import random
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.images import decode_rgb, image_and_caption, resize_center_crop
from data_pipeline.shards import ShardWriter, iter_samples, write_shards
from data_pipeline.storage import DataError, expand_shards, filesystem
from conftest import PY, run_cmd


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_samples(n: int = 8) -> list[dict]:
    rng = random.Random(1234)
    out = []
    for i in range(n):
        out.append({
            "__key__": f"{i:06d}",
            "bin": rng.randbytes(rng.randrange(0, 3000)),  # crosses 512-byte tar blocks, may be empty
            "txt": f"caption {i} \u00e9\n".encode(),
            "json": b'{"i": %d}' % i,
        })
    return out


def read_all(urls, endpoint_url=None) -> list[dict]:
    return [s for u in urls for s in iter_samples(u, endpoint_url)]


def assert_same_samples(got: list[dict], want: list[dict], urls: list[str], per_shard: int):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g["__url__"] == urls[i // per_shard]
        assert {k: v for k, v in g.items() if k != "__url__"} == w


# -- round trips ----------------------------------------------------------------------------------

def test_local_round_trip_is_byte_identical(tmp_path):
    samples = make_samples(8)
    out = str(tmp_path / "out")
    urls = write_shards(samples, out, per_shard=3)
    assert urls == [os.path.join(out, f"shard-{i:06d}.tar") for i in range(3)]
    assert sorted(os.listdir(out)) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert_same_samples(read_all(urls), samples, urls, 3)
    assert [s["__key__"] for s in iter_samples(urls[2])] == ["000006", "000007"]
    # shards are readable by others, not mkstemp's 0600
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(urls[0]).st_mode & 0o777 == 0o666 & ~umask


def test_expand_shards_local_forms(tmp_path):
    out = str(tmp_path / "out")
    urls = write_shards(make_samples(8), out, per_shard=3, prefix="shapes")
    assert expand_shards(out) == urls
    assert expand_shards(os.path.join(out, "shapes-{000000..000002}.tar")) == urls
    assert expand_shards(os.path.join(out, "*.tar")) == urls
    assert expand_shards(f"{urls[2]},{urls[0]}") == [urls[2], urls[0]]
    assert expand_shards([urls[1], out]) == [urls[1]] + urls
    # a temp file or another suffix beside the shards is not a shard
    open(os.path.join(out, ".tmp-abc"), "wb").close()
    open(os.path.join(out, "notes.txt"), "wb").close()
    assert expand_shards(out) == urls


def test_s3_round_trip_and_expand(s3_bucket, tmp_path):
    bucket, endpoint = s3_bucket
    samples = make_samples(8)
    urls = write_shards(samples, f"{bucket}/prefix", per_shard=3, prefix="shapes", endpoint_url=endpoint)
    assert urls == [f"{bucket}/prefix/shapes-{i:06d}.tar" for i in range(3)]
    assert expand_shards(f"{bucket}/prefix/shapes-{{000000..000002}}.tar", endpoint) == urls
    assert expand_shards(f"{bucket}/prefix", endpoint) == urls
    assert expand_shards(f"{bucket}/prefix/", endpoint) == urls
    assert_same_samples(read_all(urls, endpoint), samples, urls, 3)
    # the objects are byte-identical to the same shards written locally
    local = write_shards(samples, str(tmp_path / "local"), per_shard=3, prefix="shapes")
    fs, _ = filesystem(bucket, endpoint)
    for remote_url, local_path in zip(urls, local):
        assert fs.cat_file(remote_url[len("s3://"):]) == open(local_path, "rb").read()


def test_s3_endpoint_from_environment(s3_bucket, monkeypatch):
    bucket, endpoint = s3_bucket
    samples = make_samples(2)
    urls = write_shards(samples, f"{bucket}/env", per_shard=5, endpoint_url=endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    assert expand_shards(f"{bucket}/env") == urls
    assert_same_samples(read_all(urls), samples, urls, 5)


def test_same_samples_give_byte_identical_shards(tmp_path):
    a = write_shards(make_samples(8), str(tmp_path / "a"), per_shard=4)
    b = write_shards(make_samples(8), str(tmp_path / "b"), per_shard=4)
    assert [os.path.basename(u) for u in a] == [os.path.basename(u) for u in b]
    for x, y in zip(a, b):
        assert open(x, "rb").read() == open(y, "rb").read()
    changed = make_samples(8)
    changed[5]["txt"] = b"other"
    c = write_shards(changed, str(tmp_path / "c"), per_shard=4)
    assert open(a[0], "rb").read() == open(c[0], "rb").read()
    assert open(a[1], "rb").read() != open(c[1], "rb").read()


# -- atomic writing ---------------------------------------------------------------------------------

def test_exception_inside_writer_leaves_nothing_local(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(str(out / "x.tar")) as w:
            w.write(make_samples(1)[0])
            raise RuntimeError("boom")
    assert os.listdir(out) == []


def test_exception_inside_writer_leaves_nothing_on_s3(s3_bucket, tmp_path, monkeypatch):
    bucket, endpoint = s3_bucket
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(f"{bucket}/p/x.tar", endpoint) as w:
            w.write(make_samples(1)[0])
            assert len(os.listdir(spool)) == 1  # the spooled upload exists while writing
            raise RuntimeError("boom")
    assert os.listdir(spool) == []
    fs, _ = filesystem(bucket, endpoint)
    fs.invalidate_cache()
    assert fs.find(bucket[len("s3://"):]) == []
    # a clean block uploads and removes its spool file
    with ShardWriter(f"{bucket}/p/y.tar", endpoint) as w:
        w.write(make_samples(1)[0])
    assert os.listdir(spool) == []
    assert expand_shards(f"{bucket}/p", endpoint) == [f"{bucket}/p/y.tar"]


def test_failing_sample_stream_keeps_only_complete_shards(tmp_path):
    def samples():
        yield from make_samples(5)
        raise KeyError("source died")

    out = tmp_path / "out"
    with pytest.raises(KeyError):
        write_shards(samples(), str(out), per_shard=3)
    assert sorted(os.listdir(out)) == ["shard-000000.tar"]
    assert [s["__key__"] for s in iter_samples(str(out / "shard-000000.tar"))] == ["000000", "000001", "000002"]


@pytest.mark.parametrize("key", ["a.b", "x/y", "", ".hidden"])
def test_invalid_key_is_refused_naming_url_and_key(tmp_path, key):
    url = str(tmp_path / "x.tar")
    with pytest.raises(DataError) as e:
        with ShardWriter(url) as w:
            w.write({"__key__": key, "txt": b"x"})
    assert str(e.value).startswith(f"invalid sample key {key!r} for {url}")
    assert os.listdir(tmp_path) == []


def test_non_bytes_field_is_refused(tmp_path):
    with pytest.raises(TypeError, match=r"^sample k1: field 'txt' must be bytes, got str$"):
        with ShardWriter(str(tmp_path / "x.tar")) as w:
            w.write({"__key__": "k1", "txt": "text"})
    assert os.listdir(tmp_path) == []


# -- errors that name the URL ------------------------------------------------------------------------

def test_missing_local_shard(tmp_path):
    url = str(tmp_path / "nope-000000.tar")
    assert expand_shards(url) == [url]
    with pytest.raises(DataError) as e:
        list(iter_samples(url))
    assert str(e.value) == f"shard not found: {url}"


def test_missing_s3_shard(s3_bucket):
    bucket, endpoint = s3_bucket
    url = f"{bucket}/prefix/shapes-000009.tar"
    with pytest.raises(DataError) as e:
        list(iter_samples(url, endpoint))
    assert str(e.value) == f"shard not found: {url}"
    url = "s3://no-such-bucket-here/x.tar"
    with pytest.raises(DataError) as e:
        list(iter_samples(url, endpoint))
    assert str(e.value) == f"shard not found: {url}"


def test_empty_shard_lists(tmp_path):
    with pytest.raises(DataError) as e:
        expand_shards([])
    assert str(e.value) == "the shard list [] is empty"
    with pytest.raises(DataError) as e:
        expand_shards(" , ")
    assert str(e.value) == "the shard list ' , ' is empty"
    pattern = str(tmp_path / "*.tar")
    with pytest.raises(DataError) as e:
        expand_shards(pattern)
    assert str(e.value) == f"the shard list {pattern!r} is empty"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no shards here")
    with pytest.raises(DataError) as e:
        expand_shards(str(empty))
    assert str(e.value) == f"no .tar shards found under {empty}"


def test_s3_prefix_without_shards(s3_bucket):
    bucket, endpoint = s3_bucket
    fs, _ = filesystem(bucket, endpoint)
    fs.pipe_file(f"{bucket[5:]}/docs/readme.txt", b"no shards")
    fs.invalidate_cache()
    with pytest.raises(DataError) as e:
        expand_shards(f"{bucket}/docs", endpoint)
    assert str(e.value) == f"no .tar shards found under {bucket}/docs"


def test_random_bytes_shard(tmp_path):
    url = str(tmp_path / "garbage.tar")
    with open(url, "wb") as f:
        f.write(random.Random(7).randbytes(4096))
    with pytest.raises(DataError) as e:
        list(iter_samples(url))
    assert str(e.value).startswith(f"shard {url}: not a readable tar file: ")


def test_zero_byte_shard_is_an_error(tmp_path):
    url = str(tmp_path / "empty.tar")
    open(url, "wb").close()
    with pytest.raises(DataError) as e:
        list(iter_samples(url))
    assert str(e.value) == f"shard {url}: not a readable tar file: empty file"


def test_truncated_shard_is_an_error(tmp_path):
    (url,) = write_shards(make_samples(3), str(tmp_path / "out"), per_shard=3)
    data = open(url, "rb").read()
    cut = str(tmp_path / "cut.tar")
    with open(cut, "wb") as f:
        f.write(data[:700])  # inside the first member's data
    with pytest.raises(DataError) as e:
        list(iter_samples(cut))
    assert str(e.value).startswith(f"shard {cut}: not a readable tar file: ")


# -- images -------------------------------------------------------------------------------------------

def shard_sample(tmp_path, sample: dict) -> dict:
    (url,) = write_shards([sample], str(tmp_path / "one"), per_shard=1)
    (got,) = list(iter_samples(url))
    return got


def test_image_and_caption_ok(tmp_path):
    img = Image.new("RGB", (12, 6), (200, 10, 10))
    s = shard_sample(tmp_path, {"__key__": "k", "png": png_bytes(img), "txt": b"  a red box \n"})
    x, caption, size = image_and_caption(s, 4)
    assert caption == "a red box"
    assert size == (12, 6)
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    expected = torch.tensor([200, 10, 10]).float().div(127.5).sub(1).view(3, 1, 1).expand(3, 4, 4)
    assert torch.allclose(x, expected, atol=2 / 127.5)


def test_sample_without_image(tmp_path):
    s = shard_sample(tmp_path, {"__key__": "k7", "txt": b"caption only"})
    with pytest.raises(DataError) as e:
        image_and_caption(s, 8)
    assert str(e.value) == (f"sample {s['__url__']}:k7 has no image (expected one of .jpg, .jpeg, .png, .webp)")


def test_sample_without_caption(tmp_path):
    s = shard_sample(tmp_path, {"__key__": "k8", "png": png_bytes(Image.new("RGB", (4, 4)))})
    with pytest.raises(DataError) as e:
        image_and_caption(s, 8)
    assert str(e.value) == f"sample {s['__url__']}:k8 has no caption (expected .txt)"


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_png_names_shard_and_key(tmp_path, kind):
    good = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)))
    bad = b"\x89PNG not really an image" if kind == "garbage" else good[: len(good) // 2]
    s = shard_sample(tmp_path, {"__key__": "k9", "png": bad, "txt": b"x"})
    with pytest.raises(DataError) as e:
        image_and_caption(s, 8)
    assert str(e.value).startswith(f"cannot decode image {s['__url__']}:k9: ")


def test_decode_rgb_composites_alpha_over_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (10, 20, 30, 0))      # fully transparent
    rgba.putpixel((1, 0), (10, 20, 30, 255))    # opaque
    rgba.putpixel((2, 0), (0, 0, 0, 128))       # half black over white
    img = decode_rgb(png_bytes(rgba), "where")
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 0)) == (10, 20, 30)
    assert all(abs(c - 127) <= 1 for c in img.getpixel((2, 0)))


def test_decode_rgb_other_modes():
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))
    la.putpixel((1, 0), (50, 255))
    img = decode_rgb(png_bytes(la), "w")
    assert [img.getpixel((i, 0)) for i in range(2)] == [(255, 255, 255), (50, 50, 50)]
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 9, 99, 199] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    img = decode_rgb(png_bytes(p), "w")
    assert [img.getpixel((i, 0)) for i in range(2)] == [(255, 255, 255), (9, 99, 199)]
    gray = decode_rgb(png_bytes(Image.new("L", (1, 1), 77)), "w")
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)


def test_resize_center_crop_wide_image_takes_the_middle():
    arr = np.zeros((10, 40, 3), dtype=np.uint8)
    arr[:, :15] = (255, 0, 0)
    arr[:, 15:25] = (0, 255, 0)
    arr[:, 25:] = (0, 0, 255)
    crop, box = resize_center_crop(Image.fromarray(arr), 10)  # no resize needed: shorter side is 10
    assert crop.size == (10, 10) and box == (15, 0, 25, 10)
    assert np.array_equal(np.asarray(crop), np.full((10, 10, 3), (0, 255, 0), dtype=np.uint8))
    crop, box = resize_center_crop(Image.fromarray(arr), 8)  # 40x10 -> 32x8, centre 8
    assert crop.size == (8, 8) and box == (12, 0, 20, 8)
    crop, box = resize_center_crop(Image.fromarray(arr), 16)  # upscale: 64x16
    assert crop.size == (16, 16) and box == (24, 0, 40, 16)


def test_resize_center_crop_tall_and_tiny_images():
    crop, box = resize_center_crop(Image.new("RGB", (10, 40), (1, 2, 3)), 8)
    assert crop.size == (8, 8) and box == (0, 12, 8, 20)
    crop, box = resize_center_crop(Image.new("RGB", (1, 1), (9, 8, 7)), 16)
    assert crop.size == (16, 16) and box == (0, 0, 16, 16)
    assert np.array_equal(np.asarray(crop), np.full((16, 16, 3), (9, 8, 7), dtype=np.uint8))


# -- launch/make_shards.py ------------------------------------------------------------------------------

def test_make_shards_copies_images_and_captions(tmp_path):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(3)
    files = {
        "a.png": png_bytes(Image.fromarray(rng.integers(0, 255, (4, 6, 3), dtype=np.uint8))),
        "b.jpg": jpg_bytes(Image.fromarray(rng.integers(0, 255, (8, 5, 3), dtype=np.uint8))),
        "c.jpeg": jpg_bytes(Image.new("RGB", (3, 3), (0, 0, 200))),
        "sub/d.png": png_bytes(Image.new("RGBA", (2, 2), (0, 0, 0, 0))),
    }
    captions = {"a": b"a noisy picture\n", "b": b"caption b", "c": b"a blue square", "sub/d": b"nothing \xc3\xa9"}
    for name, data in files.items():
        (src / name).write_bytes(data)
    for stem, text in captions.items():
        (src / f"{stem}.txt").write_bytes(text)
    out = tmp_path / "out"
    proc = run_cmd([PY, "launch/make_shards.py", "--images", str(src), "--out", str(out), "--per-shard", "3"],
                   timeout=120)
    assert "read 4 items as folder: wrote 4 samples in 2 shards" in proc.stdout
    urls = expand_shards(str(out))
    assert urls == [str(out / "data-000000.tar"), str(out / "data-000001.tar")]
    got = read_all(urls)
    expected = [
        {"__key__": "000000000", "png": files["a.png"], "txt": b"a noisy picture", "json": b'{"name": "a.png"}'},
        {"__key__": "000000001", "jpg": files["b.jpg"], "txt": captions["b"], "json": b'{"name": "b.jpg"}'},
        {"__key__": "000000002", "jpg": files["c.jpeg"], "txt": captions["c"], "json": b'{"name": "c.jpeg"}'},
        {"__key__": "000000003", "png": files["sub/d.png"], "txt": captions["sub/d"],
         "json": b'{"name": "sub/d.png"}'},
    ]
    assert [{k: v for k, v in s.items() if k != "__url__"} for s in got] == expected
    sizes = [image_and_caption(s, 4)[2] for s in got]
    assert sizes == [(6, 4), (5, 8), (3, 3), (2, 2)]
    assert image_and_caption(got[3], 4)[1] == "nothing \u00e9"


def test_make_shards_image_without_caption_is_skipped_and_named(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes(Image.new("RGB", (2, 2))))
    (src / "a.txt").write_text("fine")
    (src / "b.jpg").write_bytes(jpg_bytes(Image.new("RGB", (2, 2))))
    out = tmp_path / "out"
    proc = run_cmd([PY, "launch/make_shards.py", "--images", str(src), "--out", str(out)], timeout=120)
    assert "wrote 1 samples in 1 shards, skipped 1" in proc.stdout
    assert "b.jpg: no caption file (.txt or .caption)" in proc.stdout
    assert [s["__key__"] for s in read_all(expand_shards(str(out)))] == ["000000000"]
    assert "b.jpg" in (out / "data-skipped.jsonl").read_text()
