"""The latent cache format: what one cached sample holds, and the manifest that describes a cache.

Per sample, `KEY.safetensors` holds the frozen VAE's posterior `mean` and `std` (fp16; with
`flip`, also `mean_flip`/`std_flip` of the mirrored image) and the caption's per-token
`text_emb` (fp16) or, with `text=tokens`, only its token ids `tokens` (int32); `KEY.txt` the
caption; `KEY.json` the original size and crop box; `KEY.sha256` the digest of the key and
the other members (`sample_digest`), checked before the sample is used. Per shard,
`SHARD.tar.json` (written after the shard) holds its count, sha256, the digest of its keys in
order (`keys_sha256`), the settings it was made with, quarantined keys and latent
statistics. `manifest.json`, written last, describes the whole cache.

Bit rot in a huge cache is expected, and is handled at the level it damages: a changed byte
inside a sample fails that sample's digest, and the sample is quarantined (never trained
on) while the run goes on; a shard that lost, gained or reordered samples fails the keys
check at the end of the shard (`read_cached_shard`), which stops the run naming the shard.
"""
from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import storage
from .shards import iter_samples
from .storage import DataError

MANIFEST = "manifest.json"
EMPTY_CAPTION = "empty_caption.safetensors"
FORMAT_VERSION = 3  # 3: per-sample digests (KEY.sha256) and per-shard keys_sha256


def sample_digest(sample: dict) -> str:
    """sha256 of a sample's key and members (all but `sha256` and `__*__`), in sorted order.

    The key is hashed too, so a sample's bytes moved under another key fail the check; each
    member is framed by its name and length, so bytes cannot slide from one into the next.
    """
    h = hashlib.sha256(sample["__key__"].encode() + b"\0")
    for ext in sorted(k for k in sample if not k.startswith("__") and k != "sha256"):
        h.update(f"{ext}\0{len(sample[ext])}\0".encode())
        h.update(sample[ext])
    return h.hexdigest()


def encode_sample(key: str, tensors: dict[str, torch.Tensor], caption: str, meta: dict) -> dict:
    """A WebDataset sample (bytes per field) from fp16 tensors, caption and metadata."""
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    sample = {"__key__": key, "safetensors": st_save(tensors),
              "txt": caption.encode(), "json": json.dumps(meta, sort_keys=True).encode()}
    sample["sha256"] = sample_digest(sample).encode()
    return sample


def check_sample(sample: dict) -> None:
    """A DataError naming the sample when its bytes are not the ones it was written with."""
    where = f"{sample.get('__url__')}:{sample.get('__key__')}"
    if "sha256" not in sample:
        raise DataError(f"latent sample {where} has no .sha256 member: rebuild the cache with launch/cache_latents.py")
    want = bytes(sample["sha256"]).decode("ascii", "replace").strip()
    got = sample_digest(sample)
    if got != want:
        raise DataError(f"latent sample {where} is corrupted: its sha256 is {got[:16]}..., the sample records "
                        f"{want[:16]}...")


def decode_sample(sample: dict) -> dict:
    """The tensors of a cached sample, checked first; a damaged one is a DataError naming it."""
    where = f"{sample.get('__url__')}:{sample.get('__key__')}"
    check_sample(sample)
    if "safetensors" not in sample:
        raise DataError(f"latent sample {where} has no .safetensors")
    try:
        return st_load(sample["safetensors"])
    except Exception as e:  # safetensors raises its own error type for damaged bytes
        raise DataError(f"latent sample {where} is damaged: {e}") from None


def keys_digest(keys) -> str:
    """sha256 of a shard's sample keys in order: what the shard-level check compares."""
    h = hashlib.sha256()
    for key in keys:
        h.update(key.encode() + b"\n")
    return h.hexdigest()


def read_cached_shard(url: str, endpoint_url: str | None = None, on_error=None, sha256: str | None = None,
                      **options):
    """The samples of a cache shard (`iter_samples`, given `options`), with the shard-level
    check: at the end, the keys read, in order, must hash to `sha256`, the manifest's
    `keys_sha256` (the loader passes every shard's check value as `sha256=`). This is what catches a
    truncated shard (also one cut at a sample boundary, which tar reads as a clean end) and
    reordered or foreign samples; a DataError naming the shard stops the run then.

    Damage inside a sample changes no key and so passes here: `decode_sample` finds it and
    the loader quarantines that sample alone. (The whole-file sha256 cannot tell the two
    apart: one flipped byte anywhere mismatches it, and only once the shard has been read.)
    """
    keys = []

    def report(u, key, message):  # samples dropped by the tar reader still count in the order
        if key is not None:
            keys.append(key)
        if on_error is None:
            raise DataError(f"shard {u}: sample {key}: {message}" if key else f"shard {u}: {message}")
        on_error(u, key, message)

    for sample in iter_samples(url, endpoint_url, on_error=report, **options):
        keys.append(sample["__key__"])
        yield sample
    if sha256 is not None and keys_digest(keys) != sha256:
        raise DataError(f"shard {url} does not hold the samples the manifest records ({len(keys)} read): it was "
                        "truncated, reordered or replaced after it was written; rebuild it with "
                        "launch/cache_latents.py (delete it and its .json sidecar, then rerun the cache job)")


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
