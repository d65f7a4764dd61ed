"""Precompute the latent cache: every image encoded once by the frozen VAE, every caption
once by the frozen text encoder, written as WebDataset shards with a manifest.

Each input shard maps to the output shard of the same name, and ranks take disjoint
input shards (shard i goes to rank i % world), so the job is idempotent: an output shard
that already exists (it only appears once complete) is skipped when the job is rerun.
Per sample the shard holds `KEY.safetensors` (posterior `mean` and `std` in fp16, the
caption's per-token `text_emb` in fp16), `KEY.txt` (the caption) and `KEY.json`
(original size). `manifest.json`, written last by rank 0, describes the whole cache.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import torch
from safetensors.torch import save as st_save
from tqdm import tqdm

from data_pipeline import storage
from data_pipeline.images import image_and_caption
from data_pipeline.shards import ShardWriter, iter_samples
from models.autoencoder import autoencoder_identity, downsample_factor, load_autoencoder
from models.text_encoder import load_text_encoder

from . import config as config_lib
from . import dist
from .data import ImageData

MANIFEST = "manifest.json"
EMPTY_CAPTION = "empty_caption.safetensors"
FORMAT_VERSION = 1


@dataclasses.dataclass
class CacheJob:
    data: ImageData = dataclasses.field(default_factory=ImageData)  # image shards in (resolution: crop size)
    out_url: str = ""  # where latent shards and manifest.json go (local path or s3://...)
    out_endpoint_url: str | None = None  # S3-compatible endpoint for out_url; default AWS_ENDPOINT_URL
    vae: str = ""  # diffusers AutoencoderKL folder, hub id, or preset:NAME (random, tests only)
    text_encoder: str = "tiny"  # tiny | tiny:FILE | OpenCLIP MODEL:PRETRAINED (e.g. ViT-H-14:laion2b_s32b_b79k)
    text_layer: str = "last"  # hidden states of the last or penultimate (SD 2.x) text layer
    batch_size: int = 64  # images per encoder call
    precision: str = "auto"  # auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16 for the encoders

    def validate(self) -> None:
        for key in ("out_url", "vae"):
            if not getattr(self, key):
                raise config_lib.ConfigError(f"{key} is empty: it is required")
        if not self.data.urls:
            raise config_lib.ConfigError("data.urls is empty: name the image shards to encode")


def _dtype(precision: str) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


@torch.no_grad()
def encode_batch(vae, text_encoder, images: torch.Tensor, captions: list[str]):
    """(mean, std, text_emb) for a batch, as fp32 on CPU."""
    dtype = next(vae.parameters()).dtype
    posterior = vae.encode(images.to(vae.device, dtype)).latent_dist
    emb = text_encoder.encode(captions)
    return (posterior.mean.float().cpu().contiguous(), posterior.std.float().cpu().contiguous(),
            emb.float().cpu().contiguous())


def _encode_shard(cfg: CacheJob, url: str, out: str, vae, text_encoder, bar) -> dict:
    """Encode one input shard into the output shard `out`; returns its manifest entry."""
    count = 0
    with ShardWriter(out, cfg.out_endpoint_url) as writer:
        pending = []

        def flush():
            nonlocal count
            images = torch.stack([p[1] for p in pending])
            mean, std, emb = encode_batch(vae, text_encoder, images, [p[2] for p in pending])
            for i, (key, _, caption, size) in enumerate(pending):
                tensors = {"mean": mean[i].half(), "std": std[i].half(), "text_emb": emb[i].half()}
                writer.write({"__key__": key, "safetensors": st_save(tensors), "txt": caption.encode(),
                              "json": json.dumps({"original_size": list(size)}).encode()})
            count += len(pending)
            bar.update(len(pending))
            pending.clear()

        for sample in iter_samples(url, cfg.data.endpoint_url):
            x, caption, size = image_and_caption(sample, **cfg.data.decode_options())
            pending.append((sample["__key__"], x, caption, size))
            if len(pending) == cfg.batch_size:
                flush()
        if pending:
            flush()
    return {"shard": os.path.basename(out), "count": count, "source": url}


def cache_latents(cfg: CacheJob) -> str:
    """Run the job on this rank; returns the manifest URL (written by rank 0)."""
    w = dist.world()
    if w.size > 1:
        dist.init()
    cfg.data.configure_storage()
    dtype = _dtype(cfg.precision)
    device = dist.device()

    # --- the frozen encoders ------------------------------------------------------------
    vae = load_autoencoder(cfg.vae).to(device)
    if dtype != torch.float32:
        vae.to(dtype)
    text_encoder = load_text_encoder(cfg.text_encoder, cfg.text_layer).to(device)
    factor = downsample_factor(vae)
    if cfg.data.resolution % factor:
        raise config_lib.ConfigError(f"data.resolution={cfg.data.resolution} is not a multiple of the "
                                     f"autoencoder's downsampling factor {factor}")

    # --- this rank's share of the input ---------------------------------------------------
    inputs = storage.expand_shards(cfg.data.urls, cfg.data.endpoint_url)
    names = [os.path.basename(u.split("://")[-1]) for u in inputs]
    if len(set(names)) != len(names):
        raise storage.DataError("input shards must have distinct file names: each maps to the output shard of that name")
    mine = list(range(w.rank, len(inputs), w.size))
    storage.makedirs(cfg.out_url, cfg.out_endpoint_url)

    entries, t0, written = [], time.time(), 0
    bar = tqdm(desc=f"caching (rank {w.rank})", unit="img", disable=not w.is_main)
    for i in mine:
        out = storage.join(cfg.out_url, names[i])
        sidecar = out + ".json"
        if storage.exists(sidecar, cfg.out_endpoint_url):  # done by an earlier run
            entries.append(json.loads(storage.read_bytes(sidecar, cfg.out_endpoint_url)))
            continue
        entry = _encode_shard(cfg, inputs[i], out, vae, text_encoder, bar)
        entry["sha256"] = _sha256(out, cfg.out_endpoint_url)
        storage.write_bytes_atomic(sidecar, json.dumps(entry).encode(), cfg.out_endpoint_url)
        entries.append(entry)
        written += entry["count"]
    bar.close()

    # --- manifest, written last -------------------------------------------------------------
    all_entries = sorted((e for part in dist.all_gather_objects(entries) for e in part), key=lambda e: e["shard"])
    manifest_url = storage.join(cfg.out_url, MANIFEST)
    if w.is_main:
        empty = text_encoder.encode([""])[0].float().cpu().half()
        storage.write_bytes_atomic(storage.join(cfg.out_url, EMPTY_CAPTION), st_save({"text_emb": empty}),
                                   cfg.out_endpoint_url)
        size = cfg.data.resolution // factor
        manifest = {
            "format_version": FORMAT_VERSION,
            "num_samples": sum(e["count"] for e in all_entries),
            "shards": all_entries,
            "resolution": cfg.data.resolution,
            "crop": "resize shorter side, centre crop",
            "latent_shape": [vae.config.latent_channels, size, size],
            "moments_dtype": "float16",
            "text_emb_shape": [text_encoder.context_length, text_encoder.width],
            "text_emb_dtype": "float16",
            "vae": {"source": os.path.abspath(cfg.vae) if os.path.isdir(cfg.vae) else cfg.vae,
                    "identity": autoencoder_identity(vae.float()),
                    "scaling_factor": float(vae.config.scaling_factor),
                    "downsample_factor": factor},
            "text_encoder": {"spec": cfg.text_encoder, "layer": cfg.text_layer,
                             "identity": text_encoder.identity()},
        }
        storage.write_bytes_atomic(manifest_url, json.dumps(manifest, indent=1).encode(), cfg.out_endpoint_url)
        rate = written / max(1e-9, time.time() - t0)
        print(f"cached {manifest['num_samples']} samples in {len(all_entries)} shards at {cfg.out_url} "
              f"({written} encoded now on rank 0 at {rate:.0f} img/s)")
    dist.barrier()
    return manifest_url


def _sha256(url: str, endpoint_url: str | None) -> str:
    h = hashlib.sha256()
    with storage.open_url(url, "rb", endpoint_url) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(cache_url: str, endpoint_url: str | None = None) -> dict:
    url = storage.join(cache_url, MANIFEST)
    if not storage.exists(url, endpoint_url):
        raise storage.DataError(f"{url} does not exist: is {cache_url} a finished latent cache? "
                                "(run launch/cache_latents.py; the manifest is written last)")
    manifest = json.loads(storage.read_bytes(url, endpoint_url))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise storage.DataError(f"{url} has format_version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    return manifest
