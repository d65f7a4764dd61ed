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
from trainer.cache.manifest import Manifest
from trainer.cache.job import CacheJob, cache_latents
from trainer.core.config import ConfigError
from trainer.core.data import ImageData


def test_cached_moments_and_embeddings_equal_direct_encoder_calls(tiny_shards, tiny_cache):
    manifest = Manifest.read(tiny_cache)
    assert manifest.num_samples == 96 and [s.count for s in manifest.shards] == [16] * 6
    assert manifest.latent_shape == (4, 4, 4) and manifest.text_emb_shape == (32, 64)
    vae, te = load_autoencoder("preset:tiny"), load_text_encoder("tiny")
    assert manifest.vae.identity == autoencoder_identity(vae)
    assert manifest.text_encoder.identity == te.identity()

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
        assert json.loads(s["json"]) == {"original_size": [16, 16], "crop_box": [0, 0, 16, 16], "target_size": [16, 16],
                                         "crop_top_left": [0, 0]}


def test_two_ranks_write_the_same_cache_as_one(tiny_shards, tiny_cache, tmp_path):
    out = tmp_path / "two"
    run_cmd([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             "launch/cache_latents.py", f"data.urls={tiny_shards}", "data.resolution=16", f"out_url={out}",
             "vae=preset:tiny", "text_encoder=tiny", "batch_size=16"])
    one, two = Manifest.read(tiny_cache), Manifest.read(str(out))
    assert [(s.shard, s.count, s.sha256) for s in one.shards] == [(s.shard, s.count, s.sha256) for s in two.shards]
    for s in one.shards:
        assert (out / s.shard).read_bytes() == open(os.path.join(tiny_cache, s.shard), "rb").read()


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
    assert not [f for f in os.listdir(tmp_path / "c") if f.endswith(".partial")]


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
    manifest = Manifest.read(f"{bucket}/latents", endpoint)
    assert manifest.num_samples == 32
    keys = [s["__key__"] for s in iter_samples(f"{bucket}/latents/shapes-000001.tar", endpoint)]
    assert keys == [f"{i:08d}" for i in range(16, 32)]


def test_missing_manifest_is_a_clear_error(tmp_path):
    from data_pipeline.storage import DataError

    with pytest.raises(DataError, match="manifest.json does not exist"):
        Manifest.read(str(tmp_path))


def test_manifest_has_per_channel_statistics_of_the_cached_latents(tiny_cache):
    manifest = Manifest.read(tiny_cache)
    means, stds = [], []
    for url in expand_shards(tiny_cache):
        for s in iter_samples(url):
            t = st_load(s["safetensors"])
            means.append(t["mean"].double())
            stds.append(t["std"].double())
    m, sd = torch.stack(means), torch.stack(stds)
    z_mean = m.mean(dim=(0, 2, 3))
    z_var = (m * m + sd * sd).mean(dim=(0, 2, 3)) - z_mean ** 2
    stats = manifest.latent_channel_stats
    torch.testing.assert_close(torch.tensor(stats.mean, dtype=torch.float64), z_mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(stats.std, dtype=torch.float64), z_var.sqrt(), atol=1e-4, rtol=1e-4)


def test_flip_caches_the_mirrored_images_moments(tiny_shards, tmp_path):
    cfg = CacheJob(data=ImageData(urls=tiny_shards, resolution=16, num_workers=0), out_url=str(tmp_path / "c"),
                   vae="preset:tiny", batch_size=16, flip=True)
    cache_latents(cfg)
    assert Manifest.read(str(tmp_path / "c")).flip is True
    vae = load_autoencoder("preset:tiny")
    source = {s["__key__"]: s for s in iter_samples(expand_shards(tiny_shards)[0])}
    for s in list(iter_samples(str(tmp_path / "c" / "shapes-000000.tar")))[:4]:
        x, _, _ = image_and_caption(source[s["__key__"]], 16)
        t = st_load(s["safetensors"])
        expected = vae.encode(torch.flip(x, dims=[2])[None]).latent_dist
        torch.testing.assert_close(t["mean_flip"].float(), expected.mean[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(t["std_flip"].float(), expected.std[0], atol=2e-3, rtol=2e-3)


def test_slices_of_an_array_job_make_the_same_cache(tiny_shards, tiny_cache, tmp_path):
    """SLURM array tasks each take a slice; the task that finishes the last writes the manifest."""
    out = tmp_path / "sliced"
    base = dict(data=ImageData(urls=tiny_shards, resolution=16), out_url=str(out), vae="preset:tiny", batch_size=16)
    cache_latents(CacheJob(**base, shard_slice="0:4"))
    assert not (out / "manifest.json").exists()
    before = sorted(os.listdir(out))
    # #27: a slice with other settings is refused before it writes anything (it wrote its shards, then refused)
    with pytest.raises(ConfigError, match=r"flip"):
        cache_latents(CacheJob(**base, shard_slice="4:", flip=True))
    assert sorted(os.listdir(out)) == before
    cache_latents(CacheJob(**base, shard_slice="4:"))
    for name in sorted(os.listdir(tiny_cache)):
        assert (out / name).read_bytes() == open(os.path.join(tiny_cache, name), "rb").read(), name


def test_kill_9_mid_shard_then_rerun_gives_a_byte_identical_cache(tmp_path):
    import signal
    import subprocess
    import time

    shards = tmp_path / "images"
    run_cmd([PY, "launch/make_synthetic.py", "--out", str(shards), "--num", "256", "--per-shard", "64",
             "--resolution", "64"])
    args = [PY, "launch/cache_latents.py", f"data.urls={shards}", "data.resolution=64", "data.num_workers=0",
            "vae=preset:demo", "batch_size=8"]
    run_cmd(args + [f"out_url={tmp_path / 'straight'}"])

    killed = tmp_path / "killed"
    proc = subprocess.Popen(args + [f"out_url={killed}"], cwd=os.path.dirname(os.path.dirname(__file__)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if killed.exists():
            # Kill once a shard is half written and at least one is finished before it.
            done = [f for f in os.listdir(killed) if f.endswith(".tar.json")]
            partial = [f for f in os.listdir(killed) if f.endswith(".partial")]
            if done and partial and os.path.getsize(killed / partial[0]) > 0:
                os.kill(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.002)
    proc.wait()
    assert partial, "the job finished before it could be killed mid-shard"
    name = partial[0][1:-len(".partial")]
    assert not (killed / name).exists(), "a partial shard is visible under its real name"
    assert not (killed / "manifest.json").exists()

    run_cmd(args + [f"out_url={killed}"])
    straight = sorted(f for f in os.listdir(tmp_path / "straight"))
    assert sorted(os.listdir(killed)) == straight  # no leftovers
    for f in straight:
        assert (killed / f).read_bytes() == (tmp_path / "straight" / f).read_bytes(), f


def test_a_changed_byte_in_a_cached_shard_is_refused(tiny_cache, tmp_path):
    import shutil

    from data_pipeline.storage import DataError

    copy = tmp_path / "copy"
    shutil.copytree(tiny_cache, copy)
    manifest = Manifest.read(str(copy))
    shard = copy / manifest.shards[1].shard
    data = bytearray(shard.read_bytes())
    data[3000] ^= 0x01  # inside a sample's payload: the tar still parses
    shard.write_bytes(bytes(data))
    samples = iter_samples(str(shard), sha256=manifest.shards[1].sha256)
    with pytest.raises(DataError, match=f"shard {shard} is corrupted: its sha256 is"):
        list(samples)
    intact = copy / manifest.shards[0].shard
    assert len(list(iter_samples(str(intact), sha256=manifest.shards[0].sha256))) == 16


class _HalfOverflowVAE(torch.nn.Module):
    """A stand-in encoder: in half precision sample 0 overflows to inf; sample 1 is inf in
    any precision. Everything else is a plain function of the input."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    @property
    def device(self):
        return self.w.device

    def encode(self, x):
        mean = x[:, :1, ::4, ::4].float() * self.w.float()
        std = torch.ones_like(mean)
        if self.w.dtype != torch.float32:
            mean[x[:, 0, 0, 0] > 0.9] = float("inf")
        mean[x[:, 0, 0, 0] < -0.9] = float("inf")
        latent_dist = type("D", (), {"mean": mean.to(self.w.dtype), "std": std.to(self.w.dtype)})
        return type("O", (), {"latent_dist": latent_dist})


def test_half_precision_overflow_is_reencoded_in_fp32_or_quarantined():
    from trainer.cache.encode import LatentEncoder

    x = torch.zeros(3, 3, 8, 8)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 1.0, -1.0  # sample 0 overflows in bf16 only; sample 1 always
    encoder = LatentEncoder(_HalfOverflowVAE().to(torch.bfloat16), torch.bfloat16)
    mean, std, ok = encoder(x)
    assert ok.tolist() == [True, False, True]
    assert encoder.rescued == 2
    assert torch.isfinite(mean[0]).all() and mean[0, 0, 0, 0] == 1.0  # the fp32 re-encode


def test_token_cache_trains_like_an_embedding_cache(tiny_shards, tiny_cache, tmp_path):
    """text=tokens stores the ids only; the trainer runs the frozen text encoder in the step
    and sees the same conditioning (up to the fp16 rounding of cached embeddings)."""
    from trainer.core.metrics import read_log

    tokens = tmp_path / "tokens"
    cache_latents(CacheJob(data=ImageData(urls=tiny_shards, resolution=16), out_url=str(tokens), vae="preset:tiny",
                           batch_size=16, text="tokens"))
    manifest = Manifest.read(str(tokens))
    assert manifest.text == "tokens"
    te = load_text_encoder("tiny")
    sample = next(iter_samples(str(tokens / "shapes-000000.tar")))
    t = st_load(sample["safetensors"])
    assert "text_emb" not in t and t["tokens"].dtype == torch.int32
    assert torch.equal(t["tokens"].long(), te.tokenize([sample["txt"].decode()])[0])
    assert os.path.getsize(tokens / "shapes-000000.tar") < os.path.getsize(os.path.join(tiny_cache, "shapes-000000.tar"))

    losses = []
    for cache in (tokens, tiny_cache):
        run = tmp_path / f"run-{os.path.basename(str(cache))}"
        run_cmd([PY, "launch/train_unet.py", f"run_dir={run}", f"data.urls={cache}", "model=tiny", "batch_per_rank=8",
                 "total_samples=24", "log_every_samples=8", "data.num_workers=0"])
        losses.append([r["loss"] for r in read_log(run / "log.jsonl")])
    assert len(losses[0]) == 3
    for a, b in zip(*losses):
        assert abs(a - b) < 2e-3 * max(1.0, abs(b)), losses


def test_two_ranks_over_s3_write_the_same_cache_as_one(tiny_shards, tiny_cache, s3_bucket):
    import s3fs

    bucket, endpoint = s3_bucket
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    for name in sorted(os.listdir(tiny_shards)):
        fs.put_file(os.path.join(tiny_shards, name), f"{bucket[5:]}/images/{name}")
    run_cmd([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             "launch/cache_latents.py", f"data.urls={bucket}/images", f"data.endpoint_url={endpoint}",
             "data.resolution=16", f"out_url={bucket}/latents", f"out_endpoint_url={endpoint}", "vae=preset:tiny",
             "text_encoder=tiny", "batch_size=16"])
    fs.invalidate_cache()
    two = Manifest.read(f"{bucket}/latents", endpoint)
    one = Manifest.read(tiny_cache)
    assert [(s.shard, s.count, s.sha256) for s in two.shards] == [(s.shard, s.count, s.sha256) for s in one.shards]
    assert fs.cat_file(f"{bucket[5:]}/latents/shapes-000003.tar") == \
        open(os.path.join(tiny_cache, "shapes-000003.tar"), "rb").read()


def test_a_stable_diffusion_vae_folder_works_as_the_frozen_vae(tmp_path):
    """The SD VAE architecture (f = 8, scaling 0.18215) saved in diffusers format, as a local copy
    of stabilityai/sd-vae-ft-mse is; random weights stand in for the real ones here."""
    from models.autoencoder import build_autoencoder

    build_autoencoder("sd").save_pretrained(tmp_path / "sd-vae")
    shards = tmp_path / "images"
    run_cmd([PY, "launch/make_synthetic.py", "--out", str(shards), "--num", "8", "--per-shard", "8",
             "--resolution", "64"])
    cache_latents(CacheJob(data=ImageData(urls=str(shards), resolution=64, num_workers=0),
                           out_url=str(tmp_path / "c"), vae=str(tmp_path / "sd-vae"), batch_size=8))
    manifest = Manifest.read(str(tmp_path / "c"))
    assert manifest.latent_shape == (4, 8, 8) and manifest.num_samples == 8
    assert manifest.vae.scaling_factor == 0.18215 and manifest.vae.downsample_factor == 8


def test_undecodable_images_are_quarantined_in_the_sidecar_not_written(tmp_path):
    from PIL import Image

    from data_pipeline.shards import write_shards

    def png():
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (10, 120, 200)).save(buf, format="PNG")
        return buf.getvalue()

    samples = [{"__key__": f"{i:04d}", "png": png() if i != 2 else b"not an image", "txt": b"a blue square"}
               for i in range(6)]
    write_shards(samples, str(tmp_path / "in"), per_shard=6)
    cache_latents(CacheJob(data=ImageData(urls=str(tmp_path / "in"), resolution=16), out_url=str(tmp_path / "c"),
                           vae="preset:tiny", batch_size=4))
    sidecar = json.load(open(tmp_path / "c" / "shard-000000.tar.json"))
    assert sidecar["count"] == 5 and [q["key"] for q in sidecar["quarantined"]] == ["0002"]
    assert "cannot decode image" in sidecar["quarantined"][0]["error"]
    assert Manifest.read(str(tmp_path / "c")).num_quarantined == 1
    keys = [s["__key__"] for s in iter_samples(str(tmp_path / "c" / "shard-000000.tar"))]
    assert keys == ["0000", "0001", "0003", "0004", "0005"]
