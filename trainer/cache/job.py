"""Precompute the latent cache: every image encoded once by the frozen VAE, every caption
once by the frozen text encoder, written as WebDataset shards with a manifest.

Each input shard maps to the output shard of the same name, and ranks take disjoint input
shards (shard i goes to rank i % world; a SLURM array task takes a slice with
`shard_slice`), so the job is idempotent. An output shard appears only once complete (a
temporary name, then a rename; on S3 one upload), and its sidecar `SHARD.tar.json` (count,
sha256, keys digest, settings, quarantined keys, latent statistics) is written after it: a
rerun skips shards whose sidecar exists and redoes the rest, so kill -9 at any moment and
rerunning gives a byte-identical cache. A rerun with other settings (resolution, VAE, text
encoder, flip, text mode) is refused, naming the setting and the shard: skipping would mix
shards of two caches under one manifest. An out_url that is (or is inside) the input
shards' folder is refused before anything is written (the outputs take the inputs' names).
Decoding runs in DataLoader workers; encoding in the main process. The sample format is
data_pipeline/latents.py's, the manifest's trainer/cache/manifest.py's; `manifest.json` is written
last, by rank 0.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time

import torch
from safetensors.torch import save as st_save
from tqdm import tqdm

from data_pipeline import storage
from data_pipeline.images import MASK_MODES
from data_pipeline.latents import EMPTY_CAPTION, FORMAT_VERSION, MANIFEST
from models.autoencoder import autoencoder_identity, downsample_factor, latent_channels, load_autoencoder
from models.pipeline import is_local, part_spec
from models.flow_text import CLIP_TOKENS, FlowTextEncoder
from models.text_encoder import load_text_encoder

from trainer.cache.checks import (other_slices_mismatch, output_is_an_input, output_over_input, place_of,
                                  settings_mismatch)
from trainer.cache.encode import LOST, LatentEncoder, ShardImages, ShardOut, shard_images_loader, shm_workers
from trainer.cache.manifest import BucketCount, ChannelStats, Manifest, ShardEntry, TextEncoderRecord, VaeRecord
from trainer.core import config as config_lib
from trainer.core import dist
from trainer.core.data import ImageData


@dataclasses.dataclass
class CacheJob:
    data: ImageData = dataclasses.field(default_factory=ImageData)  # image shards in (resolution: crop size;
    #   data.buckets=true: each image at its aspect-ratio bucket of about resolution**2 pixels)
    out_url: str = ""  # where latent shards and manifest.json go (local path or s3://...)
    out_endpoint_url: str | None = None  # S3-compatible endpoint for out_url; default AWS_ENDPOINT_URL
    pretrained: str = ""  # a diffusers Stable Diffusion pipeline folder (model_index.json) or hub id: the VAE
    #   and text encoder default to its vae/ and text_encoder/ + tokenizer/ (SDXL: also text_encoder_2/ +
    #   tokenizer_2/, both cached with the pooled embedding); "": name them with vae= and text_encoder=
    vae: str = ""  # diffusers AutoencoderKL or VQModel folder, hub id, preset:NAME (random, tests only),
    #   or identity: pixels as the latent (f = 1, 3 channels, scaling_factor 1; the LDM-1 baseline); "": pretrained's
    text_encoder: str = ""  # tiny | tiny:FILE | OpenCLIP MODEL:PRETRAINED (e.g. ViT-H-14:laion2b_s32b_b79k) |
    #   a diffusers pipeline folder or hub id (its text_encoder/ and tokenizer/) | SPEC+SPEC: SDXL's pair from
    #   scratch (ViT-L-14:CKPT+ViT-bigG-14:CKPT, both penultimate, the second's pooled); "": pretrained's, else tiny
    text_layer: str = "last"  # hidden states of the last or penultimate (SD 2.x) text layer (an SDXL pipeline's
    #   two encoders are always read at the penultimate layer, as SDXL reads them)
    batch_size: int = 64  # images per encoder call
    precision: str = "auto"  # auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16 for the encoders
    flip: bool = False  # also cache the moments of the mirrored image (for random flips in training)
    shard_slice: str = ""  # "START:STOP" of the sorted input shards for this job (SLURM arrays); "" = all
    text_max_tokens: int = 0  # SD3/Flux: T5 tokens per caption (0: the pipeline's own, 256 for SD3, 512 for Flux-dev;
    #   Flux-schnell was trained with 256); longer captions are cut, as the pipelines cut them
    text: str = "embeddings"  # embeddings (per-token hidden states, fp16) | tokens (ids only; the trainer encodes)
    mask: str = "none"  # loss masks, cached on the latent grid: none | file (NAME.mask.png beside the image: white
    #   trains, black does not) | alpha (the image's transparency) | auto (file, else alpha, else everywhere)

    # pretrained= on the command line replaces a config file's vae and text_encoder (trainer/core/config.py)
    NAMES_ALSO = {"pretrained": ("vae", "text_encoder")}

    def vae_spec(self) -> str:
        """The VAE this job encodes with: `vae`, else the pretrained pipeline's vae/."""
        return self.vae or (part_spec(self.pretrained, "vae") if self.pretrained else "")

    def text_encoder_spec(self) -> str:
        """The text encoder: `text_encoder`, else the pretrained pipeline's, else the tiny random tower."""
        if self.text_encoder:
            return self.text_encoder
        return os.path.abspath(self.pretrained) if self.pretrained and is_local(self.pretrained) else \
            self.pretrained or "tiny"

    def validate(self) -> None:
        if not self.out_url:
            raise config_lib.ConfigError("out_url is empty: it is required")
        if not self.vae_spec():
            raise config_lib.ConfigError("vae is empty: name the autoencoder, or a pipeline folder with pretrained=")
        if not self.data.urls:
            raise config_lib.ConfigError("data.urls is empty: name the image shards to encode")
        config_lib.check_choice("mask", self.mask, MASK_MODES)
        if self.text not in ("embeddings", "tokens"):
            raise config_lib.ConfigError(f"text must be embeddings or tokens, got {self.text!r}")
        self._validate_fields()
        clash = output_over_input(self.out_url, self.out_endpoint_url, self.data.urls, self.data.endpoint_url)
        if clash:
            raise config_lib.ConfigError(f"out_url={self.out_url} is the input shards' folder {clash} (data.urls) or "
                                         "inside it: the cache would overwrite or mix with its input (output shards "
                                         "take the input shards' names); choose an out_url outside it")

    def _validate_fields(self) -> None:
        """Every other field, when the config is resolved (login node, --dry-run), not on the nodes."""
        from trainer.core.job_checks import check_pretrained, check_text_encoder_spec, check_vae_spec

        self.data.validate("data.")
        # The cache encodes every image once, in order: the training loader's settings would be
        # accepted and silently do nothing.
        defaults = ImageData()
        for key in ("shuffle_buffer", "virtual_ranks", "resampled"):
            if getattr(self.data, key) != getattr(defaults, key):
                raise config_lib.ConfigError(f"data.{key}={getattr(self.data, key)} is not used by the cache job "
                                             "(it encodes each image once, in order); leave it out")
        if not self.data.buckets:
            for key in ("bucket_step", "bucket_max_aspect"):
                if getattr(self.data, key) != getattr(defaults, key):
                    raise config_lib.ConfigError(f"data.{key} is set but data.buckets is false: set data.buckets=true "
                                                 "or leave it out")
        config_lib.check_endpoint("out_endpoint_url", self.out_endpoint_url)
        if self.pretrained:
            check_pretrained(self.pretrained, ("vae",) * (not self.vae) + ("text_encoder", "tokenizer") *
                             (not self.text_encoder))
            own = {"vae": part_spec(self.pretrained, "vae"), "text_encoder": self.pretrained}
            for key, theirs in own.items():
                mine = getattr(self, key)
                if mine and place_of(mine) != place_of(theirs):
                    raise config_lib.ConfigError(
                        f"{key}={mine} and pretrained={self.pretrained} both name the {key.replace('_', ' ')}: name "
                        f"one (pretrained= on the command line replaces a config file's {key}), or a {key} that "
                        "is pretrained's own")
        check_vae_spec(self.vae_spec())
        check_text_encoder_spec(self.text_encoder_spec())
        config_lib.check_choice("text_layer", self.text_layer, ("last", "penultimate"))
        if not 0 <= self.text_max_tokens <= 4096:
            raise config_lib.ConfigError(f"text_max_tokens must be 0 (the pipeline's own) or at most 4096, got "
                                         f"{self.text_max_tokens}")
        config_lib.check_choice("precision", self.precision, ("auto", "fp32", "fp16", "bf16"))
        config_lib.check_positive(self, ("batch_size",))
        if self.shard_slice and not re.fullmatch(r"\d*:\d*", self.shard_slice, re.ASCII):
            raise config_lib.ConfigError(f"shard_slice must look like START:STOP, got {self.shard_slice!r}")


def encoder_dtype(precision: str) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _my_shards(cfg: CacheJob, w) -> tuple[list[str], list[str], list[int]]:
    """(all input URLs, their output names, the indices this rank encodes)."""
    inputs = storage.expand_shards(cfg.data.urls, cfg.data.endpoint_url)
    names = [os.path.basename(u.split("://")[-1]) for u in inputs]
    if len(set(names)) != len(names):
        raise storage.DataError("input shards must have distinct file names: each maps to the output shard of that name")
    chosen = range(len(inputs))
    if cfg.shard_slice:
        try:
            start, stop = (int(v) if v else None for v in cfg.shard_slice.split(":"))
        except ValueError:
            raise config_lib.ConfigError(f"shard_slice must look like START:STOP, got {cfg.shard_slice!r}") from None
        chosen = chosen[slice(start, stop)]
    return inputs, names, list(chosen)[w.rank::w.size]


def cache_latents(cfg: CacheJob) -> str:
    """Run the job on this rank; returns the manifest URL (written by rank 0)."""
    cfg.validate()  # also when called directly, not from a command line: nothing is written before it
    w = dist.init()  # the same set-up as every job (a one-member group when run alone)
    cfg.data.configure_storage()
    dtype = encoder_dtype(cfg.precision)
    device = dist.device()

    # --- the frozen encoders ------------------------------------------------------------
    vae_spec, text_spec = cfg.vae_spec(), cfg.text_encoder_spec()
    vae = load_autoencoder(vae_spec).to(device)
    identity = autoencoder_identity(vae)
    if dtype != torch.float32:
        vae.to(dtype)
    encoder = LatentEncoder(vae, dtype)
    text_encoder = load_text_encoder(text_spec, cfg.text_layer, cfg.text_max_tokens).to(device)
    if cfg.text_max_tokens and not isinstance(text_encoder, FlowTextEncoder):
        raise config_lib.ConfigError(f"text_max_tokens={cfg.text_max_tokens} sets T5's length, and {text_spec} has no "
                                     "T5 encoder (SD3 and Flux pipelines have): leave it at 0")
    factor = downsample_factor(vae)
    if cfg.data.resolution % factor:
        raise config_lib.ConfigError(f"data.resolution={cfg.data.resolution} is not a multiple of the "
                                     f"autoencoder's downsampling factor {factor}")

    # What a shard's contents depend on: recorded with every shard, and a finished shard is
    # only reused when its record matches (a rerun with other settings would mix two caches).
    bucketer = cfg.data.bucketer()  # None: square crops
    settings = {"format_version": FORMAT_VERSION, "resolution": cfg.data.resolution, "vae": identity,
                "text_encoder": text_encoder.identity(), "flip": cfg.flip, "text": cfg.text,
                "buckets": [list(b) for b in bucketer.buckets] if bucketer else None,
                "sample_meta": "original_size crop_box target_size crop_top_left",
                **({"mask": cfg.mask} if cfg.mask != "none" else {})}
    if bucketer and any(w % factor or h % factor for w, h in bucketer.buckets):
        raise config_lib.ConfigError(f"data.bucket_step={cfg.data.bucket_step} is not a multiple of the autoencoder's "
                                     f"downsampling factor {factor}")

    # --- this rank's shards that are not done yet -------------------------------------------
    inputs, names, mine = _my_shards(cfg, w)
    clash = output_is_an_input(inputs, names, cfg.data.endpoint_url, cfg.out_url, cfg.out_endpoint_url)
    if clash is not None:
        raise config_lib.ConfigError(f"out_url={cfg.out_url} would write over the input shard {clash} (data.urls): "
                                     "the cache names its shards after its inputs; choose an out_url apart from them")
    storage.makedirs(cfg.out_url, cfg.out_endpoint_url)
    entries, todo, mismatch, sources = [], [], None, {}
    for i in mine:
        sidecar = storage.join(cfg.out_url, names[i]) + ".json"
        sources[i] = storage.identity(inputs[i], cfg.data.endpoint_url)
        entry = json.loads(storage.read_bytes(sidecar, cfg.out_endpoint_url)) \
            if storage.exists(sidecar, cfg.out_endpoint_url) else None
        if entry is not None and entry.get("source_identity", sources[i]) != sources[i]:
            print(f"{inputs[i]} changed since {names[i]} was cached from it ({entry['source_identity']}, now "
                  f"{sources[i]}): caching it again")  # same name, other contents (#27): never skipped as done
            entry = None
        if entry is not None:  # done by an earlier run
            entries.append(entry)
            mismatch = mismatch or settings_mismatch(entries[-1], settings, sidecar)
        else:
            todo.append((i, inputs[i]))
    if mismatch is None and w.is_main:  # another slice's shard already there (SLURM arrays): the same settings?
        mismatch = other_slices_mismatch(cfg.out_url, cfg.out_endpoint_url, names, {names[i] for i in mine},
                                         settings)
    # Every rank learns of any rank's mismatch, so that all stop together (none waits for the others).
    mismatches = [m for m in dist.all_gather_objects(mismatch) if m]
    if mismatches:
        raise config_lib.ConfigError(mismatches[0])

    # --- decode in workers, encode here; one writer per shard in flight --------------------------
    t0, written, failed, closed = time.time(), 0, 0, set()
    bar = tqdm(desc=f"caching (rank {w.rank})", unit="img", disable=not w.is_main)
    side = max([cfg.data.resolution, *(max(b) for b in (bucketer.buckets if bucketer else []))])
    workers = shm_workers(cfg.data.num_workers, cfg.batch_size * 3 * side * side * 4,
                          say=print if w.is_main else (lambda _: None))
    loader = iter(shard_images_loader(ShardImages(todo, cfg.data.decode_options(), cfg.batch_size,
                                                  cfg.data.endpoint_url, cfg.data.max_member_bytes, bucketer,
                                                  mask=(cfg.mask, factor)),
                                      workers))
    outs: dict[int, ShardOut] = {}  # output shards in flight (workers interleave shards)
    try:
        for item in loader:
            i = item["shard"]
            if i not in outs:
                outs[i] = ShardOut(cfg, storage.join(cfg.out_url, names[i]), inputs[i], settings)
            outs[i].add(item, encoder, text_encoder)
            bar.update(len(item["keys"]))
            if not item["last"]:
                continue
            out = outs[i].out
            entry = outs.pop(i).close()
            entry["sha256"], entry["source_identity"] = _sha256(out, cfg.out_endpoint_url), sources[i]
            storage.write_bytes_atomic(out + ".json", json.dumps(entry).encode(), cfg.out_endpoint_url)
            entries.append(entry)
            closed.add(i)
            written += entry["count"]
            failed += len(entry["quarantined"])
            # The same rule as the training loader's: a mostly broken input stops the job.
            if failed > cfg.data.max_error_rate * max(written + failed, 1000):
                raise storage.DataError(f"{failed} of {written + failed} samples failed on rank {w.rank}, more than "
                                        f"data.max_error_rate={cfg.data.max_error_rate}; see the quarantined keys in "
                                        f"the *.tar.json sidecars under {cfg.out_url}")
    except Exception as e:  # out of space: one line, and the finished shards stay (a rerun skips them)
        if not storage.is_disk_full(e):
            raise
        shard = next(iter(outs.values())).out if outs else cfg.out_url
        done = [storage.join(cfg.out_url, x["shard"]) for x in entries if storage.is_local(cfg.out_url)]
        need = max((os.path.getsize(x) for x in done if os.path.exists(x)), default=None)
        raise storage.DataError(storage.disk_full(cfg.out_url, f"the cache shard {shard}", need) + "; the shards "
                                "finished so far are kept and a rerun after freeing space skips them") from None
    bar.close()
    missing = [url for i, url in todo if i not in closed]  # the loader ended without a shard's last batch
    lost = [m for m in dist.all_gather_objects(
        f"{len(missing)} of {len(todo)} input shards were not cached on rank {w.rank} (first: {missing[0]}): their "
        f"batches never arrived; {LOST}" if missing else None) if m]
    if lost:  # never exit 0 with work missing; every rank stops together
        raise storage.DataError(lost[0])
    rate = written / max(1e-9, time.time() - t0)

    # --- manifest, written last -------------------------------------------------------------
    found = {e["shard"]: e for part in dist.all_gather_objects(entries) for e in part}
    manifest_url = storage.join(cfg.out_url, MANIFEST)
    if w.is_main:  # other slices (SLURM array tasks) may have finished the rest already
        for name in names:
            sidecar = storage.join(cfg.out_url, name) + ".json"
            if name not in found and storage.exists(sidecar, cfg.out_endpoint_url):
                found[name] = json.loads(storage.read_bytes(sidecar, cfg.out_endpoint_url))
                if (message := settings_mismatch(found[name], settings, sidecar)) is not None:
                    raise config_lib.ConfigError(message)  # another slice of this job ran with other settings
    all_entries = [found[n] for n in sorted(found)]
    if w.is_main and len(found) == len(names):
        empty = text_encoder.embed([""])
        if "text_len" in empty:  # SD3/Flux: T5's states of "" up to </s>, zeros after, as every sample reads them
            keep = torch.arange(empty["text_emb"].shape[1]) < empty.pop("text_len")[0]
            empty["text_emb"] = empty["text_emb"] * keep[None, :, None].to(empty["text_emb"].device)
        empty = {k: v[0].float().cpu().half().contiguous() for k, v in empty.items()}
        storage.write_bytes_atomic(storage.join(cfg.out_url, EMPTY_CAPTION), st_save(empty), cfg.out_endpoint_url)
        counts = {}
        for e in all_entries:
            for shape, n in e.get("buckets", {}).items():
                counts[shape] = counts.get(shape, 0) + n
        size = cfg.data.resolution // factor
        variable = isinstance(text_encoder, FlowTextEncoder) and cfg.text == "embeddings"
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            num_samples=sum(e["count"] for e in all_entries),
            num_quarantined=sum(len(e["quarantined"]) for e in all_entries),
            shards=tuple(ShardEntry(**{k: e[k] for k in ("shard", "count", "sha256", "keys_sha256", "source")},
                                    source_identity=e.get("source_identity", ""), repeats=e.get("repeats", 1),
                                    bucket_counts=tuple(e.get("buckets", {}).get(f"{w_}x{h_}", 0)
                                                        for w_, h_ in bucketer.buckets) if bucketer else ())
                         for e in all_entries),
            resolution=cfg.data.resolution,
            crop="resize to cover, centre crop",
            flip=cfg.flip,
            latent_shape=(latent_channels(vae), size, size),
            moments_dtype="float16",
            text_emb_shape=(text_encoder.context_length, text_encoder.width),
            text_emb_dtype="bfloat16" if variable else "float16",
            text=cfg.text,
            latent_channel_stats=ChannelStats.combine([e["stats"] for e in all_entries if e["stats"]["n"]]),
            vae=VaeRecord(source=os.path.abspath(vae_spec) if os.path.isdir(vae_spec) else vae_spec,
                          identity=identity, scaling_factor=float(vae.config.scaling_factor),
                          downsample_factor=factor, shift_factor=float(getattr(vae.config, "shift_factor", 0.0) or 0.0)),
            text_encoder=TextEncoderRecord(spec=os.path.abspath(text_spec) if os.path.isdir(text_spec) else text_spec,
                                           layer=text_encoder.layer,
                                           identity=text_encoder.identity(), max_tokens=cfg.text_max_tokens),
            pooled_dim=text_encoder.pooled_dim,
            mask="" if cfg.mask == "none" else cfg.mask,
            text_lengths="variable" if variable else "",
            flow=text_encoder.family if isinstance(text_encoder, FlowTextEncoder) else "",
            clip_emb_shape=(CLIP_TOKENS, text_encoder.clip_width) if getattr(text_encoder, "clip_width", 0) else (),
            buckets=tuple(BucketCount(w_, h_, counts.get(f"{w_}x{h_}", 0)) for w_, h_ in bucketer.buckets)
            if bucketer else (),
        )
        storage.write_bytes_atomic(manifest_url, manifest.to_json().encode(), cfg.out_endpoint_url)
        print(f"cached {manifest.num_samples} samples in {len(all_entries)} shards at {cfg.out_url}; "
              f"{manifest.num_quarantined} quarantined, {encoder.rescued} re-encoded in fp32, "
              f"{len(entries) - len(todo)} shards skipped as done before; "
              f"rank 0 encoded {written} now at {rate:.3g} img/s")
        if manifest.buckets:
            print("buckets (w x h px: share of samples): " + ", ".join(
                f"{b.width}x{b.height}: {b.count / max(1, manifest.num_samples):.1%}" for b in manifest.buckets if b.count))
    elif w.is_main:
        print(f"{len(found)} of {len(names)} shards are done; the job that finishes the last writes the manifest")
    dist.barrier()
    return manifest_url


def _sha256(url: str, endpoint_url: str | None) -> str:
    h = hashlib.sha256()
    with storage.open_url(url, "rb", endpoint_url) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
