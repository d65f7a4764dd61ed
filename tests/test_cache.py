"""The latent cache job: contents equal direct encoder calls, ranks split the work, reruns skip."""
import io
import json
import os

import pytest
import torch
from safetensors.torch import load as st_load

from conftest import PY, free_port, run_cmd
from data_pipeline.images import image_and_caption
from data_pipeline.shards import iter_samples
from data_pipeline.storage import expand_shards
from models.autoencoder import autoencoder_identity, load_autoencoder
from models.text_encoder import load_text_encoder
from trainer.cache import CacheJob, cache_latents, read_manifest
from trainer.autoencoder import ImageData


def test_cached_moments_and_embeddings_equal_direct_encoder_calls(tiny_shards, tiny_cache):
    manifest = read_manifest(tiny_cache)
    assert manifest["num_samples"] == 96 and [s["count"] for s in manifest["shards"]] == [16] * 6
    assert manifest["latent_shape"] == [4, 4, 4] and manifest["text_emb_shape"] == [32, 64]
    vae, te = load_autoencoder("preset:tiny"), load_text_encoder("tiny")
    assert manifest["vae"]["identity"] == autoencoder_identity(vae)
    assert manifest["text_encoder"]["identity"] == te.identity()

    source = {s["__key__"]: s for url in expand_shards(tiny_shards) for s in iter_samples(url)}
    cached = [s for url in expand_shards(tiny_cache) for s in iter_samples(url)]
    assert sorted(s["__key__"] for s in cached) == sorted(source)
    for s in cached[:40]:
        x, caption, size = image_and_caption(source[s["__key__"]], 16)
        posterior = vae.encode(x[None]).latent_dist
        t = st_load(s["safetensors"])
        assert t["mean"].dtype == torch.float16
        torch.testing.assert_close(t["mean"].float(), posterior.mean[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(t["std"].float(), posterior.std[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(t["text_emb"].float(), te.encode([caption])[0], atol=5e-3, rtol=2e-3)
        assert s["txt"].decode() == caption
        assert json.loads(s["json"])["original_size"] == [16, 16]


def test_two_ranks_write_the_same_cache_as_one(tiny_shards, tiny_cache, tmp_path):
    out = tmp_path / "two"
    run_cmd([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             "launch/cache_latents.py", f"data.urls={tiny_shards}", "data.resolution=16", f"out_url={out}",
             "vae=preset:tiny", "text_encoder=tiny", "batch_size=16"])
    one, two = read_manifest(tiny_cache), read_manifest(str(out))
    assert [(s["shard"], s["count"], s["sha256"]) for s in one["shards"]] == \
           [(s["shard"], s["count"], s["sha256"]) for s in two["shards"]]
    for s in one["shards"]:
        assert (out / s["shard"]).read_bytes() == open(os.path.join(tiny_cache, s["shard"]), "rb").read()


def test_rerun_skips_finished_shards_and_redoes_missing_ones(tiny_shards, tmp_path):
    cfg = CacheJob(data=ImageData(urls=tiny_shards, resolution=16), out_url=str(tmp_path / "c"),
                   vae="preset:tiny", batch_size=16)
    cache_latents(cfg)
    first = (tmp_path / "c" / "shapes-000002.tar").read_bytes()
    mtime = os.path.getmtime(tmp_path / "c" / "shapes-000000.tar")
    os.remove(tmp_path / "c" / "shapes-000002.tar")  # as if killed before this shard finished
    os.remove(tmp_path / "c" / "shapes-000002.tar.json")
    cache_latents(cfg)
    assert os.path.getmtime(tmp_path / "c" / "shapes-000000.tar") == mtime
    assert (tmp_path / "c" / "shapes-000002.tar").read_bytes() == first
    assert not [f for f in os.listdir(tmp_path / "c") if f.startswith(".tmp")]


def test_cache_from_s3_to_s3(tiny_shards, s3_bucket):
    import s3fs

    bucket, endpoint = s3_bucket
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    for name in sorted(os.listdir(tiny_shards))[:2]:
        fs.put_file(os.path.join(tiny_shards, name), f"{bucket[5:]}/images/{name}")
    cfg = CacheJob(data=ImageData(urls=f"{bucket}/images/shapes-{{000000..000001}}.tar", endpoint_url=endpoint,
                                  resolution=16),
                   out_url=f"{bucket}/latents", out_endpoint_url=endpoint, vae="preset:tiny", batch_size=16)
    cache_latents(cfg)
    manifest = read_manifest(f"{bucket}/latents", endpoint)
    assert manifest["num_samples"] == 32
    keys = [s["__key__"] for s in iter_samples(f"{bucket}/latents/shapes-000001.tar", endpoint)]
    assert keys == [f"{i:08d}" for i in range(16, 32)]


def test_missing_manifest_is_a_clear_error(tmp_path):
    from data_pipeline.storage import DataError

    with pytest.raises(DataError, match="manifest.json does not exist"):
        read_manifest(str(tmp_path))
