"""The cache manifest as a typed object (trainer/cache/manifest.py): the file format is the one
the cache job has always written (existing caches keep loading, `to_json` gives their bytes back),
and a hostile manifest is a one-line DataError naming the file and the key."""
from __future__ import annotations

import json
import re

import pytest
import torch

from data_pipeline.latents import FORMAT_VERSION
from data_pipeline.storage import DataError
from models.text_encoder import load_text_encoder
from trainer.cache.job import CacheJob, cache_latents
from trainer.cache.manifest import CacheExpect, Manifest
from trainer.core.config import ConfigError
from trainer.core.data import ImageData

# A manifest.json exactly as the cache job wrote it before the Manifest type (commit c413770, the
# dict-literal writer; 32 images of 16 px, preset:tiny, the tiny text encoder), input paths renamed.
OLD_FILE = """\
{
 "format_version": 3,
 "num_samples": 32,
 "num_quarantined": 0,
 "shards": [
  {
   "shard": "shapes-000000.tar",
   "count": 16,
   "sha256": "60f709b16f518040f9c9736054bb5ed8a721e2dd05e4da247216ac686009904f",
   "keys_sha256": "4553f277240074c4a9ee9266071d99ea9d32d6c47f074e448b48b71a11eea5a4",
   "source": "/data/images/shapes-000000.tar"
  },
  {
   "shard": "shapes-000001.tar",
   "count": 16,
   "sha256": "27f33d62a763f652aae1c03cf8ef5ca40de597697973986934746830cdad3dd5",
   "keys_sha256": "8e2a4cbd5d09baf3ec29494a41a0e66b756f568ce3552b585ab0e87fa5a7a11d",
   "source": "/data/images/shapes-000001.tar"
  }
 ],
 "resolution": 16,
 "crop": "resize to cover, centre crop",
 "flip": false,
 "latent_shape": [
  4,
  4,
  4
 ],
 "moments_dtype": "float16",
 "text_emb_shape": [
  32,
  64
 ],
 "text_emb_dtype": "float16",
 "text": "embeddings",
 "latent_channel_stats": {
  "mean": [
   -0.10333610863017384,
   0.3959490592533257,
   0.16977101645898074,
   -0.4035432398086414
  ],
  "std": [
   1.0117717719375996,
   1.198275085711343,
   1.2192777172592197,
   1.1943483779625088
  ]
 },
 "vae": {
  "source": "preset:tiny",
  "identity": "871580c1649d977f",
  "scaling_factor": 0.18215,
  "downsample_factor": 4
 },
 "text_encoder": {
  "spec": "tiny",
  "layer": "last",
  "identity": "7d0c4bd61f9be8b2"
 }
}"""

# The file format: the top-level keys and their order.
KEYS = ["format_version", "num_samples", "num_quarantined", "shards", "resolution", "crop", "flip", "latent_shape",
        "moments_dtype", "text_emb_shape", "text_emb_dtype", "text", "latent_channel_stats", "vae", "text_encoder"]


def _write(folder, text: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(text)
    return str(folder)


def test_a_manifest_written_before_the_type_reads_back_and_writes_the_same_bytes(tmp_path):
    manifest = Manifest.read(_write(tmp_path / "c", OLD_FILE))
    assert manifest.to_json() == OLD_FILE
    assert manifest.num_samples == 32 and [s.count for s in manifest.shards] == [16, 16]
    assert manifest.latent_shape == (4, 4, 4) and manifest.text_emb_shape == (32, 64) and manifest.flip is False
    assert manifest.vae.scaling_factor == 0.18215 and manifest.vae.downsample_factor == 4
    assert manifest.text_encoder.spec == "tiny" and len(manifest.latent_channel_stats.std) == 4
    assert manifest.shard_urls(str(tmp_path / "c")) == [str(tmp_path / "c" / f"shapes-00000{i}.tar") for i in (0, 1)]


def test_a_real_cache_round_trips(tiny_shards, tmp_path):
    """flip and text=tokens: the non-default values of the fields travel too."""
    out = tmp_path / "c"
    cache_latents(CacheJob(data=ImageData(urls=tiny_shards, resolution=16, num_workers=0), out_url=str(out),
                           vae="preset:tiny", batch_size=32, flip=True, text="tokens"))
    text = (out / "manifest.json").read_text()
    manifest = Manifest.read(str(out))
    assert manifest.to_json() == text
    assert Manifest.parse(manifest.to_json(), "again") == manifest
    assert list(json.loads(text)) == KEYS
    assert manifest.flip is True and manifest.text == "tokens" and manifest.num_samples == 96
    assert manifest.format_version == FORMAT_VERSION and len(manifest.shards) == 6


def _set(raw: dict, key: str, value) -> None:
    """Set (or, with value DELETE, remove) `key`, dotted, [i] for list items."""
    *path, last = key.replace("[", ".").replace("]", "").split(".")
    node = raw
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is DELETE:
        del node[int(last) if isinstance(node, list) else last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


DELETE = object()
HOSTILE = [  # (key, value, what the error says)
    ("latent_shape", DELETE, "key 'latent_shape' is missing"),
    ("vae.identity", DELETE, "key 'vae.identity' is missing"),
    ("shards[1].keys_sha256", DELETE, "key 'shards[1].keys_sha256' is missing"),
    ("latent_shape", "4,4,4", "key 'latent_shape' must be a list of 3 integers, got '4,4,4'"),
    ("latent_shape", [4, 4], "key 'latent_shape' must be a list of 3 integers"),
    ("latent_shape", [4, 4, "4"], "key 'latent_shape[2]' must be an integer"),
    ("latent_shape", [4, 0, 4], "key 'latent_shape' must be positive"),
    ("latent_shape", [4, 100000, 100000], "key 'latent_shape' is (4, 100000, 100000), past the largest this trainer "
                                          "accepts (16384)"),  # #27: sized allocations of 64-128 GB
    ("latent_shape", [4, 8, 8], "key 'latent_shape' is (4, 8, 8): resolution 16 at downsample factor 4 makes latents "
                                "of 4x4"),
    ("text_emb_shape", [77, 10 ** 9], "key 'text_emb_shape' is (77, 1000000000), past the largest"),
    ("resolution", 10 ** 6, "key 'resolution' is 1000000, past the largest this trainer accepts (16384)"),
    ("text_emb_shape", [32, 64.5], "key 'text_emb_shape[1]' must be an integer"),
    ("num_samples", True, "key 'num_samples' must be an integer, got True"),
    ("num_samples", -32, "key 'num_samples' must be >= 0"),
    ("num_samples", 33, "key 'num_samples' is 33, its shards' counts add up to 32"),
    ("shards[1].count", -16, "key 'shards[1].count' must be >= 0, got -16"),
    ("shards", "shapes-000000.tar", "key 'shards' must be a list of objects"),
    ("shards[0]", 16, "key 'shards[0]' must be an object, got 16"),
    ("shards[0].shard", "../../elsewhere/x.tar", "key 'shards[0].shard' must be a file name inside the cache"),
    ("shards[0].shard", "shapes-000001.tar", "key 'shards[1].shard' names 'shapes-000001.tar' twice"),
    ("shards[0].sha256", "abc", "key 'shards[0].sha256' must be 64 hex digits"),
    ("flip", "yes", "key 'flip' must be true or false, got 'yes'"),
    ("text", "pixels", "key 'text' must be embeddings or tokens"),
    ("vae", "preset:tiny", "key 'vae' must be an object"),
    ("vae.scaling_factor", "0.18215", "key 'vae.scaling_factor' must be a finite number"),
    ("vae.scaling_factor", float("nan"), "key 'vae.scaling_factor' must be a finite number, got nan"),
    ("vae.scaling_factor", -1.0, "key 'vae.scaling_factor' must be positive"),
    ("text_encoder.spec", ["tiny"], "key 'text_encoder.spec' must be a string"),
    ("latent_channel_stats.mean", [0.0, 0.0, 0.0], "key 'latent_channel_stats' must hold 4 means and stds"),
    ("latent_channel_stats.std", [1.0, -1.0, 1.0, 1.0], "key 'latent_channel_stats.std' must be >= 0"),
    ("extra", 1, "unknown key 'extra'"),
    ("vae.folder", "vae", "unknown key 'vae.folder'"),
    ("format_version", FORMAT_VERSION - 1, f"has format_version {FORMAT_VERSION - 1}, this version reads {FORMAT_VERSION}"),
    ("format_version", str(FORMAT_VERSION), f"has format_version '{FORMAT_VERSION}', this version reads"),
    ("format_version", DELETE, "has format_version None, this version reads"),
]


@pytest.mark.parametrize("key, value, message", HOSTILE, ids=[f"{k}={v!r:.20}" for k, v, _ in HOSTILE])
def test_a_hostile_manifest_is_one_line_naming_the_file_and_the_key(key, value, message, tmp_path):
    raw = json.loads(OLD_FILE)
    _set(raw, key, value)
    cache = _write(tmp_path / "c", json.dumps(raw, indent=1))
    with pytest.raises(DataError, match=re.escape(message)) as e:
        Manifest.read(cache)
    assert str(e.value).startswith(str(tmp_path / "c" / "manifest.json")) and "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", [("", "is not valid JSON"), ("{\"format_version\": 3,", "is not valid JSON"),
                                           ("[" * 100_000, "is not valid JSON"), ("[3]", "must hold a JSON object"),
                                           ("\udcff", "is not valid JSON")])
def test_a_manifest_that_is_not_a_json_object_is_one_line(text, message, tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "manifest.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(DataError, match=message) as e:
        Manifest.read(str(folder))
    assert "\n" not in str(e.value)


def test_latent_affine_is_the_vae_factor_or_the_cache_statistics(tmp_path):
    manifest = Manifest.read(_write(tmp_path / "c", OLD_FILE))
    shift, scale = manifest.latent_affine("scaling_factor")
    assert shift.shape == scale.shape == (4, 1, 1)
    assert torch.equal(shift, torch.zeros(4, 1, 1)) and torch.allclose(scale, torch.full((4, 1, 1), 0.18215))
    shift, scale = manifest.latent_affine("per_channel")
    stats = manifest.latent_channel_stats
    assert torch.allclose(shift.flatten(), torch.tensor(stats.mean)) and torch.allclose(1 / scale.flatten(), torch.tensor(stats.std))
    with pytest.raises(ValueError, match="latent_norm must be scaling_factor or per_channel"):
        manifest.latent_affine("none")
    raw = json.loads(OLD_FILE)
    raw.update(num_samples=0, shards=[], latent_channel_stats={"mean": [], "std": []})
    empty = Manifest.read(_write(tmp_path / "empty", json.dumps(raw)))
    with pytest.raises(DataError, match="per_channel needs the cache's latent_channel_stats"):
        empty.latent_affine("per_channel")


def test_a_cache_from_other_encoders_is_refused(tmp_path):
    manifest = Manifest.read(_write(tmp_path / "c", OLD_FILE))
    have = manifest.check_expected("CACHE", CacheExpect(vae="871580c1649d977f", resolution=16), None)
    assert have == {"vae": "871580c1649d977f", "text_encoder": "7d0c4bd61f9be8b2", "resolution": 16}
    with pytest.raises(DataError, match="the cache CACHE has text_encoder '7d0c4bd61f9be8b2', the config expects 'x'"):
        manifest.check_expected("CACHE", CacheExpect(text_encoder="x"), None)
    with pytest.raises(DataError, match="the checkpoint was trained on a cache with resolution 32; CACHE has 16"):
        manifest.check_expected("CACHE", CacheExpect(), {**have, "resolution": 32})


def test_the_text_encoder_is_checked_against_its_record(tmp_path):
    manifest = Manifest.read(_write(tmp_path / "c", OLD_FILE.replace("7d0c4bd61f9be8b2", load_text_encoder("tiny").identity())))
    assert manifest.text_encoder.load().identity() == manifest.text_encoder.identity
    other = Manifest.read(_write(tmp_path / "d", OLD_FILE.replace("7d0c4bd61f9be8b2", "0" * 16)))
    with pytest.raises(ConfigError, match="text encoder tiny is not the one the cache was made with"):
        other.text_encoder.load()
