"""Sample quality without a caption classifier (lab/sample_quality.py, models/clip_score.py):
the CLIP score formula, the OpenCLIP loading path, and sample FID's plumbing.

No weights can be downloaded here, so the CLIP model is a tiny OpenCLIP architecture with random
weights, written to a file and loaded back through the real path; the scores it gives are not
meaningful, only their shapes and ranges are checked. Sample FID uses a cheap stand-in feature
extractor: the Inception network itself is covered by test_ae_eval.py.
"""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from torch import nn

from models.clip_score import load_clip, parse_clip_spec, save_tiny_clip
from trainer.core.config import ConfigError
from lab.sample_quality import (SampleQuality, check_clip_spec, clip_score, feature_stats, sample_clip_score,
                                sample_fid)


@pytest.fixture(scope="module")
def tiny_clip_spec(tmp_path_factory):
    return save_tiny_clip(str(tmp_path_factory.mktemp("clip")))


def _images(n: int, seed: int = 0, px: int = 16) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (px, px, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(n)]


def test_clip_score_of_identical_embeddings_is_100_and_shapes_are_checked():
    e = torch.randn(5, 8)
    assert clip_score(e, e) == pytest.approx(100.0)
    assert clip_score(e, 3 * e) == pytest.approx(100.0)  # cosine: the scale does not matter
    assert clip_score(e, -e) == 0.0  # max(cos, 0), as torchmetrics' CLIPScore
    a, b = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert clip_score(a, b) == pytest.approx(100 * (1 + math.sqrt(0.5)) / 2)  # the mean over rows
    for x, y in ((e, e[:4]), (e, torch.randn(5, 7)), (e[0], e[0]), (e[:0], e[:0])):
        with pytest.raises(ValueError, match="embeddings must both be"):
            clip_score(x, y)


def test_tiny_clip_loads_from_a_file_and_scores_images(tiny_clip_spec):
    clip = load_clip(tiny_clip_spec)
    images, prompts = _images(3), ["a red circle", "a blue square", "a dog"]
    img, txt = clip.embed_images(images, batch_size=2), clip.embed_texts(prompts, batch_size=2)
    assert img.shape == txt.shape == (3, 16)
    assert torch.allclose(img.norm(dim=1), torch.ones(3), atol=1e-5)
    again = load_clip(tiny_clip_spec).embed_texts(prompts)  # the weights come from the file, not the seed
    assert torch.allclose(txt, again)
    value = sample_clip_score(clip, images, prompts)
    assert 0.0 <= value <= 100.0  # random weights: the value itself means nothing
    with pytest.raises(ValueError, match="one prompt per image"):
        sample_clip_score(clip, images, prompts[:2])


def test_clip_spec_errors_are_one_line_and_name_the_file(tmp_path, tiny_clip_spec):
    arch, _ = parse_clip_spec(tiny_clip_spec)
    missing = tmp_path / "missing.bin"
    with pytest.raises(FileNotFoundError, match=f"CLIP weights file not found: {missing}"):
        load_clip(f"{arch}:{missing}")
    with pytest.raises(ConfigError, match=f"^eval.clip_model: CLIP weights file not found: {missing}$"):
        check_clip_spec(f"ViT-B-32:{missing}", need_file=True)
    check_clip_spec(f"ViT-B-32:{missing}")  # the form alone: what --dry-run checks
    for bad, why in (("ViT-B-32", "expected MODEL:PATH"), ("NoSuchNet:/x.bin", "unknown OpenCLIP architecture")):
        with pytest.raises(ConfigError, match=f"eval.clip_model: {why}"):
            check_clip_spec(bad)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(FileNotFoundError, match=f"cannot load CLIP weights {garbage}") as e:
        load_clip(f"{arch}:{garbage}")
    assert "\n" not in str(e.value)


class _MeanColour(nn.Module):
    """A stand-in for Inception: per-channel means and standard deviations (6 features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)


def test_sample_fid_is_zero_for_the_same_images_and_grows_with_a_shift():
    x = torch.rand(64, 3, 8, 8) * 2 - 1
    net = _MeanColour()
    real = feature_stats(net, x.split(16), "cpu")
    assert real.n == 64
    assert sample_fid(real, feature_stats(net, [x], "cpu")) == pytest.approx(0.0, abs=1e-8)
    assert sample_fid(real, feature_stats(net, [(x + 0.5).clamp(-1, 1)], "cpu")) > 0.05
    assert sample_fid(real, feature_stats(net, [x[:1]], "cpu")) is None  # a covariance needs 2


def test_sample_quality_without_weights_is_na_with_reasons(tmp_path):
    missing = tmp_path / "no_inception.pth"
    said: list[str] = []
    quality = SampleQuality(str(missing), "", lambda: pytest.fail("no Inception: real images are not read"), "cpu",
                            say=said.append)
    out = quality(_images(4), ["a"] * 4)
    assert out["sample_fid"] is None and out["clip_score"] is None
    assert out["na"]["sample_fid"].startswith("sample FID: n/a (no Inception weights)")
    assert str(missing) in out["na"]["sample_fid"]
    assert out["na"]["clip_score"] == "CLIP score: n/a (no CLIP model): eval.clip_model is empty"
    assert said == list(out["na"].values())  # said once, on first use


def test_sample_quality_with_features_and_clip(tiny_clip_spec, monkeypatch):
    """The plumbing with networks present: the real images' statistics once, FID and CLIP
    score per call."""
    import lab.sample_quality as sq

    monkeypatch.setattr(sq, "optional_inception", lambda weights, say, **kw: _MeanColour())  # Inception stand-in
    reads = []
    real = torch.rand(8, 3, 16, 16) * 2 - 1

    def real_batches():
        reads.append(1)
        return real.split(4)

    quality = SampleQuality("", tiny_clip_spec, real_batches, "cpu", batch_size=3, say=pytest.fail)
    images = _images(5, seed=1)
    out = quality(images, ["a red circle"] * 5)
    again = quality(images, ["a red circle"] * 5)
    assert len(reads) == 1 and out == again
    assert out["fid_samples"] == 5 and out["fid_real_images"] == 8 and out["sample_fid"] > 0
    assert 0.0 <= out["clip_score"] <= 100.0 and out["clip_samples"] == 5 and out["na"] == {}
    assert out["clip_model"] == tiny_clip_spec
