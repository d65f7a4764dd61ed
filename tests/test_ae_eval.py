"""Autoencoder evaluation: metric values against closed forms, and the launcher end to end."""
import json
import math
import os
import runpy
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from models.autoencoder import build_autoencoder
from models.fid_inception import build_inception, load_inception
from models.image_metrics import (SSIM_K1, SSIM_K2, GaussianStats, frechet_distance, hf_energy_ratio, psnr,
                                  ssim)
from lab.ae_eval import evaluate, markdown_table, save_recon_grid


def _noise_image(seed: int = 0, size_px: int = 64) -> torch.Tensor:
    return torch.rand(2, 3, size_px, size_px, generator=torch.Generator().manual_seed(seed))


def _gaussian_blur(x: torch.Tensor, sigma_px: float) -> torch.Tensor:
    k = torch.arange(-4, 5, dtype=torch.float32)
    g = torch.exp(-k ** 2 / (2 * sigma_px ** 2))
    g = (g / g.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (4, 4, 0, 0), mode="circular"), g, groups=3)
    return F.conv2d(F.pad(x, (0, 0, 4, 4), mode="circular"), g.transpose(2, 3), groups=3)


def test_psnr_is_inf_for_identical_images_and_analytic_for_known_noise():
    x = _noise_image()
    assert torch.isinf(psnr(x, x)).all()
    sigma = 0.05  # +-sigma on a checkerboard: MSE = sigma^2 exactly
    signs = (torch.arange(64).view(-1, 1) + torch.arange(64).view(1, -1)) % 2 * 2 - 1
    y = torch.full_like(x, 0.5) + sigma * signs
    torch.testing.assert_close(psnr(torch.full_like(x, 0.5), y), torch.full((2,), -20 * math.log10(sigma)))


def test_ssim_is_one_for_identical_images_falls_with_noise_and_matches_constant_images():
    x = _noise_image()
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    g = torch.Generator().manual_seed(1)
    scores = [float(ssim(x, (x + s * torch.randn(x.shape, generator=g)).clamp(0, 1)).mean()) for s in (0.02, 0.1, 0.3)]
    assert 1 > scores[0] > scores[1] > scores[2]
    a, b = 0.3, 0.7  # constant images: variances and covariance vanish, leaving the luminance term
    c1 = SSIM_K1 ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert SSIM_K2 == 0.03


def test_hf_energy_ratio_is_one_for_identity_below_half_when_blurred_above_one_when_sharpened():
    x = _noise_image()
    assert hf_energy_ratio(x, x) == pytest.approx(1.0)
    blurred = _gaussian_blur(x, 1.0)
    assert hf_energy_ratio(x, blurred) < 0.5
    sharpened = x + 1.0 * (x - blurred)  # unsharp mask
    assert hf_energy_ratio(x, sharpened) > 1.0


def test_frechet_distance_zero_for_identical_stats_and_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 8))
    stats = GaussianStats(8)
    stats.update(feats[:120])
    stats.update(torch.from_numpy(feats[120:]))
    mu, cov = stats.mean_cov()
    np.testing.assert_allclose(cov, np.cov(feats, rowvar=False), atol=1e-10)
    for method in ("scipy", "eigh"):
        assert frechet_distance(mu, cov, mu, cov, method=method) == pytest.approx(0.0, abs=1e-8)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    d1, d2 = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    for method in ("auto", "scipy", "eigh"):
        assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2), method=method) == pytest.approx(closed, rel=1e-9)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))  # full covariances: both methods agree
    s1, s2 = a @ a.T, b @ b.T
    assert frechet_distance(mu1[:1].repeat(6), s1, mu2[:1].repeat(6), s2, method="eigh") == pytest.approx(
        frechet_distance(mu1[:1].repeat(6), s1, mu2[:1].repeat(6), s2, method="scipy"), rel=1e-6)


class _IdentityAE(torch.nn.Module):
    """Encodes to the image itself: every metric at its perfect value."""

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x, std=torch.zeros_like(x)))

    def decode(self, z):
        return SimpleNamespace(sample=z)


def test_evaluate_scores_a_perfect_autoencoder_perfectly_and_a_blurring_one_lower(tmp_path):
    class BlurAE(_IdentityAE):
        def decode(self, z):
            return SimpleNamespace(sample=_gaussian_blur(z, 1.0))

    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 32))  # stands in for Inception
    batches = [torch.rand(8, 3, 16, 16) * 2 - 1 for _ in range(3)]
    res = evaluate({"identity": _IdentityAE(), "blur": BlurAE()}, batches, inception=features)
    perfect, blur = res["identity"], res["blur"]
    assert perfect["num_images"] == 24 and math.isinf(perfect["psnr_db"]) and perfect["lpips"] is None
    assert perfect["ssim"] == pytest.approx(1.0) and perfect["hf_energy_ratio"] == pytest.approx(1.0)
    assert perfect["rfid"] == pytest.approx(0.0, abs=1e-6) and perfect["compression_numbers"] == 1.0
    assert blur["psnr_db"] < 30 and blur["ssim"] < 1 and blur["hf_energy_ratio"] < 0.5 and blur["rfid"] > 0
    table = markdown_table(res)
    assert "| identity | inf | 1.0000 | n/a (no LPIPS weights) | 0.00 |" in table
    grid = save_recon_grid(batches[0][:2], {"identity": batches[0][:2], "blur": _gaussian_blur(batches[0][:2], 1.0)},
                           str(tmp_path / "grid.png"))
    from PIL import Image

    assert Image.open(grid).size == (3 * 128 + 2 * 2, 20 + 2 * (2 * 128 + 2 + 8) - 8)


def test_inception_loads_the_fid_variant_from_a_file(tmp_path):
    torch.manual_seed(0)
    torch.save(build_inception(fid_variant=True).state_dict(), tmp_path / "pt_inception.pth")
    net = load_inception(str(tmp_path / "pt_inception.pth"))
    assert type(net.net.Mixed_7c).__name__ == "_FIDInceptionE2"
    feats = net.net(torch.rand(1, 3, 75, 75) * 2 - 1)  # Inception's smallest input; forward() resizes to 299
    assert feats.shape == (1, 2048) and torch.isfinite(feats).all()
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_inception(str(tmp_path / "missing.pth"))


def _launch(monkeypatch, args: list[str]) -> None:
    """Run launch/eval_autoencoder.py as __main__ in this process (a subprocess would spend
    most of its time importing torch and diffusers again)."""
    monkeypatch.setattr(sys, "argv", ["launch/eval_autoencoder.py", *args])
    runpy.run_path(os.path.join(ROOT, "launch", "eval_autoencoder.py"), run_name="__main__")


def test_launcher_compares_kl_and_vq_models_on_shards(tiny_shards, tmp_path, monkeypatch, capsys):
    build_autoencoder("tiny", seed=0).save_pretrained(tmp_path / "a" / "export")
    build_autoencoder("tiny", seed=1).save_pretrained(tmp_path / "b")
    build_autoencoder("vq_tiny").save_pretrained(tmp_path / "vq")  # a VQModel, 64 codes
    out = tmp_path / "eval"
    missing = tmp_path / "no_inception.pth"
    _launch(monkeypatch, ["--model", str(tmp_path / "a" / "export"), "--model", f"seed1={tmp_path / 'b'}",
                          "--model", str(tmp_path / "vq"), "--data", tiny_shards, "--resolution", "16", "--limit", "12",
                          "--batch", "8", "--out", str(out), "--lpips-weights", "random",
                          "--inception-weights", str(missing), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert f"rFID: n/a (no Inception weights): Inception weights file not found: {missing}" in printed
    assert "| a/export |" in printed and "| seed1 |" in printed and "| vq |" in printed
    assert "n/a (no Inception weights)" in printed
    report = json.loads((out / "metrics.json").read_text())
    assert report["images"] == 12 and report["inception"] is None
    kl, vq = report["models"]["a/export"], report["models"]["vq"]
    assert kl["kind"] == "AutoencoderKL" and kl["compression_numbers"] == 12.0 and kl["bits_per_position"] is None
    assert (kl["latent_channels"], kl["latent_height"], kl["latent_width"]) == (4, 4, 4)
    assert vq["kind"] == "VQModel" and vq["bits_per_position"] == 6.0
    assert vq["compression_bits"] == pytest.approx(24 * 16 * 16 / (4 * 4 * 6))
    for m in report["models"].values():
        assert m["rfid"] is None and 0 <= m["ssim"] <= 1 and m["lpips"] > 0 and m["hf_energy_ratio"] > 0
    assert "| seed1 |" in (out / "metrics.md").read_text()
    assert (out / "recon_grid.png").stat().st_size > 0


def test_bad_model_path_is_one_line(tiny_shards, tmp_path, monkeypatch):
    # sys.exit(str) is how the launcher ends on bad input: Python prints the string, no traceback
    with pytest.raises(SystemExit) as exit_info:
        _launch(monkeypatch, ["--model", str(tmp_path / "nowhere"), "--data", tiny_shards, "--resolution", "16",
                              "--out", str(tmp_path / "eval")])
    assert exit_info.value.code == f"error: autoencoder path {tmp_path / 'nowhere'} does not exist"
    assert not (tmp_path / "eval").exists()
