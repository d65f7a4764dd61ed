"""What the UNet job reads: the latent cache, and for DreamBooth a second cache of class images.

Both caches' shards go into one loader (data_pipeline/loader.py), which splits samples, not
shards, across ranks: each shard comes with its repeats per epoch (the cache's kohya folder
repeats times data.repeats or data.class_repeats) and the loss weight of its samples (1, or
data.prior_loss_weight for class images: prior preservation, Ruiz et al. 2023, eq. 2, where the
class images' loss is added with weight lambda; here they are samples of the same batches).
"""
from __future__ import annotations

import dataclasses

from data_pipeline.buckets import LatentBucketer
from data_pipeline.captions import CaptionPicker
from data_pipeline.latents import CachedSampleDecoder

from trainer.cache.manifest import Manifest
from trainer.core.errors import ConfigError


@dataclasses.dataclass
class TrainingData:
    urls: list[str]
    counts: list  # per shard: samples, or samples per bucket
    checksums: list[str]  # per shard: keys_sha256, checked at the end of each shard
    repeats: list[int]
    weights: list[float]
    bucketer: LatentBucketer | None
    decode: CachedSampleDecoder
    class_samples: int  # samples of the class cache (0: none)


# What two caches must share to be trained on in one batch.
_SAME = ("made_with", "latent_shape", "text", "text_emb_shape", "pooled_dim", "bucket_shapes")


def check_class_cache(manifest: Manifest, other: Manifest, urls: str, class_urls: str, random_flip: bool) -> None:
    for key in _SAME:
        a, b = getattr(manifest, key), getattr(other, key)
        a, b = (a(), b()) if callable(a) else (a, b)
        if a != b:
            raise ConfigError(f"data.class_urls {class_urls} has {key} {b!r:.120}, data.urls {urls} has {a!r:.120}: "
                              "make the class images' cache with the same cache config (encoders, resolution, buckets)")
    if random_flip and not other.flip:
        raise ConfigError(f"random_flip needs caches made with flip=true; data.class_urls {class_urls} has none")


def training_data(data, manifest: Manifest, with_time_ids: bool, random_flip: bool,
                  captions: CaptionPicker | None = None, token_length: int = 0) -> TrainingData:
    """The shards, counts, repeats and weights of `data` (a LatentData) over `manifest` (data.urls's);
    `captions` picks each sample's caption (one of several; shuffled tags); `token_length`: the ids a caption
    has in a cache of token ids, where not text_emb_shape[0] (SD3/Flux: every tokenizer's in one row)."""
    caches = [(data.urls, manifest, data.repeats, 1.0)]
    if data.class_urls:
        other = Manifest.read(data.class_urls, data.endpoint_url)
        check_class_cache(manifest, other, data.urls, data.class_urls, random_flip)
        caches.append((data.class_urls, other, data.class_repeats, data.prior_loss_weight))
    bucketed = len(manifest.buckets) > 1
    urls, counts, checksums, repeats, weights = [], [], [], [], []
    for url, m, times, weight in caches:
        urls += m.shard_urls(url)
        counts += m.shard_counts()
        checksums += [s.keys_sha256 for s in m.shards]
        repeats += [s.repeats * times for s in m.shards]
        weights += [weight] * len(m.shards)
    if any(isinstance(c, int) for c in counts) and any(isinstance(c, list) for c in counts):
        counts = [c if isinstance(c, int) else sum(c) for c in counts]  # an older cache: the loader counts buckets
    decode = CachedSampleDecoder(with_time_ids, manifest.vae.downsample_factor, bucketed,
                                 expect={"latent_shape": manifest.latent_shape, "text": manifest.text,
                                         "text_emb_shape": manifest.text_emb_shape, "pooled_dim": manifest.pooled_dim,
                                         "text_lengths": manifest.text_lengths, "clip_emb_shape": manifest.clip_emb_shape,
                                         "token_length": token_length or manifest.text_emb_shape[0]},
                                 captions=captions, masks=any(m.mask for _, m, _, _ in caches))
    return TrainingData(urls, counts, checksums, repeats, weights,
                        LatentBucketer(manifest.bucket_shapes()) if bucketed else None, decode,
                        caches[1][1].num_samples if len(caches) > 1 else 0)


def check_caches(cfg, manifest: Manifest) -> None:
    """What the config asks of its caches that the manifests can answer: run before the run's config.yaml
    is written (a refusal then locks nothing) and by --dry-run (#29)."""
    from trainer.unet.pretrained import flow_family

    family = flow_family(cfg)
    if manifest.flow and family is None:
        raise ConfigError(f"{cfg.data.urls} is a cache of an SD3 or Flux pipeline's text encoders (T5): a UNet is "
                          "conditioned on CLIP's; cache with an SD 1.x/2.x or SDXL pipeline (or text_encoder=)")
    if family is not None and manifest.flow != family:
        raise ConfigError(f"{cfg.data.urls} was not made with an {family} pipeline's text encoders (it holds "
                          f"{manifest.flow or 'CLIP'}'s): cache with pretrained= such a folder")
    f = manifest.vae.downsample_factor
    odd = [f"{w}x{h}" for w, h in manifest.bucket_shapes() if (w // f) % 2 or (h // f) % 2]
    if family is not None and odd:
        raise ConfigError(f"{cfg.data.urls} holds images of {', '.join(odd[:3])} px, whose latents have an odd side: "
                          f"{family}'s transformer takes 2x2 latent patches; cache at sizes that are multiples of "
                          f"{2 * f} px (data.resolution, data.bucket_step)")
    if cfg.random_flip and not manifest.flip:
        raise ConfigError(f"random_flip needs a cache made with flip=true; {cfg.data.urls} has none")
    if cfg.caption_shuffle and manifest.text != "tokens":
        raise ConfigError(f"caption_shuffle=true needs a cache made with text=tokens: {cfg.data.urls} holds each "
                          "caption's embedding, encoded once, so its tags cannot be reordered; rebuild the cache "
                          "with text=tokens (the frozen text encoder then runs in the training step) or set "
                          "caption_shuffle=false")
    if cfg.lora_text_encoder and manifest.text != "tokens":
        raise ConfigError(f"lora_text_encoder=true needs a cache made with text=tokens: {cfg.data.urls} holds each "
                          "caption's embedding by the frozen text encoder, which an adapted encoder would change; "
                          "rebuild the cache with text=tokens (the encoder then runs in the training step)")
    if cfg.data.class_urls:
        other = Manifest.read(cfg.data.class_urls, cfg.data.endpoint_url)
        check_class_cache(manifest, other, cfg.data.urls, cfg.data.class_urls, cfg.random_flip)


def dry_run_checks(cfg) -> None:
    """--dry-run: the checks a start makes before it writes anything, on the login node: pretrained's folder
    resolved, the cache's manifest read and checked against the config and against pretrained's encoders."""
    from trainer.unet import pretrained

    cfg = pretrained.resolve(cfg, say=None)
    manifest = Manifest.read(cfg.data.urls, cfg.data.endpoint_url)
    manifest.check_expected(cfg.data.urls, cfg.cache, None)
    mismatch = pretrained.cache_mismatch(cfg, manifest, cfg.data.urls)
    if mismatch:
        raise ConfigError(mismatch)
    check_caches(cfg, manifest)


def caption_picker(cfg, manifest: Manifest, text_encoder) -> CaptionPicker:
    """One caption per sample and epoch (of several), its tags shuffled with cfg.caption_shuffle, which
    needs the text encoded after shuffling: a cache of token ids (`text_encoder` loaded for it)."""
    check_caches(cfg, manifest)
    return CaptionPicker(cfg.seed, cfg.caption_shuffle, cfg.keep_tokens,
                         text_encoder.tokenize if text_encoder is not None else None)

