"""The latent cache format: what one cached sample holds, and the manifest that describes a cache.

Per sample, `KEY.safetensors` holds the frozen VAE's posterior `mean` and `std` (fp16; with
`flip`, also `mean_flip`/`std_flip` of the mirrored image) and the caption's per-token
`text_emb` (fp16) or, with `text=tokens`, only its token ids `tokens` (int32); `KEY.txt` the
caption; `KEY.json` the original size and crop box; `KEY.sha256` the digest of the key and
the other members (`sample_digest`), checked before the sample is used. Per shard,
`SHARD.tar.json` (written after the shard) holds its count, sha256, the digest of its keys in
order (`keys_sha256`), the settings it was made with, quarantined keys and latent
statistics. `manifest.json`, written last, describes the whole cache; its reader and writer
are trainer/cache/manifest.py's (`Manifest`): this layer only names the file.

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
    """A WebDataset sample (bytes per field) from tensors (fp32 ones stored as fp16, bf16 ones as they are),
    caption and metadata."""
    tensors = {k: (v.half() if v.dtype in (torch.float32, torch.float64) else v).contiguous()
               for k, v in tensors.items()}
    sample = {"__key__": key, "safetensors": st_save(tensors),
              "txt": caption.encode(), "json": json.dumps(meta, sort_keys=True).encode()}
    sample["sha256"] = sample_digest(sample).encode()
    return sample


def trim_text(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One sample's tensors as a variable-length cache stores them (#30): `text_emb` cut to the caption's own
    `text_len` tokens (dropped, as the shape then says it), in bf16; alternative captions (`text_emb_alt`
    [n, L, d], `text_len_alt` [n]) cut to the longest one's length, each zeroed past its own: every stored
    embedding is its caption's states followed by zeros, which is what `pad_text` gives back."""
    out = dict(tensors)
    if "text_len" in out:
        out["text_emb"] = out["text_emb"][:int(out.pop("text_len"))].to(torch.bfloat16)
    if "text_len_alt" in out:
        lengths, emb = out.pop("text_len_alt"), out["text_emb_alt"]
        keep = torch.arange(emb.shape[1])[None, :] < lengths[:, None]
        out["text_emb_alt"] = (emb * keep[..., None])[:, :int(lengths.max())].to(torch.bfloat16)
    return out


def pad_text(t: torch.Tensor, length: int) -> torch.Tensor:
    """A variable-length text embedding ([n, d], or [k, n, d] for alternative captions) zero-padded to `length`
    tokens; a DataError when it holds more (not a cache of this manifest)."""
    n = t.shape[-2]
    if n > length:
        raise DataError(f"text embedding of {n} tokens, more than the cache's {length}")
    return t if n == length else torch.nn.functional.pad(t, (0, 0, 0, length - n))


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


def sample_meta(sample: dict) -> dict:
    """A cached sample's KEY.json (what the cache recorded of its image), checked: a DataError
    naming the sample when it is missing or not an object with the sizes SDXL conditions on."""
    where = f"{sample.get('__url__')}:{sample.get('__key__')}"
    try:
        meta = json.loads(bytes(sample["json"]))
    except (KeyError, ValueError, RecursionError):
        raise DataError(f"latent sample {where} has no readable .json") from None
    for key in ("original_size", "target_size", "crop_top_left"):
        value = meta.get(key) if isinstance(meta, dict) else None
        if not (isinstance(value, list) and len(value) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**24 for v in value)):
            raise DataError(f"latent sample {where}: .json key {key!r} must be two whole numbers, got "
                            f"{str(value)[:40]} (a cache made before SDXL support: rebuild it)")
    return meta


def time_ids(meta: dict) -> torch.Tensor:
    """SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2) from a sample's meta: original
    (height, width), crop (top, left) in the resized image, target (height, width), as float32."""
    (ow, oh), (top, left), (tw, th) = meta["original_size"], meta["crop_top_left"], meta["target_size"]
    return torch.tensor([oh, ow, top, left, th, tw], dtype=torch.float32)


class CachedSampleDecoder:
    """The UNet loader's decode: `decode_sample`, plus `time_ids` where the UNet takes SDXL's
    conditioning, and, with several bucket shapes, a check that the latents have the shape of
    the bucket the sample names (the loader batched it by that name). Picklable, for workers.

    `expect` (the manifest's shapes: latent_shape, text, text_emb_shape, pooled_dim; text_lengths, clip_emb_shape
    and token_length for SD3/Flux, whose variable-length T5 states are zero-padded here) checks every sample
    against the cache it belongs to, so that one that does not fit (a latent of another shape, a text
    embedding of another width, SDXL's pooled embedding missing) is a DataError naming it, quarantined
    under the error budget, instead of a crash in collation on every rerun at the same place (#27)."""

    def __init__(self, with_time_ids: bool, downsample_factor: int, check_shape: bool, expect: dict | None = None,
                 captions=None, masks: bool = False):
        self.with_time_ids, self.factor, self.check_shape = with_time_ids, downsample_factor, check_shape
        self.expect = expect
        self.masks = masks  # loss masks: every sample has one (all ones where its cache made none); else dropped
        self.captions = captions  # data_pipeline.captions.CaptionPicker: one of several captions, shuffled tags

    def _fits(self, sample: dict, tensors: dict) -> None:
        e, where = self.expect, f"latent sample {sample.get('__url__')}:{sample.get('__key__')}"
        channels, height, width = e["latent_shape"]
        for key in ("mean", "std", "mean_flip", "std_flip"):
            t = tensors.get(key)
            if t is None and key in ("mean", "std"):
                raise DataError(f"{where} has no {key} latents")
            if t is not None and (t.dim() != 3 or t.shape[0] != channels or not t.is_floating_point()
                                  or (not self.check_shape and tuple(t.shape[1:]) != (height, width))):
                raise DataError(f"{where} holds {key} of shape {tuple(t.shape)}, the cache's latents are "
                                f"{channels}x{height}x{width}" + (" (in its bucket's shape)" if self.check_shape else ""))
        m = tensors.get("mask")
        if m is not None and (m.dim() != 2 or tuple(m.shape) != tuple(tensors["mean"].shape[-2:])):
            raise DataError(f"{where} holds a loss mask of shape {tuple(m.shape)}, its latents are "
                            f"{tuple(tensors['mean'].shape[-2:])}")
        tokens, width_text = e["text_emb_shape"]
        if e["text"] == "tokens":
            t, length = tensors.get("tokens"), e.get("token_length", tokens)  # SD3/Flux: every tokenizer's ids
            if t is None or t.is_floating_point() or t.dim() not in (1, 2) or t.shape[-1] != length:
                raise DataError(f"{where} holds no token ids of length {length} (the cache's text=tokens)")
            return
        if e.get("clip_emb_shape"):
            t = tensors.get("clip_emb")
            if t is None or tuple(t.shape) != tuple(e["clip_emb_shape"]) or not t.is_floating_point():
                raise DataError(f"{where} holds clip_emb of shape {None if t is None else tuple(t.shape)}, the "
                                f"cache's is {'x'.join(map(str, e['clip_emb_shape']))} (SD3's CLIP states)")
        t = tensors.get("text_emb")
        if t is None or tuple(t.shape) != (tokens, width_text) or not t.is_floating_point():
            raise DataError(f"{where} holds text_emb of shape {None if t is None else tuple(t.shape)}, the cache's "
                            f"is {tokens}x{width_text}")
        if e.get("pooled_dim"):
            t = tensors.get("pooled")
            if t is None or tuple(t.shape) != (e["pooled_dim"],):
                raise DataError(f"{where} holds no pooled text embedding of width {e['pooled_dim']} (SDXL's)")

    def __call__(self, sample: dict) -> dict:
        tensors = decode_sample(sample)
        if self.captions is not None:
            tensors = self.captions(sample, tensors)
        else:
            tensors = {k: v for k, v in tensors.items() if not k.endswith("_alt")}
        if self.masks and "mask" not in tensors and "mean" in tensors:
            tensors["mask"] = torch.ones(tensors["mean"].shape[-2:], dtype=torch.float16)
        elif not self.masks:
            tensors.pop("mask", None)
        if self.expect is not None:
            if self.expect.get("text_lengths") == "variable" and "text_emb" in tensors:  # SD3/Flux's T5 states
                try:
                    tensors["text_emb"] = pad_text(tensors["text_emb"], self.expect["text_emb_shape"][0])
                except DataError as e:
                    raise DataError(f"latent sample {sample.get('__url__')}:{sample.get('__key__')}: {e}") from None
            self._fits(sample, tensors)
        if not (self.with_time_ids or self.check_shape):
            return tensors
        meta = sample_meta(sample)
        if self.check_shape:
            w, h = meta["target_size"]
            want = (h // self.factor, w // self.factor)
            got = tuple(tensors["mean"].shape[-2:]) if "mean" in tensors else None
            if got != want:
                raise DataError(f"latent sample {sample.get('__url__')}:{sample.get('__key__')} holds {got} latents, "
                                f"its .json names a {w}x{h} image (expected {want})")
        if self.with_time_ids:
            tensors["time_ids"] = time_ids(meta)
        return tensors


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
