"""The latent cache's manifest: the contract between the cache job and everything that reads a
cache (the UNet job, sampling, export, the lab, the benchmarks).

`manifest.json` is written last by the cache job (`Manifest.to_json`, the one writer) and read
through `Manifest.read` (the one reader). A manifest comes from storage that anyone may have
edited, so `read` checks every key and type before a reader sees it: a missing key, a wrong
type, an unknown key, a negative count or another format version is a one-line DataError
naming the file and the key, never a KeyError deep inside a job. The file format is
unchanged by this module: `to_json()` of a manifest read from a file gives the file's bytes.
The per-sample format (and its FORMAT_VERSION) is data_pipeline/latents.py's.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import typing

import torch

from data_pipeline import storage
from data_pipeline.latents import FORMAT_VERSION, MANIFEST
from data_pipeline.storage import DataError
from models.text_encoder import load_text_encoder

from trainer.core.errors import ConfigError

_SHA256 = re.compile(r"[0-9a-f]{64}")
_NOT_IN_NAME = re.compile(r"[/\x00-\x1f\x7f]")  # a shard name is joined to the cache URL: no paths
REBUILD = "rebuild the cache with launch/cache_latents.py"


@dataclasses.dataclass(frozen=True)
class ShardEntry:
    shard: str  # file name of the latent shard inside the cache folder (joined to the cache URL; never a path)
    count: int  # samples it holds (quarantined ones are not in it)
    sha256: str  # sha256 of the whole shard file (hex)
    keys_sha256: str  # digest of its sample keys in order (latents.keys_digest): the loader's end-of-shard check
    source: str  # URL of the image shard it was encoded from
    source_identity: str = ""  # that shard's size and ETag (or mtime) then: a rerun redoes it when it changed
    repeats: int = 1  # times its samples are in an epoch (kohya's folder repeats, from make_shards' .json)
    bucket_counts: tuple[int, ...] = ()  # its samples per bucket of the manifest's `buckets`, in their order
    #   (since #28: the loader splits each bucket exactly across ranks); (): no buckets, or an older cache


@dataclasses.dataclass(frozen=True)
class LatentStats:
    mean: tuple[float, ...]  # per-channel mean of z ~ N(mean, std^2) over the cache; () when it holds no samples
    std: tuple[float, ...]  # per-channel standard deviation, the same length


@dataclasses.dataclass(frozen=True)
class BucketCount:
    width: int  # bucket shape in pixels (the latents are width/f x height/f)
    height: int
    count: int  # samples of the cache encoded at this shape


@dataclasses.dataclass(frozen=True)
class VaeRecord:
    source: str  # what the cache job's `vae` named (a local folder made absolute), to load it again
    identity: str  # autoencoder_identity of the model: what a reader checks the loaded model against
    scaling_factor: float  # the model's single latent scale (Stable Diffusion's convention)
    downsample_factor: int  # image side / latent side
    shift_factor: float = 0.0  # the model's latent shift, subtracted before scaling (SD3's and Flux's VAEs, #30)


@dataclasses.dataclass(frozen=True)
class TextEncoderRecord:
    spec: str  # the cache job's text_encoder (tiny | tiny:FILE | MODEL:PRETRAINED | pipeline folder or hub id)
    layer: str  # last | penultimate: the hidden states cached (SDXL's two encoders: always penultimate)
    identity: str  # the encoder's identity(): what a reader checks the loaded encoder against
    max_tokens: int = 0  # SD3/Flux: the T5 tokens it was read at, where not the pipeline's default (#30)

    def load(self):
        """The text encoder the cache was made with, checked against its recorded identity."""
        text_encoder = load_text_encoder(self.spec, self.layer, self.max_tokens)
        if text_encoder.identity() != self.identity:
            raise ConfigError(f"text encoder {self.spec} is not the one the cache was made with")
        return text_encoder


@dataclasses.dataclass(frozen=True)
class Manifest:
    format_version: int  # FORMAT_VERSION of the cache format; another one is refused (rebuild the cache)
    num_samples: int  # samples in all shards together (the sum of the shards' counts)
    num_quarantined: int  # input samples that failed to decode or encode; listed in the shards' sidecars
    shards: tuple[ShardEntry, ...]  # every shard of the cache, sorted by name
    resolution: int  # image side in pixels the latents were encoded at
    crop: str  # how images were made square (a description; the cache job always resizes and centre-crops)
    flip: bool  # samples also hold the mirrored image's moments (mean_flip, std_flip): random flips possible
    latent_shape: tuple[int, int, int]  # channels, height, width of one sample's mean and std
    moments_dtype: str  # storage dtype of mean and std (float16)
    text_emb_shape: tuple[int, int]  # tokens, width of one caption's text embedding
    text_emb_dtype: str  # storage dtype of the text embeddings (float16)
    text: str  # embeddings (per-token hidden states cached) | tokens (token ids; the trainer runs the encoder)
    latent_channel_stats: LatentStats  # per-channel statistics of the latents, for latent_norm=per_channel
    vae: VaeRecord  # the frozen first stage that made the latents
    text_encoder: TextEncoderRecord  # the frozen text encoder that made the embeddings (or reads the tokens)
    pooled_dim: int = 0  # width of the pooled text embedding each sample also holds (SDXL: 1280); 0: none
    mask: str = ""  # how each sample's loss mask was made (file | alpha | auto; since #28); "": no masks
    buckets: tuple[BucketCount, ...] = ()  # aspect-ratio buckets the images were encoded at, with their counts
    #   (sorted by aspect ratio); (): every image a square of `resolution` (then latent_shape holds for all)
    text_lengths: str = ""  # "": every text_emb has text_emb_shape[0] tokens; "variable": each holds its caption's
    #   own tokens only (T5's states up to and with </s>, SD3/Flux, #30), zero-padded to text_emb_shape[0] when read
    clip_emb_shape: tuple[int, ...] = ()  # SD3: tokens, width of the CLIP states each sample also holds; (): none
    flow: str = ""  # sd3 | flux: made with an SD3 or Flux pipeline's text encoders (T5; its states or the ids, #30)

    # --- the one writer and the one reader ---------------------------------------------------------
    def to_json(self) -> str:
        """The text of manifest.json: the keys in the fields' order, indent 1 (the format since v1). Fields
        added later (those with a default) are left out at their default, so a cache without pooled
        embeddings or buckets has the manifest it had before they existed."""
        raw = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.default is not dataclasses.MISSING and getattr(self, f.name) == f.default:
                del raw[f.name]
        if not self.vae.shift_factor:  # since #30: left out at 0, as before they existed
            del raw["vae"]["shift_factor"]
        if not self.text_encoder.max_tokens:
            del raw["text_encoder"]["max_tokens"]
        for entry, shard in zip(raw["shards"], self.shards):  # ShardEntry.source_identity: since #27
            for f in dataclasses.fields(shard):
                if f.default is not dataclasses.MISSING and getattr(shard, f.name) == f.default:
                    del entry[f.name]
        return json.dumps(raw, indent=1)

    @classmethod
    def read(cls, cache_url: str, endpoint_url: str | None = None) -> Manifest:
        """The manifest of the cache at `cache_url`, checked; a DataError naming the file otherwise."""
        url = storage.join(cache_url, MANIFEST)
        if not storage.exists(url, endpoint_url):
            raise DataError(f"{url} does not exist: is {cache_url} a finished latent cache? "
                            "(run launch/cache_latents.py; the manifest is written last)")
        return cls.parse(storage.read_bytes(url, endpoint_url), url)

    @classmethod
    def parse(cls, data: bytes | str, url: str) -> Manifest:
        """A manifest from the bytes of manifest.json; `url` names the file in errors."""
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, absurd nesting
            raise DataError(f"{url} is not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                            f"{REBUILD}") from None
        if not isinstance(raw, dict):
            raise DataError(f"{url} must hold a JSON object, got {type(raw).__name__}: {REBUILD}")
        version = raw.get("format_version")
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise DataError(f"{url} has format_version {_show(version)}, this version reads "
                            f"{FORMAT_VERSION}: {REBUILD}")
        manifest = _parse(cls, raw, "", url)
        manifest._check(url)
        return manifest

    def _check(self, url: str) -> None:
        """What the types cannot say: counts, shapes, names and the totals agree."""
        def bad(key: str, problem: str):
            return DataError(f"{url}: key '{key}' {problem}; {REBUILD}")

        for key in ("num_samples", "num_quarantined"):
            if getattr(self, key) < 0:
                raise bad(key, f"must be >= 0, got {getattr(self, key)}")
        names = set()
        for i, s in enumerate(self.shards):
            if s.count < 0:
                raise bad(f"shards[{i}].count", f"must be >= 0, got {s.count}")
            if not s.shard or s.shard in (".", "..") or _NOT_IN_NAME.search(s.shard):
                raise bad(f"shards[{i}].shard", f"must be a file name inside the cache, got {_show(s.shard)}")
            if s.shard in names:
                raise bad(f"shards[{i}].shard", f"names {_show(s.shard)} twice")
            names.add(s.shard)
            for key in ("sha256", "keys_sha256"):
                if not _SHA256.fullmatch(getattr(s, key)):
                    raise bad(f"shards[{i}].{key}", f"must be 64 hex digits, got {_show(getattr(s, key))}")
        total = sum(s.count for s in self.shards)
        if total != self.num_samples:
            raise bad("num_samples", f"is {self.num_samples}, its shards' counts add up to {total}")
        for key in ("resolution", "latent_shape", "text_emb_shape", "vae.downsample_factor"):
            value = _get(self, key)
            if min(value if isinstance(value, tuple) else (value,)) <= 0:
                raise bad(key, f"must be positive, got {_show(value)}")
        for key, most in (("resolution", 16384), ("latent_shape", 16384), ("text_emb_shape", 16384),
                          ("vae.downsample_factor", 64), ("pooled_dim", 16384)):  # before anything is sized by them
            value = _get(self, key)
            if max(value if isinstance(value, tuple) else (value,)) > most:
                raise bad(key, f"is {_show(value)}, past the largest this trainer accepts ({most})")
        f, (channels, height, width) = self.vae.downsample_factor, self.latent_shape
        if self.resolution % f or (height, width) != (self.resolution // f, self.resolution // f) or channels > 256:
            raise bad("latent_shape", f"is {_show(self.latent_shape)}: resolution {self.resolution} at downsample "
                      f"factor {f} makes latents of {self.resolution // f}x{self.resolution // f} (and at most 256 "
                      "channels)")
        if not math.isfinite(self.vae.shift_factor):
            raise bad("vae.shift_factor", f"must be finite, got {self.vae.shift_factor}")
        if not self.vae.scaling_factor > 0:
            raise bad("vae.scaling_factor", f"must be positive, got {self.vae.scaling_factor}")
        if self.text not in ("embeddings", "tokens"):
            raise bad("text", f"must be embeddings or tokens, got {_show(self.text)}")
        stats = self.latent_channel_stats
        if len(stats.mean) not in (0, self.latent_shape[0]) or len(stats.std) != len(stats.mean):
            raise bad("latent_channel_stats", f"must hold {self.latent_shape[0]} means and stds (one per latent "
                      f"channel), got {len(stats.mean)} and {len(stats.std)}")
        if any(v < 0 for v in stats.std):
            raise bad("latent_channel_stats.std", "must be >= 0")
        if self.mask not in ("", "file", "alpha", "auto"):
            raise bad("mask", f"must be file, alpha, auto or absent, got {_show(self.mask)}")
        if self.pooled_dim < 0:
            raise bad("pooled_dim", f"must be >= 0, got {self.pooled_dim}")
        if self.flow not in ("", "sd3", "flux"):
            raise bad("flow", f"must be sd3, flux or absent, got {_show(self.flow)}")
        if self.text_lengths not in ("", "variable"):
            raise bad("text_lengths", f"must be variable or absent, got {_show(self.text_lengths)}")
        if self.clip_emb_shape and (len(self.clip_emb_shape) != 2 or not all(0 < v <= 16384 for v in self.clip_emb_shape)):
            raise bad("clip_emb_shape", f"must be two positive sizes up to 16384, got {_show(self.clip_emb_shape)}")
        if self.text_emb_dtype not in ("float16", "bfloat16"):
            raise bad("text_emb_dtype", f"must be float16 or bfloat16, got {_show(self.text_emb_dtype)}")
        f = self.vae.downsample_factor
        for i, b in enumerate(self.buckets):
            if b.width <= 0 or b.height <= 0 or b.width % f or b.height % f or b.count < 0:
                raise bad(f"buckets[{i}]", f"must be a positive multiple of the downsample factor {f} in each side "
                          f"with a count >= 0, got {b.width}x{b.height} ({b.count})")
        if self.buckets and sum(b.count for b in self.buckets) != self.num_samples:
            raise bad("buckets", f"counts add up to {sum(b.count for b in self.buckets)}, not num_samples "
                      f"{self.num_samples}")
        for i, s in enumerate(self.shards):
            if not 1 <= s.repeats <= 10_000:
                raise bad(f"shards[{i}].repeats", f"must be 1..10000, got {s.repeats}")
            if s.bucket_counts and (len(s.bucket_counts) != len(self.buckets) or min(s.bucket_counts) < 0
                                    or sum(s.bucket_counts) != s.count):
                raise bad(f"shards[{i}].bucket_counts", f"must be {len(self.buckets)} counts >= 0 (one per bucket) "
                          f"adding up to its count {s.count}, got {_show(s.bucket_counts)}")

    def shard_counts(self) -> list[list[int]] | list[int]:
        """What the loader splits: samples per shard, per bucket where the cache has several (an older cache
        without per-shard bucket counts: per shard only, and the loader counts its buckets by reading)."""
        if len(self.buckets) > 1 and all(s.bucket_counts for s in self.shards):
            return [list(s.bucket_counts) for s in self.shards]
        return [s.count for s in self.shards]

    # --- what readers derive from it ---------------------------------------------------------------
    def bucket_shapes(self) -> list[tuple[int, int]]:
        """(w, h) in pixels of every shape a sample may have: the buckets, or the one square."""
        return [(b.width, b.height) for b in self.buckets] or [(self.resolution, self.resolution)]

    def shard_urls(self, cache_url: str) -> list[str]:
        """The URLs of the cache's shards, in the manifest's order."""
        return [storage.join(cache_url, s.shard) for s in self.shards]

    def latent_affine(self, latent_norm: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, scale) per channel, [C, 1, 1]: the model sees (z - shift) * scale.

        `scaling_factor`: the VAE's single factor (Stable Diffusion's convention), after its shift_factor
        where it has one (SD3's and Flux's VAEs). `per_channel`:
        each channel to zero mean and unit variance with the statistics measured over the cache
        (EDM2 normalises its latents per channel the same way).
        """
        channels = self.latent_shape[0]
        if latent_norm == "scaling_factor":  # and its shift_factor (SD3, Flux): (z - shift) * scale, as their pipelines
            return (torch.full((channels, 1, 1), float(self.vae.shift_factor)),
                    torch.full((channels, 1, 1), float(self.vae.scaling_factor)))
        if latent_norm == "per_channel":
            stats = self.latent_channel_stats
            if not stats.mean:
                raise DataError("latent_norm=per_channel needs the cache's latent_channel_stats, and this cache "
                                "holds no samples")
            return (torch.tensor(stats.mean).view(-1, 1, 1).float(),
                    1.0 / torch.tensor(stats.std).view(-1, 1, 1).float())
        raise ValueError(f"latent_norm must be scaling_factor or per_channel, got {latent_norm!r}")

    def made_with(self) -> dict:
        """What a run trains on, saved with its checkpoints: the cache's encoders and resolution."""
        return {"vae": self.vae.identity, "text_encoder": self.text_encoder.identity, "resolution": self.resolution}

    def check_expected(self, cache_url: str, expect: CacheExpect, trained_on: dict | None) -> dict:
        """Refuse a cache that is not the one the config (or the run being resumed) expects.

        A stale cache from another VAE or text encoder trains without error and silently
        produces garbage (kohya sd-scripts #1413, kohya_ss #1629), so it is stopped here.
        Returns what this run trains on (`made_with`), to be saved with its checkpoints.
        """
        have = self.made_with()
        for key, want in dataclasses.asdict(expect).items():
            if want and want != have[key]:
                raise DataError(f"the cache {cache_url} has {key} {have[key]!r}, the config expects {want!r} "
                                f"(cache.{key}); rebuild the cache or fix the config")
        for key, had in (trained_on or {}).items():
            if had != have.get(key):
                raise DataError(f"the checkpoint was trained on a cache with {key} {had!r}; {cache_url} has "
                                f"{have.get(key)!r}: resume on the same cache or start a new run_dir")
        return have


@dataclasses.dataclass
class CacheExpect:
    vae: str = ""  # identity the cache's VAE must have (manifest vae.identity); "" accepts any
    text_encoder: str = ""  # identity the cache's text encoder must have; "" accepts any
    resolution: int = 0  # image resolution the cache must have been made at; 0 accepts any

    def validate(self, prefix: str = "cache.") -> None:
        if self.resolution < 0:
            raise ConfigError(f"{prefix}resolution must be >= 0 (0 accepts any), got {self.resolution}")


class ChannelStats:
    """Per-channel mean and std of z ~ N(mean, std^2) over a cache, from sums that add up
    across shards: E[z] = E[mean], E[z^2] = E[mean^2 + std^2]. Each shard's sums go to its
    sidecar (`to_json`); the manifest gets their combination."""

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
    def combine(parts: list[dict]) -> LatentStats:
        """The statistics over the cache from the shards' to_json() parts."""
        n = sum(p["n"] for p in parts)
        if n == 0:
            return LatentStats(mean=(), std=())
        total = torch.tensor([p["sum"] for p in parts], dtype=torch.float64).sum(0)
        totalsq = torch.tensor([p["sumsq"] for p in parts], dtype=torch.float64).sum(0)
        mean = total / n
        return LatentStats(mean=tuple(mean.tolist()),
                           std=tuple((totalsq / n - mean * mean).clamp_min(0).sqrt().tolist()))


# --- reading hostile JSON into the dataclasses above ----------------------------------------------
def _show(value) -> str:
    """A value for a one-line message: repr (escapes newlines), cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _parse(cls, raw, where: str, url: str):
    """`cls` from the JSON object `raw`: every field present with its type, no other key."""
    if not isinstance(raw, dict):
        raise DataError(f"{url}: key '{where.rstrip('.')}' must be an object, got {_show(raw)}; {REBUILD}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in set(raw) - set(fields))
    if unknown:
        raise DataError(f"{url}: unknown key '{where}{unknown[0]}' (valid: {', '.join(fields)}); {REBUILD}")
    # Fields with a default were added later (pooled_dim, buckets): an older manifest means the default.
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in raw and f.default is dataclasses.MISSING]
    if missing:
        raise DataError(f"{url}: key '{where}{missing[0]}' is missing; {REBUILD}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _value(raw[name], hints[name], where + name, url) for name in fields if name in raw})


def _value(value, tp, key: str, url: str):
    if dataclasses.is_dataclass(tp):
        return _parse(tp, value, key + ".", url)
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        variable = len(args) == 2 and args[1] is Ellipsis
        what = f"a list of {_TYPE_NAMES.get(args[0], 'objects')}" if variable else \
            f"a list of {len(args)} {_TYPE_NAMES[args[0]]}"
        if not isinstance(value, list) or (not variable and len(value) != len(args)):
            raise DataError(f"{url}: key '{key}' must be {what}, got {_show(value)}; {REBUILD}")
        types_ = [args[0]] * len(value) if variable else list(args)
        return tuple(_value(v, t, f"{key}[{i}]", url) for i, (v, t) in enumerate(zip(value, types_)))
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          str: lambda v: isinstance(v, str)}[tp]
    if not ok(value):
        raise DataError(f"{url}: key '{key}' must be {_TYPE_NAME[tp]}, got {_show(value)}; {REBUILD}")
    return float(value) if tp is float else value


_TYPE_NAMES = {bool: "booleans", int: "integers", float: "finite numbers", str: "strings"}
_TYPE_NAME = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
