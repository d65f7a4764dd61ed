"""Sample quality without a caption classifier: sample FID and CLIP score, each when its weights
are available locally (otherwise None, with a one-line reason).

* Sample FID: the Fréchet distance between Inception-v3 pool features of held-out real images
  and of generated samples (`models.fid_inception`, `models.image_metrics.frechet_distance`). It
  is biased upward when either set is small (below ~2048 images the covariances are
  rank-deficient), so it is reported with its sample count and only compares runs at equal N.
* CLIP score: 100 × the mean over samples of max(cos, 0) between the OpenCLIP image embedding of
  a sample and the text embedding of its prompt — torchmetrics' CLIPScore. Hessel et al. 2021's
  CLIP-S is the same with weight 2.5 instead of 100.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

import torch
from PIL import Image
from torch import nn

from data_pipeline.images import to_tensor
from models.image_metrics import GaussianStats, frechet_distance

from lab.ae_eval import optional_inception
from trainer.core.config import ConfigError

CLIP_WEIGHT = 100.0  # torchmetrics' scale (Hessel et al.'s CLIP-S uses 2.5)


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """100 × mean max(cos, 0) over rows: row i of `image_emb` (N, D) against row i of `text_emb`."""
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape or image_emb.shape[0] == 0:
        raise ValueError(f"image and text embeddings must both be (N, D) with N >= 1, got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    cos = torch.nn.functional.cosine_similarity(image_emb.double(), text_emb.double(), dim=1)
    return CLIP_WEIGHT * float(cos.clamp(min=0).mean())


def sample_clip_score(clip, images: list[Image.Image], prompts: list[str]) -> float:
    """CLIP score of `images` against their `prompts` (one prompt per image) with a
    `models.clip_score.ClipEmbedder`."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts: one prompt per image")
    return clip_score(clip.embed_images(images), clip.embed_texts(prompts))


@torch.no_grad()
def feature_stats(inception: nn.Module, batches: Iterable[torch.Tensor], device) -> GaussianStats:
    """Running mean and covariance of `inception` features of image batches in [-1, 1]."""
    stats = GaussianStats()
    for x in batches:
        stats.update(inception(x.to(device).float()))
    return stats


def sample_fid(real: GaussianStats, fake: GaussianStats) -> float | None:
    """Fréchet distance of two feature sets; None when either has fewer than 2 images."""
    if real.n < 2 or fake.n < 2:
        return None
    return frechet_distance(*real.mean_cov(), *fake.mean_cov())


def check_clip_spec(spec: str, need_file: bool = False) -> None:
    """A one-line ConfigError naming `eval.clip_model` for a malformed spec, an unknown
    architecture or (need_file) a missing file — before any training, not after it."""
    from models.clip_score import parse_clip_spec

    if not spec:
        return
    try:
        model, path = parse_clip_spec(spec)
    except ValueError as e:
        raise ConfigError(f"eval.clip_model: {e}") from None
    for what, file in (("OpenCLIP architecture file", model if model.endswith(".json") else None),
                       ("CLIP weights file", path)):
        if need_file and file and not os.path.isfile(file):
            raise ConfigError(f"eval.clip_model: {what} not found: {file}")


class SampleQuality:
    """Sample FID and CLIP score of each space's samples. The networks, and the real images'
    Inception statistics (the same for every space), are made on first use, so a rerun whose
    samples stages are all done loads nothing."""

    def __init__(self, inception_weights: str, clip_model: str, real_batches: Callable[[], Iterable[torch.Tensor]],
                 device, batch_size: int = 64, say: Callable[[str], None] = print):
        self.inception_weights, self.clip_model = inception_weights, clip_model
        self.real_batches, self.device, self.batch_size, self.say = real_batches, device, batch_size, say
        self.loaded, self.inception, self.clip, self.real = False, None, None, None
        self.na: dict[str, str] = {}  # metric -> the one-line reason it is n/a

    def _load(self) -> None:
        if self.loaded:
            return
        self.loaded = True
        said: list[str] = []
        self.inception = optional_inception(self.inception_weights or None, said.append, metric="sample FID",
                                            option="eval.inception_weights")
        if self.inception is None:
            self.na["sample_fid"] = said[-1]
        else:
            self.inception = self.inception.to(self.device)
            self.real = feature_stats(self.inception, self.real_batches(), self.device)
        if self.clip_model:
            from models.clip_score import load_clip

            self.clip = load_clip(self.clip_model, self.device)  # a bad file is an error: the user asked for it
        else:
            self.na["clip_score"] = "CLIP score: n/a (no CLIP model): eval.clip_model is empty"
        for line in self.na.values():
            self.say(line)

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> dict:
        """{sample_fid, fid_samples, fid_real_images, clip_score, clip_samples, na} of `images`
        (PIL, one per prompt in `prompts`)."""
        self._load()
        out = {"sample_fid": None, "fid_samples": 0, "fid_real_images": 0, "clip_score": None, "clip_samples": 0,
               "inception": getattr(self.inception, "source", None), "clip_model": self.clip_model or None}
        if self.inception is not None:
            fake = feature_stats(self.inception, (torch.stack([to_tensor(im) for im in images[i: i + self.batch_size]])
                                                  for i in range(0, len(images), self.batch_size)), self.device)
            out.update(sample_fid=sample_fid(self.real, fake), fid_samples=fake.n, fid_real_images=self.real.n)
            if out["sample_fid"] is None:
                self.na["sample_fid"] = (f"sample FID: n/a (too few images): {fake.n} samples and {self.real.n} "
                                         "held-out images; a covariance needs 2 of each")
        if self.clip is not None:
            out.update(clip_score=sample_clip_score(self.clip, images, prompts), clip_samples=len(images))
        out["na"] = {k: v for k, v in self.na.items() if out[k] is None}
        return out
