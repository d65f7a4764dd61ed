"""The autoencoder lab (launch/compare_autoencoders.py): the tiny config end to end, on synthetic
data and on "real" data (the same shards given as data.urls: no caption classifier, CLIP score
from a tiny random-weight OpenCLIP model), rerun skips finished stages, --dry-run, and the
identity first stage (pixel space, LDM-1)."""
from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest
import torch

from conftest import PY, run_cmd, run_script

LAB = "launch/compare_autoencoders.py"
TINY = "configs/lab/tiny.yaml"
SPACES = ("kl_plain", "kl_gan", "vq_gan", "pixels")


def test_identity_first_stage_round_trips_exactly():
    from models.autoencoder import (IdentityAutoencoder, autoencoder_identity, downsample_factor, encode_moments,
                                    latent_channels, load_autoencoder)

    vae = load_autoencoder("identity")
    assert isinstance(vae, IdentityAutoencoder)
    assert (downsample_factor(vae), latent_channels(vae), vae.config.scaling_factor) == (1, 3, 1.0)
    assert autoencoder_identity(vae) == autoencoder_identity(load_autoencoder("identity"))
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    mean, std = encode_moments(vae, x)
    assert torch.equal(mean, x) and torch.equal(std, torch.zeros_like(x))
    assert torch.equal(vae.decode(mean).sample, x)


def test_dry_run_prints_config_and_bad_keys_fail(tmp_path, capfd):
    code, out, _ = run_script(LAB, ["--config", TINY, f"run_dir={tmp_path}/lab", "--dry-run"], capfd)
    assert code == 0 and f"run_dir: {tmp_path}/lab" in out and "unet:" in out
    assert not os.path.exists(tmp_path / "lab")  # nothing was run
    code, _, err = run_script(LAB, ["--config", TINY, "unet.overrides=[bogus=1]", "--dry-run"], capfd)
    assert code != 0 and "unknown config key 'bogus'" in err and "unet.overrides" in err
    code, _, err = run_script(LAB, ["--config", TINY, "sampling.sampler=euler", "--dry-run"], capfd)
    assert code != 0 and "sampling.sampler" in err


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lab") / "run"
    t0 = time.time()
    proc = run_cmd([PY, LAB, "--config", TINY, f"run_dir={run_dir}"], timeout=600)
    return str(run_dir), time.time() - t0, proc


def test_tiny_lab_writes_the_report(lab_run):
    run_dir, _, _ = lab_run
    report = open(os.path.join(run_dir, "report.md")).read()
    for heading in ("## Configuration", "## Reconstruction", "## Generation", "## Loss curves", "## What this shows"):
        assert heading in report
    for name in ("kl_plain", "kl_gan", "vq_gan"):
        assert re.search(rf"^\| {name} \| [0-9.]+ \| [0-9.]+ \|", report, re.M), name  # reconstruction row
    for space in SPACES:  # generation row: latent shape, GFLOP, images/s, loss, s/image, FID, CLIP, accuracies
        assert re.search(rf"^\| {space} \| \d+×\d+×\d+ \| [0-9.]+ \| \d+ \| [0-9.]+ \| [0-9.]+ \| "
                         r"n/a \(no Inception weights\) \| n/a \(no CLIP model\) \| [0-9.]+%", report, re.M), space
    assert "- CLIP score: n/a (no CLIP model): eval.clip_model is empty" in report
    assert "| pixels | 3×16×16 |" in report
    assert "random backbone" in report  # LPIPS had no ImageNet weights, and the report says so
    assert "n/a (no Inception weights)" in report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"eval/recon_grid.png", "unet_loss.png", "autoencoder_loss.png"} <= set(links)
    assert {f"samples_{s}.png" for s in SPACES} <= set(links)
    for link in links:
        assert os.path.getsize(os.path.join(run_dir, link)) > 0, link


def test_pixel_cache_holds_the_images_and_samples_decode(lab_run):
    """cache -> train -> sample on the identity first stage: the cached "latents" are the
    training images themselves (exact to 8 bits), the UNet trained and sampled on them."""
    from data_pipeline.images import image_and_caption
    from data_pipeline.latents import decode_sample
    from data_pipeline.shards import iter_samples
    from trainer.cache.manifest import Manifest

    run_dir, _, _ = lab_run
    cache = os.path.join(run_dir, "latents", "pixels")
    manifest = Manifest.read(cache)
    assert manifest.vae.source == "identity" and manifest.vae.scaling_factor == 1.0
    assert manifest.latent_shape == (3, 16, 16) and manifest.vae.downsample_factor == 1
    shard = manifest.shards[0]
    cached = {s["__key__"]: decode_sample(s) for s in iter_samples(os.path.join(cache, shard.shard))}
    images = {s["__key__"]: image_and_caption(s, 16)[0] for s in iter_samples(shard.source)}
    assert cached.keys() == images.keys()
    for key, x in images.items():
        z = cached[key]["mean"].float()
        assert torch.equal(z.add(1).mul(127.5).round(), x.add(1).mul(127.5).round()), key
        assert torch.count_nonzero(cached[key]["std"]) == 0
    with open(os.path.join(run_dir, "stages", "samples_pixels.json")) as f:
        assert json.load(f)["accuracy"] is not None  # samples were drawn and scored
    assert os.path.exists(os.path.join(run_dir, "unets", "pixels", "loss.png"))


def test_rerun_skips_finished_stages(lab_run, capfd):
    run_dir, first_s, _ = lab_run
    t0 = time.time()
    proc = run_cmd([PY, LAB, "--config", TINY, f"run_dir={run_dir}"])
    again_s = time.time() - t0
    skipped = re.findall(r"\[lab\] (\S+): done before, skipped", proc.stdout)
    assert len(skipped) == 19 and "unet_pixels" in skipped, proc.stdout[-2000:]
    assert " ..." not in proc.stdout  # no stage ran again
    assert again_s < max(30.0, first_s / 2), (again_s, first_s)
    code, _, err = run_script(LAB, ["--config", TINY, f"run_dir={run_dir}", "unet.lr=0.01"], capfd)
    assert code != 0 and "holds a different config" in err


@pytest.fixture(scope="module")
def real_data_run(lab_run, tmp_path_factory):
    """The tiny lab on "real" data: the synthetic run's shards given as data.urls, with a tiny
    OpenCLIP model of random weights for the CLIP score (its values are not meaningful) and no
    Inception weights. Its first stages are the synthetic run's exports, and its caches and UNets
    that run's stage results (the same shards, exports and settings would give the same ones): the
    real-data branch (reconstruction, sampling, scoring, report) runs in seconds instead of
    retraining four UNets."""
    from models.clip_score import save_tiny_clip

    synthetic_dir = lab_run[0]
    spec = save_tiny_clip(str(tmp_path_factory.mktemp("clip")))
    run_dir = str(tmp_path_factory.mktemp("lab_real") / "run")
    os.makedirs(os.path.join(run_dir, "stages"))
    for space in SPACES:
        for stage in (f"cache_{space}", f"unet_{space}"):
            shutil.copy(os.path.join(synthetic_dir, "stages", f"{stage}.json"), os.path.join(run_dir, "stages"))
    exports = [f"models.{n}={synthetic_dir}/autoencoders/{n}/export" for n in SPACES[:3]]
    run_cmd([PY, LAB, "--config", TINY, f"run_dir={run_dir}", f"data.urls={synthetic_dir}/data/train",
             f"data.heldout_urls={synthetic_dir}/data/heldout", *exports, f"eval.clip_model={spec}",
             "sampling.prompts=[a red circle on a white background, a blue square]"], timeout=600)
    return run_dir


def test_real_data_lab_reports_clip_score_without_a_classifier(real_data_run):
    report = open(os.path.join(real_data_run, "report.md")).read()
    assert not os.path.exists(os.path.join(real_data_run, "stages", "classifier.json"))
    for space in SPACES:  # ... s/image | sample FID n/a | a CLIP score | no caption accuracy
        assert re.search(rf"^\| {space} \| .* \| n/a \(no Inception weights\) \| [0-9]+\.[0-9]{{2}} \| "
                         r"n/a \(real data: no caption classifier\) \|$", report, re.M), space
        with open(os.path.join(real_data_run, "stages", f"samples_{space}.json")) as f:
            samples = json.load(f)
        assert samples["clip_samples"] == 4 and 0 <= samples["clip_score"] <= 100 and samples["accuracy"] is None
    assert "- CLIP score: 100 × the mean of max(cos, 0)" in report and "not a measurement" in report
    assert re.search(r"^- sample FID: n/a \(no Inception weights\): .*(not found|neither)", report, re.M)
