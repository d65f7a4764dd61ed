"""The latent cache job protects data on disk (its input, a cache made with other settings),
and a cache survives bit rot: a damaged sample is quarantined alone, while a shard that lost
or reordered samples still stops the run."""
from __future__ import annotations

import json
import os
import shutil
import tarfile

import pytest
import torch
from safetensors.torch import load as st_load

from conftest import PY, run_cmd
from data_pipeline.latents import FORMAT_VERSION, check_sample, decode_sample, read_cached_shard
from data_pipeline.loader import ShardBatches, make_loader
from data_pipeline.quarantine import Quarantine
from data_pipeline.shards import ShardWriter, iter_samples
from data_pipeline.storage import DataError
from trainer.cache.manifest import Manifest
from trainer.cache.job import CacheJob, cache_latents
from trainer.core.config import ConfigError, load_config
from trainer.core.data import ImageData


# -- 2. out_url on top of the input -----------------------------------------------------------------------

@pytest.mark.parametrize("urls, out", [
    ("{d}", "{d}"),
    ("{d}", "{d}/"),
    ("{d}/", "file://{d}"),
    ("{d}/shapes-{{000000..000005}}.tar", "{d}"),
    ("{d}/*.tar", "{d}/./"),
    ("{d}/shapes-000000.tar,{d}/shapes-000001.tar", "{d}"),
    ("{d}", "{d}/latents"),  # inside a directory input: read back as input by the next run
    ("s3://bucket/images/{{0000..0009}}.tar", "s3a://bucket/images"),
    ("s3://bucket/images", "s3://bucket//images/latents/"),
])
def test_out_url_on_the_input_is_refused_in_config_validation(urls, out, tmp_path):
    d = str(tmp_path)
    with pytest.raises(ConfigError, match=r"is the input shards' folder .* \(data.urls\) or inside it"):
        load_config(CacheJob, None, [f"data.urls={urls.format(d=d)}", f"out_url={out.format(d=d)}",
                                     "vae=preset:tiny"])


@pytest.mark.parametrize("urls, out, endpoints", [
    ("{d}/images", "{d}/latents", []),
    ("{d}/images", "{d}", []),  # the input inside the output: outputs do not take its names
    ("s3://bucket/images", "s3://bucket/images-latents", []),
    ("s3://bucket/images", "s3://bucket/images", ["data.endpoint_url=http://a:1", "out_endpoint_url=http://b:2"]),
])
def test_out_url_apart_from_the_input_is_accepted(urls, out, endpoints, tmp_path):
    d = str(tmp_path)
    load_config(CacheJob, None, [f"data.urls={urls.format(d=d)}", f"out_url={out.format(d=d)}", "vae=preset:tiny",
                                 *endpoints])


def test_cache_into_its_input_folder_is_refused_before_anything_is_written(tiny_shards, tmp_path):
    """Before: the output shards took the input shards' names and replaced them."""
    images = tmp_path / "images"
    shutil.copytree(tiny_shards, images)
    before = {n: (images / n).read_bytes() for n in os.listdir(images)}
    proc = run_cmd([PY, "launch/cache_latents.py", "--dry-run", f"data.urls={images}", f"out_url={images}",
                    "vae=preset:tiny", "data.resolution=16"], check=False, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"error: out_url={images} is the input shards' folder {images} (data.urls) or "
                                   "inside it: the cache would overwrite or mix with its input (output shards take "
                                   "the input shards' names); choose an out_url outside it")
    with pytest.raises(ConfigError, match="is the input shards' folder"):  # called directly, not from a CLI
        cache_latents(CacheJob(data=ImageData(urls=str(images), resolution=16), out_url=str(images),
                               vae="preset:tiny", batch_size=16))
    assert {n: (images / n).read_bytes() for n in os.listdir(images)} == before


# -- 3. a rerun with other settings -----------------------------------------------------------------------

def _job(shards, out, **kw):
    data = ImageData(urls=f"{shards}/shapes-{{000000..000002}}.tar", resolution=kw.pop("resolution", 16),
                     num_workers=0)
    return CacheJob(data=data, out_url=str(out), vae="preset:tiny", batch_size=16, **kw)


@pytest.fixture(scope="module")
def small_cache(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "c"
    cache_latents(_job(tiny_shards, out))
    return out


@pytest.mark.parametrize("change, setting", [
    ({"flip": True}, "flip"), ({"text": "tokens"}, "text"), ({"resolution": 8}, "resolution"),
    ({"vae": "preset:vq_tiny"}, "vae"), ({"text_layer": "penultimate"}, "text_encoder"),
])
def test_rerun_with_other_settings_is_refused_naming_the_setting_and_the_shard(change, setting, small_cache,
                                                                               tiny_shards, tmp_path):
    """Before: the finished shards were skipped and the manifest rewritten with the new
    settings, so a cache of mixed shards passed the trainer's stale-cache check."""
    out = tmp_path / "c"
    shutil.copytree(small_cache, out)
    os.remove(out / "shapes-000002.tar")  # as if the first run was killed before its last shard
    os.remove(out / "shapes-000002.tar.json")
    manifest = (out / "manifest.json").read_bytes()
    vae = change.pop("vae", "preset:tiny")
    job = _job(tiny_shards, out, **change)
    job.vae = vae
    with pytest.raises(ConfigError, match=rf"the finished shard {out}/shapes-00000[01].tar was made with {setting}="):
        cache_latents(job)
    assert not (out / "shapes-000002.tar").exists() and (out / "manifest.json").read_bytes() == manifest


def test_rerun_with_the_same_settings_still_skips_and_a_record_without_settings_is_refused(small_cache, tiny_shards,
                                                                                          tmp_path):
    out = tmp_path / "c"
    shutil.copytree(small_cache, out)
    os.remove(out / "shapes-000002.tar")
    cache_latents(_job(tiny_shards, out))  # same settings: finishes the cache
    assert Manifest.read(str(out)).num_samples == 48
    sidecar = out / "shapes-000001.tar.json"
    entry = json.loads(sidecar.read_text())
    del entry["settings"]  # as an older version wrote it
    sidecar.write_text(json.dumps(entry))
    os.remove(out / "shapes-000000.tar.json")
    with pytest.raises(ConfigError, match="shapes-000001.tar records no settings"):
        cache_latents(_job(tiny_shards, out))


# -- 12. bit rot -----------------------------------------------------------------------------------------

def _member_offset(shard, member: str) -> int:
    """Where `member`'s bytes start in the tar file."""
    with tarfile.open(shard) as tar:
        return tar.getmember(member).offset_data


def _flip_in_tensor_data(shard, key: str) -> None:
    """Flip the lowest bit of one fp16 value of `key`'s tensors: the tar still parses and the
    tensors still load, only a value changed (what bit rot looks like)."""
    start = _member_offset(shard, f"{key}.safetensors")
    data = bytearray(shard.read_bytes())
    header = int.from_bytes(data[start:start + 8], "little")
    data[start + 8 + header + 10] ^= 0x01
    shard.write_bytes(bytes(data))


@pytest.fixture
def rotten_cache(tiny_cache, tmp_path):
    """A copy of tiny_cache with one byte flipped in one sample's tensors."""
    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache, copy)
    shard = copy / Manifest.read(str(copy)).shards[1].shard
    key = [s["__key__"] for s in iter_samples(str(shard))][5]
    _flip_in_tensor_data(shard, key)
    return copy, shard, key


def test_every_member_of_a_cached_sample_is_checked(tiny_cache):
    sample = next(iter_samples(os.path.join(tiny_cache, "shapes-000000.tar")))
    check_sample(sample)
    for member in ("safetensors", "txt", "json", "sha256"):
        damaged = dict(sample)
        damaged[member] = bytes([damaged[member][0] ^ 0x20]) + damaged[member][1:]
        with pytest.raises(DataError, match=f"latent sample .*shapes-000000.tar:{sample['__key__']} is corrupted"):
            decode_sample(damaged)
    moved = {**sample, "__key__": "99999999"}  # the right bytes under another key
    with pytest.raises(DataError, match="is corrupted"):
        check_sample(moved)
    del sample["sha256"]
    with pytest.raises(DataError, match="has no .sha256 member: rebuild the cache"):
        decode_sample(sample)


def test_a_flipped_byte_quarantines_that_sample_only_and_it_is_not_trained_on(rotten_cache, tmp_path):
    """Before: the sample was decoded and trained on, then the whole-shard sha256 stopped the
    run at the end of the shard."""
    cache, shard, key = rotten_cache
    manifest = Manifest.read(str(cache))
    damaged = [s for s in iter_samples(str(shard)) if s["__key__"] == key][0]
    bad_mean = st_load(damaged["safetensors"])["mean"]
    urls = [os.path.join(cache, s.shard) for s in manifest.shards]
    quarantine = Quarantine(str(tmp_path / "quarantine.jsonl"))
    dataset = ShardBatches(urls, decode_sample, 8, num_workers=0, counts=[s.count for s in manifest.shards],
                           quarantine=quarantine, checksums=[s.keys_sha256 for s in manifest.shards],
                           read_shard=read_cached_shard)
    batches = iter(make_loader(dataset))
    got = [next(batches) for _ in range(dataset.batches_per_epoch())]
    means = [b["mean"] for b in got]
    assert sum(int((b["loss_weight"] > 0).sum()) for b in got) == 96 - 1  # its place is filled, weighted 0
    assert not any(torch.equal(row, bad_mean) for m in means for row in m)
    rows = [json.loads(line) for line in open(tmp_path / "quarantine.jsonl")]
    assert len(rows) == 1 and rows[0]["url"] == str(shard) and rows[0]["key"] == key
    assert "is corrupted: its sha256 is" in rows[0]["error"]


def test_training_on_a_cache_with_a_flipped_byte_finishes_and_names_the_sample(rotten_cache, tmp_path):
    cache, shard, key = rotten_cache
    run = tmp_path / "run"
    run_cmd([PY, "launch/train_unet.py", f"run_dir={run}", f"data.urls={cache}", "model=tiny", "batch_per_rank=16",
             "total_samples=96", "log_every_samples=96", "data.num_workers=0"])
    rows = [json.loads(line) for line in open(run / "quarantine.jsonl")]
    assert [(r["url"], r["key"]) for r in rows] == [(str(shard), key)]


def _rewrite(shard, order) -> None:
    samples = list(iter_samples(str(shard)))
    with ShardWriter(str(shard)) as w:
        for i in order(len(samples)):
            w.write({k: v for k, v in samples[i].items() if k != "__url__"})


@pytest.mark.parametrize("damage", ["drop last sample", "swap two samples", "cut mid-sample"])
def test_a_shard_that_lost_or_reordered_samples_still_stops_the_run(damage, tiny_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache, copy)
    entry = Manifest.read(str(copy)).shards[2]
    shard = copy / entry.shard
    if damage == "drop last sample":  # a cut at a sample boundary reads as a clean end of tar
        _rewrite(shard, lambda n: range(n - 1))
    elif damage == "swap two samples":
        _rewrite(shard, lambda n: [1, 0, *range(2, n)])
    else:
        shard.write_bytes(shard.read_bytes()[:_member_offset(shard, "00000044.safetensors") + 100])
    quarantined = []
    samples = read_cached_shard(str(shard), on_error=lambda *a: quarantined.append(a), sha256=entry.keys_sha256)
    with pytest.raises(DataError, match=f"shard {shard} does not hold the samples the manifest records"):
        for s in samples:
            decode_sample(s)  # every sample that is there is intact


def test_a_cache_of_the_previous_format_is_refused_with_one_line(tiny_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION - 1}))
    with pytest.raises(DataError, match=f"has format_version {FORMAT_VERSION - 1}, this version reads "
                                        f"{FORMAT_VERSION}: rebuild the cache"):
        Manifest.read(str(copy))


# -- #27: the same place spelt another way, and an input that changed under its name ------------------------

def test_an_output_that_would_be_an_input_shard_is_refused_however_it_is_spelt(tiny_shards, tmp_path):
    """Through a link to an input shard, and through an input shard not named .tar: the cache would have
    written over its input. Refused before anything is written; the input is untouched."""
    real = tmp_path / "real"
    shutil.copytree(tiny_shards, real)
    name = sorted(os.listdir(real))[0]
    links = tmp_path / "links"
    links.mkdir()
    os.symlink(real / name, links / name)
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(real / name, plain / "shard0")
    before = (real / name).read_bytes()
    for urls, out, clash in ((str(links / name), real, links / name), (str(plain / "shard0"), plain, plain / "shard0")):
        with pytest.raises(ConfigError, match=f"would write over the input shard {clash}"):
            cache_latents(CacheJob(data=ImageData(urls=urls, resolution=16), out_url=str(out), vae="preset:tiny",
                                   batch_size=16))
    assert (real / name).read_bytes() == before and (plain / "shard0").read_bytes() == before
    assert sorted(os.listdir(real)) == sorted(os.listdir(tiny_shards))


def test_one_bucket_through_two_endpoints_is_one_place(s3_bucket, tiny_shards):
    """The same S3 server spelt 127.0.0.1 and localhost: the cache job refuses to write over its input."""
    import s3fs

    from trainer.cache.checks import output_over_input

    assert output_over_input("s3://b/images", "http://localhost:9000", "s3://b/images", "http://127.0.0.1:9000/")
    assert not output_over_input("s3://b/images", "http://127.0.0.1:9001", "s3://b/images", "http://127.0.0.1:9000")
    url, endpoint = s3_bucket
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    name = sorted(os.listdir(tiny_shards))[0]
    fs.put_file(os.path.join(tiny_shards, name), f"{url.removeprefix('s3://')}/images/{name}")
    before = fs.cat_file(f"{url.removeprefix('s3://')}/images/{name}")
    other = endpoint.replace("127.0.0.1", "localhost")
    with pytest.raises(ConfigError, match="is the input shards' folder"):
        load_config(CacheJob, None, [f"data.urls={url}/images/{name}", f"data.endpoint_url={endpoint}",
                                     f"out_url={url}/images", f"out_endpoint_url={other}", "vae=preset:tiny",
                                     "data.resolution=16"])
    assert fs.cat_file(f"{url.removeprefix('s3://')}/images/{name}") == before


def test_a_rerun_over_an_input_that_changed_under_the_same_name_caches_it_again(tiny_shards, tmp_path):
    """Before: the finished shard of the old input was skipped as done, and the manifest described data
    that was no longer there. Each shard records its input's identity (size, mtime or ETag)."""
    images = tmp_path / "images"
    shutil.copytree(tiny_shards, images)
    first, second = sorted(n for n in os.listdir(images) if n.endswith(".tar"))[:2]
    job = dict(data=ImageData(urls=f"{images / first},{images / second}", resolution=16, num_workers=0),
               out_url=str(tmp_path / "cache"), vae="preset:tiny", batch_size=16)
    cache_latents(CacheJob(**job))
    old = Manifest.read(str(tmp_path / "cache"))
    keys_before = {s.shard: s.keys_sha256 for s in old.shards}
    assert all(s.source_identity.startswith("size=") for s in old.shards)
    shutil.copy(images / second, images / first)  # other contents under the first shard's name
    cache_latents(CacheJob(**job))
    new = {s.shard: s for s in Manifest.read(str(tmp_path / "cache")).shards}
    assert new[first].keys_sha256 == keys_before[second] != keys_before[first]
    assert new[first].source_identity != {s.shard: s for s in old.shards}[first].source_identity


def test_a_small_dev_shm_never_loses_the_caches_work(tiny_shards, tmp_path):
    """#27: with Docker's 64 MB /dev/shm, workers' batches that did not fit were dropped and the job exited 0
    with shards missing. Here /dev/shm is 1 MB (a mount namespace of this test's own): the job decodes in the
    main process instead, says why, and caches everything."""
    import subprocess

    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.fail("this test needs unshare --mount (root), as the SLURM tests need network namespaces")
    out = tmp_path / "cache"
    script = (f"mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {PY} launch/cache_latents.py data.urls={tiny_shards} "
              f"data.resolution=64 out_url={out} vae=preset:tiny text_encoder=tiny batch_size=16 data.num_workers=2")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "note: /dev/shm has 1 MB free, 2 loader workers need about" in proc.stdout, proc.stdout[-2000:]
    assert Manifest.read(str(out)).num_samples == 96


def test_a_batch_lost_on_the_way_from_a_worker_stops_the_job(tiny_shards, tmp_path, monkeypatch):
    """However a batch goes missing between a loader worker and the encoder, the shard is never written short
    and the job does not end as if it were done."""
    from trainer.cache import job as cache_job

    real = cache_job.shard_images_loader

    def losing(dataset, workers):
        return (item for item in real(dataset, workers) if not (item["shard"] == 1 and item["index"] == 0))

    monkeypatch.setattr(cache_job, "shard_images_loader", losing)
    with pytest.raises(DataError, match=r"batch 0 of .*shapes-000001.tar never arrived from its loader worker "
                                        r"\(batch 1 did\); workers hand batches over through /dev/shm"):
        cache_latents(CacheJob(data=ImageData(urls=tiny_shards, resolution=16, num_workers=0), out_url=str(tmp_path / "c"),
                               vae="preset:tiny", batch_size=8))
    assert not (tmp_path / "c" / "shapes-000001.tar").exists() and not (tmp_path / "c" / "manifest.json").exists()

    def ending(dataset, workers):  # the loader stops early: the last shard's batches never come
        return (item for item in real(dataset, workers) if item["shard"] != 5)

    monkeypatch.setattr(cache_job, "shard_images_loader", ending)
    with pytest.raises(DataError, match=r"^1 of 5 input shards were not cached on rank 0 \(first: .*shapes-000005"
                                        r".tar\): their batches never arrived"):
        cache_latents(CacheJob(data=ImageData(urls=tiny_shards, resolution=16, num_workers=0), out_url=str(tmp_path / "c"),
                               vae="preset:tiny", batch_size=8))
    assert not (tmp_path / "c" / "manifest.json").exists()


@pytest.mark.parametrize("change, says", [
    ({"mean": torch.zeros(4, 2, 2), "std": torch.zeros(4, 2, 2)}, "holds mean of shape (4, 2, 2), the cache's latents "
                                                                  "are 4x4x4"),
    ({"text_emb": torch.zeros(77, 99)}, "holds text_emb of shape (77, 99), the cache's is"),
    ({"pooled": None}, "holds no pooled text embedding of width 32 (SDXL's)"),
])
def test_a_cached_sample_that_does_not_fit_the_manifest_is_quarantined(tiny_cache, tmp_path, change, says):
    """#27: a latent of another shape, a text embedding of another width, a missing pooled embedding: each a
    well-formed sample (its own sha256 right, its shard's keys in order) that crashed collation, on every
    rerun at the same place. Checked against the manifest, it is quarantined alone."""
    from data_pipeline.latents import CachedSampleDecoder, encode_sample

    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    manifest = Manifest.read(str(cache))
    bad = list(iter_samples(str(cache / manifest.shards[0].shard)))[3]["__key__"]
    pooled = {"pooled": torch.zeros(32)} if "pooled" in change else {}  # as if the cache were SDXL's
    for entry in manifest.shards if pooled else manifest.shards[:1]:
        samples = list(iter_samples(str(cache / entry.shard)))
        with ShardWriter(str(cache / entry.shard)) as w:
            for s in samples:
                tensors = {**st_load(s["safetensors"]), **pooled}
                if s["__key__"] == bad:
                    tensors = {k: v for k, v in {**tensors, **change}.items() if v is not None}
                w.write(encode_sample(s["__key__"], tensors, s["txt"].decode(), json.loads(s["json"])))
    expect = {"latent_shape": manifest.latent_shape, "text": manifest.text, "text_emb_shape": manifest.text_emb_shape,
              "pooled_dim": 32 if pooled else manifest.pooled_dim}
    quarantine = Quarantine(str(tmp_path / "quarantine.jsonl"))
    urls = [str(cache / s.shard) for s in manifest.shards]
    dataset = ShardBatches(urls, CachedSampleDecoder(False, 4, False, expect), 8, num_workers=0,
                           counts=[s.count for s in manifest.shards], quarantine=quarantine,
                           checksums=[s.keys_sha256 for s in manifest.shards], read_shard=read_cached_shard)
    batches = iter(make_loader(dataset))
    assert sum(int((next(batches)["loss_weight"] > 0).sum()) for _ in range(dataset.batches_per_epoch())) == 96 - 1
    rows = [json.loads(line) for line in open(tmp_path / "quarantine.jsonl")]
    assert len(rows) == 1 and rows[0]["key"] == bad and says in rows[0]["error"], rows
