"""Hostile shards: formats outside the allow-list (EPS runs Ghostscript, JPEG 2000 is slow),
compressed tar bombs and oversized members, `./`-prefixed member names, and a batch whose
only sample is bad at batch_per_rank=1 on 2 ranks. Each is quarantined or refused in one
line, and the job goes on."""
import io
import json
import os
import subprocess
import tarfile
import textwrap
import zlib

import pytest
from PIL import EpsImagePlugin, Image

from conftest import PY, ROOT, run_cmd
from data_pipeline.images import DEFAULT_FORMATS, image_and_caption
from data_pipeline.loader import ShardBatches, make_loader
from data_pipeline.quarantine import Quarantine
from data_pipeline.shards import ShardWriter, iter_samples
from data_pipeline.storage import DataError
from trainer.core import config as config_lib
from trainer.autoencoder.job import AutoencoderJob
from trainer.core.data import ImageData

# A complete Encapsulated PostScript file: PIL identifies it as EPS and, on load, hands the
# PostScript to Ghostscript.
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n"
       b"0 0 1 setrgbcolor 0 0 16 16 rectfill\nshowpage\n%%EOF\n")


def png(color=(200, 30, 30), size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg2000() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buf, format="JPEG2000")
    return buf.getvalue()


def decode(sample):
    image_and_caption(sample, 8)
    return {"key": sample["__key__"]}


def keys_of(urls, qfile, batch=2, **kw):
    """Keys trained on (weight > 0) in one epoch through the loader (one rank, in shard order) and the
    quarantine entries."""
    ds = ShardBatches(urls, decode, batch, num_workers=0, shuffle=False, quarantine=Quarantine(str(qfile), 1.0), **kw)
    keys = []
    for b in make_loader(ds):
        if b["epoch"] > 0:
            break
        keys += [k for k, w in zip(b["key"], b["loss_weight"]) if w > 0]
    entries = [json.loads(line) for line in qfile.read_text().splitlines()] if qfile.exists() else []
    return keys, {e["key"]: e["error"] for e in entries}


# --- 8: only allowed formats are opened ------------------------------------------------------------


@pytest.fixture
def canary_gs(tmp_path, monkeypatch):
    """A `gs` first on PATH that records every start (and fails like a broken Ghostscript), so
    a test can tell whether PIL ran Ghostscript. PIL caches where gs is: that cache is reset."""
    bindir, marker = tmp_path / "bin", tmp_path / "gs-started"
    bindir.mkdir()
    (bindir / "gs").write_text(f'#!/bin/sh\necho "$@" >> {marker}\n[ "$1" = --version ] && exit 0\nexit 1\n')
    (bindir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return marker


def test_eps_and_jpeg2000_members_are_quarantined_naming_the_format_and_gs_never_runs(tmp_path, canary_gs):
    url = str(tmp_path / "x.tar")
    with ShardWriter(url) as w:
        w.write({"__key__": "k0", "png": png(), "txt": b"ok"})
        w.write({"__key__": "k1", "jpg": EPS, "txt": b"postscript in a .jpg"})
        w.write({"__key__": "k2", "png": jpeg2000(), "txt": b"jpeg 2000 in a .png"})
        w.write({"__key__": "k3", "png": png(), "txt": b"ok"})
    keys, quarantined = keys_of([url], tmp_path / "q.jsonl")
    assert keys == ["k0", "k3"]  # the job went on past both
    assert not canary_gs.exists(), f"Ghostscript was started: {canary_gs.read_text()}"
    assert quarantined["k1"] == f"image {url}:k1 is EPS, not an allowed format (JPEG, PNG, WEBP); " \
                                "data.image_formats opts into others"
    assert quarantined["k2"].startswith(f"image {url}:k2 is JPEG2000, not an allowed format")


def test_opted_in_format_decodes_and_garbage_still_names_the_sample():
    sample = {"__key__": "k", "__url__": "u.tar", "png": jpeg2000(), "txt": b"c"}
    with pytest.raises(DataError, match="is JPEG2000, not an allowed format"):
        image_and_caption(sample, 8)
    x, _, size = image_and_caption(sample, 8, formats=(*DEFAULT_FORMATS, "JPEG2000"))
    assert x.shape == (3, 8, 8) and size == (16, 16)
    with pytest.raises(DataError, match=r"^cannot decode image u.tar:k: not an image in a format PIL knows \(allowed: "):
        image_and_caption({**sample, "png": b"\x00" * 64}, 8)
    with pytest.raises(DataError, match=r"^cannot decode image u.tar:k: a damaged PNG \(PIL cannot read its header\)$"):
        image_and_caption({**sample, "png": png()[:30]}, 8)


def test_image_formats_config_is_checked_against_pil():
    cfg = config_lib.load_config(AutoencoderJob, None, ["data.urls=x", "data.image_formats=[jpeg, png, jpeg2000]"])
    assert cfg.data.image_formats == ["JPEG", "PNG", "JPEG2000"]
    assert cfg.data.decode_options()["formats"] == ("JPEG", "PNG", "JPEG2000")
    assert ImageData().image_formats == ["JPEG", "PNG", "WEBP"]
    with pytest.raises(config_lib.ConfigError, match=r"^data.image_formats: unknown image format 'BOGUS': PIL opens "):
        config_lib.load_config(AutoencoderJob, None, ["data.urls=x", "data.image_formats=[JPEG, BOGUS]"])
    with pytest.raises(config_lib.ConfigError, match=r"^data.max_member_mb must be > 0, got 0"):
        config_lib.load_config(AutoencoderJob, None, ["data.urls=x", "data.max_member_mb=0"])


# --- 9: compressed shards and oversized members ----------------------------------------------------

_MEASURE = textwrap.dedent("""
    import json, resource, sys
    from data_pipeline.shards import iter_samples
    from data_pipeline.storage import DataError
    url, limit = sys.argv[1], int(sys.argv[2])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    errors, keys = [], []
    try:
        for s in iter_samples(url, on_error=lambda u, k, m: errors.append([k, m]), max_member_bytes=limit):
            keys.append(s["__key__"])
    except DataError as e:
        errors.append([None, str(e)])
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"grew_mb": grew_mb, "errors": errors, "keys": keys}))
""")


def _read_in_subprocess(url: str, limit_bytes: int) -> dict:
    """Read a shard in a fresh process; how much its peak memory grew while reading (MB)."""
    out = subprocess.run([PY, "-c", _MEASURE, url, str(limit_bytes)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _zeros_member_tar(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def test_gzip_bomb_shard_is_refused_in_one_line_without_memory(tmp_path):
    """A 0.1 MB .tar(.gz) holding a 128 MB member: refused by its first bytes."""
    size = 128 * 2**20
    url = str(tmp_path / "bomb.tar")
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    with open(url, "wb") as f:
        f.write(z.compress(_zeros_member_tar("k0.jpg", size)))
        chunk = bytes(2**20)
        for _ in range(size // len(chunk)):
            f.write(z.compress(chunk))
        f.write(z.compress(bytes(1024 + 512)))  # end of archive
        f.write(z.flush())
    assert os.path.getsize(url) < 2**20
    got = _read_in_subprocess(url, 2**40)  # no member limit: only the compression rule can save memory
    assert got["keys"] == []
    assert got["errors"] == [[None, f"shard {url} is gzip-compressed: compressed shards are not read (a compressed "
                                    "shard can be a decompression bomb); store shards as plain .tar"]]
    assert got["grew_mb"] < 30, got


def test_oversized_member_is_skipped_unread_and_quarantined(tmp_path):
    url = str(tmp_path / "big.tar")
    with tarfile.open(url, "w") as tar:
        for name, data in (("k0.png", png()), ("k0.txt", b"ok"), ("k1.txt", b"huge")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("k1.png")
        info.size = 96 * 2**20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
        for name, data in (("k2.png", png()), ("k2.txt", b"ok")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = _read_in_subprocess(url, 2**20)
    assert got["keys"] == ["k0", "k2"]
    assert got["errors"] == [["k1", "member k1.png is 96.0 MB, more than max_member_mb=1; skipped unread"]]
    assert got["grew_mb"] < 30, got
    # Through the loader the sample is a quarantine entry like any other bad sample.
    keys, quarantined = keys_of([url], tmp_path / "q.jsonl", batch=1, max_member_bytes=2**20)
    assert keys == ["k0", "k2"] and quarantined["k1"].startswith("member k1.png is 96.0 MB")


# --- 10: member names -------------------------------------------------------------------------------


def _tar_of_dot_slash(folder, out) -> None:
    """What `cd folder && tar cf out ./*` writes: member names start with ./"""
    subprocess.run(f"tar cf {out} ./*", shell=True, cwd=folder, check=True)


def test_dot_slash_member_names_are_normalised_and_directories_quarantined(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    for i in range(2):
        (src / f"0000000{i}.png").write_bytes(png())
        (src / f"0000000{i}.txt").write_text("a red square")
    (src / "images" / "00000002.png").write_bytes(png())
    (src / "images" / "00000002.txt").write_text("in a folder")
    _tar_of_dot_slash(src, tmp_path / "x.tar")
    assert "./00000000.png" in tarfile.open(tmp_path / "x.tar").getnames()
    errors = []
    keys = [s["__key__"] for s in iter_samples(str(tmp_path / "x.tar"), on_error=lambda u, k, m: errors.append((k, m)))]
    assert keys == ["00000000", "00000001"]
    assert errors == [("images/00000002", "member name is not a plain key (a directory or '.' in it); write "
                                          "shards with plain member names like 000123.jpg")]


def test_cache_job_reads_a_dot_slash_tar_and_quarantines_what_stays_invalid(tmp_path):
    from trainer.cache.job import CacheJob, cache_latents

    src, shards = tmp_path / "src", tmp_path / "shards"
    (src / "sub").mkdir(parents=True)
    shards.mkdir()
    for i in range(3):
        (src / f"0000000{i}.png").write_bytes(png(size=16 + i))
        (src / f"0000000{i}.txt").write_text(f"image {i}")
    (src / "sub" / "00000009.png").write_bytes(png())
    (src / "sub" / "00000009.txt").write_text("in a folder")
    _tar_of_dot_slash(src, shards / "a.tar")
    out = tmp_path / "latents"
    cache_latents(CacheJob(data=ImageData(urls=str(shards), resolution=16, num_workers=0), out_url=str(out),
                           vae="preset:tiny", batch_size=2))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 3
    names = tarfile.open(out / "a.tar").getnames()
    assert {n.split(".")[0] for n in names} == {"00000000", "00000001", "00000002"}
    sidecar = json.loads((out / "a.tar.json").read_text())
    assert [q["key"] for q in sidecar["quarantined"]] == ["sub/00000009"]


# --- 11: an all-failed batch at batch 1 --------------------------------------------------------------


def _bad_image_set(root, n_shards=4, per_shard=4, bad=(1, 2)) -> tuple[list[str], list[int]]:
    """Shards of 16x16 PNGs; sample `bad` (shard, index) has a cut-off image."""
    root.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(n_shards):
        urls.append(str(root / f"s{s}.tar"))
        with ShardWriter(urls[-1]) as w:
            for i in range(per_shard):
                image = png((40 * s, 50 * i, 90))
                w.write({"__key__": f"s{s}i{i}", "png": image[:30] if (s, i) == bad else image, "txt": b"a square"})
    return urls, [per_shard] * n_shards


def _rank_keys(urls, counts, rank, qfile, positions=None, n=None):
    ds = ShardBatches(urls, decode, 1, rank=rank, world_size=2, num_workers=0, counts=counts, shuffle_buffer=3,
                      seed=5, quarantine=Quarantine(str(qfile), 1.0))
    loader = make_loader(ds)
    if positions is not None:
        loader.load_state_dict({"virtual_ranks": 2, "positions": positions})
    out = []
    for b in loader:
        out.append(b["key"][0] + ("(weight 0)" if "loss_weight" in b and float(b["loss_weight"][0]) == 0 else ""))
        if len(out) == (n or ds.batches_per_epoch(0)):
            return out, loader.state_dict()


def test_all_failed_batch_becomes_the_next_good_sample_on_every_rank_and_resumes_exactly(tmp_path):
    urls, counts = _bad_image_set(tmp_path / "shards")
    qfile = tmp_path / "q.jsonl"
    straight = [_rank_keys(urls, counts, r, qfile)[0] for r in range(2)]
    assert [len(k) for k in straight] == [8, 8]  # both ranks take every step of the epoch
    assert "s1i2" not in straight[0] + straight[1]
    assert json.loads(qfile.read_text())["key"] == "s1i2"
    # The stand-in is the stream's next good sample, which still comes out in its own turn too, weighing
    # nothing in the loss the first time (#27: it was trained on twice): each sample is trained on once.
    weighed = [[k for k in keys if not k.endswith("(weight 0)")] for keys in straight]
    stand_ins = [k[:-len("(weight 0)")] for keys in straight for k in keys if k.endswith("(weight 0)")]
    assert len(stand_ins) == 1 and stand_ins[0] in weighed[0] + weighed[1], straight
    assert sorted(len(k) for k in weighed) == [7, 8] and len(set(weighed[0] + weighed[1])) == 15, straight
    # A restart after any step sees what the uninterrupted run saw.
    for stop in range(1, 8):
        first = [_rank_keys(urls, counts, r, qfile, n=stop) for r in range(2)]
        assert first[0][1] == first[1][1]  # ranks agree on the state
        for r in range(2):
            rest, _ = _rank_keys(urls, counts, r, qfile, positions=first[r][1]["positions"], n=8 - stop)
            assert first[r][0] + rest == straight[r], (stop, r)


def test_two_ranks_at_batch_one_finish_past_a_bad_image(tmp_path):
    """A real 2-process training job at batch_per_rank=1 whose epoch contains a bad image."""
    urls, _ = _bad_image_set(tmp_path / "shards")
    run_dir = tmp_path / "run"
    torchrun = os.path.join(os.path.dirname(PY), "torchrun")
    out = run_cmd([torchrun, "--standalone", "--nproc_per_node", "2", "launch/train_autoencoder.py",
                   "--config", "configs/autoencoder/kl_gan.yaml", f"run_dir={run_dir}",
                   f"data.urls={tmp_path / 'shards'}", "data.resolution=16", "data.num_workers=0",
                   "batch_per_rank=1", "total_samples=16", "warmup_samples=4", "log_every_samples=4",
                   "checkpoint_every_samples=8", "scaling_samples=4", "disc_start_samples=4", "disc_layers=2",
                   "disc_channels=8", "disc_norm=group", "lpips_weights=random", "wandb=disabled", "preset=tiny"],
                  env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert "autoencoder exported to" in out.stdout
    entries = [json.loads(line) for line in (run_dir / "quarantine.jsonl").read_text().splitlines()]
    assert [e["key"] for e in entries] == ["s1i2"] and "cannot decode image" in entries[0]["error"]
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps[-1] == 8  # every step of the epoch was taken, on both ranks
