"""The latent cache format: what one cached sample holds, and the manifest that describes a cache.

Per sample, `KEY.safetensors` holds the frozen VAE's posterior `mean` and `std` (fp16; with
`flip`, also `mean_flip`/`std_flip` of the mirrored image) and the caption's per-token
`text_emb` (fp16) or, with `text=tokens`, only its token ids `tokens` (int32); `KEY.txt` the caption; `KEY.json` the original size and crop box. Per shard,
`SHARD.tar.json` (written after the shard) holds its count, sha256, quarantined keys and
latent statistics. `manifest.json`, written last, describes the whole cache.
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import storage
from .storage import DataError

MANIFEST = "manifest.json"
EMPTY_CAPTION = "empty_caption.safetensors"
FORMAT_VERSION = 2


def encode_sample(key: str, tensors: dict[str, torch.Tensor], caption: str, meta: dict) -> dict:
    """A WebDataset sample (bytes per field) from fp16 tensors, caption and metadata."""
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    return {"__key__": key, "safetensors": st_save(tensors),
            "txt": caption.encode(), "json": json.dumps(meta, sort_keys=True).encode()}


def decode_sample(sample: dict) -> dict:
    """The tensors of a cached sample; a damaged one is a DataError naming it."""
    where = f"{sample.get('__url__')}:{sample.get('__key__')}"
    if "safetensors" not in sample:
        raise DataError(f"latent sample {where} has no .safetensors")
    try:
        return st_load(sample["safetensors"])
    except Exception as e:  # safetensors raises its own error type for damaged bytes
        raise DataError(f"latent sample {where} is damaged: {e}") from None


class ChannelStats:
    """Per-channel mean and std of z ~ N(mean, std^2) over a cache, from sums that add up
    across shards: E[z] = E[mean], E[z^2] = E[mean^2 + std^2]."""

    def __init__(self, channels: int):
        self.n, self.sum, self.sumsq = 0, torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)

    def add(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """mean, std: [B, C, H, W]."""
        m, s = mean.double(), std.double()
        self.n += m.shape[0] * m.shape[2] * m.shape[3]
        self.sum += m.sum(dim=(0, 2, 3))
        self.sumsq += (m * m + s * s).sum(dim=(0, 2, 3))

    def to_json(self) -> dict:
        return {"n": self.n, "sum": self.sum.tolist(), "sumsq": self.sumsq.tolist()}

    @staticmethod
    def combine(parts: list[dict]) -> dict:
        """{"mean": [...], "std": [...]} per channel from shards' to_json() parts."""
        n = sum(p["n"] for p in parts)
        if n == 0:
            return {"mean": [], "std": []}
        total = torch.tensor([p["sum"] for p in parts], dtype=torch.float64).sum(0)
        totalsq = torch.tensor([p["sumsq"] for p in parts], dtype=torch.float64).sum(0)
        mean = total / n
        return {"mean": mean.tolist(), "std": (totalsq / n - mean * mean).clamp_min(0).sqrt().tolist()}


def latent_affine(manifest: dict, latent_norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) per channel, [C, 1, 1]: the model sees (z - shift) * scale.

    `scaling_factor`: the VAE's single factor (Stable Diffusion's convention). `per_channel`:
    each channel to zero mean and unit variance with the statistics measured over the cache
    (EDM2 normalises its latents per channel the same way).
    """
    channels = manifest["latent_shape"][0]
    if latent_norm == "scaling_factor":
        return torch.zeros(channels, 1, 1), torch.full((channels, 1, 1), float(manifest["vae"]["scaling_factor"]))
    if latent_norm == "per_channel":
        stats = manifest["latent_channel_stats"]
        return (torch.tensor(stats["mean"]).view(-1, 1, 1).float(),
                1.0 / torch.tensor(stats["std"]).view(-1, 1, 1).float())
    raise ValueError(f"latent_norm must be scaling_factor or per_channel, got {latent_norm!r}")


def read_manifest(cache_url: str, endpoint_url: str | None = None) -> dict:
    url = storage.join(cache_url, MANIFEST)
    if not storage.exists(url, endpoint_url):
        raise DataError(f"{url} does not exist: is {cache_url} a finished latent cache? "
                        "(run launch/cache_latents.py; the manifest is written last)")
    manifest = json.loads(storage.read_bytes(url, endpoint_url))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{url} has format_version {manifest.get('format_version')}, this version reads "
                        f"{FORMAT_VERSION}: rebuild the cache with launch/cache_latents.py")
    return manifest
