"""Run logs (wandb ids, the live loss curve) and what sampling writes (grids, full-size images,
negative prompts)."""
import json
import os
import runpy
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from models.autoencoder import load_autoencoder
from models.text_encoder import load_text_encoder
from models.unet import build_unet
from trainer.core.config import ConfigError
from trainer.core.data import ShardData
from trainer.core.metrics import WANDB_ID_FILE, RunLog, read_log
from data_pipeline.latents import FORMAT_VERSION
from trainer.cache.manifest import LatentStats, Manifest, TextEncoderRecord, VaeRecord
from trainer.unet.sampling import sample_rows, save_grid
from trainer.unet.job import UNetJob


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """wandb in offline mode with its own config and cache folders: no network, nothing in ~."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))


def _wandb_id(run_dir) -> str:
    log = RunLog(str(run_dir), True, wandb_mode="offline")
    run_id = log.wandb.id
    log.log(1, loss=1.0)
    log.close()
    return run_id


def test_runs_with_the_same_directory_name_get_their_own_wandb_run(tmp_path, wandb_offline):
    """runs/a/unet and runs/b/unet must not merge into one wandb run (the id used to be the
    directory's name, with resume="allow"); reopening a run keeps its id, also after a move."""
    a, b = tmp_path / "runs" / "a" / "unet", tmp_path / "runs" / "b" / "unet"
    id_a, id_b = _wandb_id(a), _wandb_id(b)
    assert id_a != id_b
    assert _wandb_id(a) == id_a  # resume: the same wandb run
    assert (a / WANDB_ID_FILE).read_text().strip() == id_a
    moved = tmp_path / "elsewhere" / "unet"
    os.renames(a, moved)
    assert _wandb_id(moved) == id_a  # a moved run is still the same run


def test_a_run_from_before_the_id_file_keeps_its_wandb_history(tmp_path, wandb_offline):
    run_dir = tmp_path / "old" / "unet"
    (run_dir / "wandb" / "offline-run-20250101_000000-unet").mkdir(parents=True)
    assert _wandb_id(run_dir) == "unet"
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == "unet"


def test_a_bad_wandb_id_file_is_a_one_line_error_naming_it(tmp_path, wandb_offline):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / WANDB_ID_FILE).write_bytes(b"../../etc\nrm -rf /")
    with pytest.raises(ValueError) as e:
        RunLog(str(run_dir), True, wandb_mode="offline")
    assert str(run_dir / WANDB_ID_FILE) in str(e.value) and "\n" not in str(e.value)


def test_loss_png_is_redrawn_during_the_run_with_lr_and_grad_norm(tmp_path):
    """loss.png used to appear only when a run ended; now every log call may redraw it (at
    most every plot_every_s), with the learning rate and gradient norm in their own panels."""
    log = RunLog(str(tmp_path), True, plot_every_s=0)
    log.log(1, samples=8, loss=1.0, lr=1e-4, grad_norm=3.0)
    png = tmp_path / "loss.png"
    assert png.exists()
    one_panel = RunLog(str(tmp_path / "loss_only"), True, plot_every_s=0)
    one_panel.log(1, samples=8, loss=1.0)
    # Three panels (loss, learning rate, gradient norm) make a taller figure than one.
    assert Image.open(png).size[1] > 1.5 * Image.open(tmp_path / "loss_only" / "loss.png").size[1]
    before = png.read_bytes()
    log.log(2, samples=16, loss=0.5, lr=2e-4, grad_norm=2.0)
    assert png.read_bytes() != before


def test_the_loss_curve_costs_one_drawing_per_interval_not_per_log(tmp_path):
    log = RunLog(str(tmp_path), True, plot_every_s=3600)
    for step in range(1, 501):
        log.log(step, samples=8 * step, loss=1.0 / step, lr=1e-4, grad_norm=None)
    assert log.plots == 0  # nothing in the first hour: the first drawing comes an interval after the start
    log.close()
    assert log.plots == 1 and len(read_log(str(tmp_path / "log.jsonl"))) == 500


def test_a_resumed_log_keeps_its_history_and_survives_a_torn_last_line(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 11)) + '{"step": 11, "lo')
    log = RunLog(str(tmp_path), True, resume_step=8, plot_every_s=0)
    assert [r["step"] for r in log.history] == list(range(1, 9))
    assert "skipped 1 line(s)" in capsys.readouterr().out
    log.log(9, loss=0.1)
    assert [r["step"] for r in read_log(str(path))] == list(range(1, 10))


def _stripes(size: int) -> Image.Image:
    """One-pixel black and white stripes: nearest-neighbour shrinking aliases them to one colour."""
    arr = np.zeros((size, size, 3), np.uint8)
    arr[:, ::2] = 255
    return Image.fromarray(arr)


def test_grid_tiles_are_filtered_and_every_image_is_also_saved_at_full_size(tmp_path):
    big, small = _stripes(512), Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8))
    out = tmp_path / "samples" / "step_000000010.png"
    save_grid([[big, small]], ["a prompt"], str(out), tile=128)
    canvas = np.asarray(Image.open(out).convert("RGB")).astype(float)
    tile = canvas[16:16 + 128, :128]  # below the 16-px label row
    # The stripes average to grey when shrunk with a filter; nearest-neighbour gave solid black or white.
    assert abs(tile.mean() - 127.5) < 10 and tile.std() < 30
    # A small image is enlarged pixel for pixel (each source pixel an 8x8 block).
    enlarged = canvas[16:16 + 128, 128:256].astype(np.uint8)
    assert (enlarged == np.asarray(small).repeat(8, 0).repeat(8, 1)).all()
    folder = tmp_path / "samples" / "step_000000010"
    assert sorted(os.listdir(folder)) == ["p000_000.png", "p000_001.png", "prompts.json"]
    assert (np.asarray(Image.open(folder / "p000_000.png")) == np.asarray(big)).all()
    assert Image.open(folder / "p000_001.png").size == (16, 16)
    assert json.loads((folder / "prompts.json").read_text()) == ["a prompt"]
    # Rewritten with fewer images: the earlier call's extra image does not linger; other files stay.
    (folder / "notes.txt").write_text("mine")
    save_grid([[small]], ["another"], str(out), tile=128)
    assert sorted(os.listdir(folder)) == ["notes.txt", "p000_000.png", "prompts.json"]


def test_a_negative_prompt_takes_the_place_of_the_unconditional_caption():
    """eps = n + g * (c - n): at g = 0 only the negative prompt's prediction is left, which must
    be exactly what g = 1 (the prompt alone) gives for that caption as the prompt."""
    text_encoder = load_text_encoder("tiny")
    width = text_encoder.encode(["x"]).shape[-1]
    unet = build_unet("tiny", 3, 8, width, seed=0).eval()
    vae = load_autoencoder("identity")
    manifest = Manifest(format_version=FORMAT_VERSION, num_samples=0, num_quarantined=0, shards=(), resolution=8,
                        crop="center", flip=False, latent_shape=(3, 8, 8), moments_dtype="float16",
                        text_emb_shape=(77, width), text_emb_dtype="float16", text="embeddings",
                        latent_channel_stats=LatentStats((), ()), vae=VaeRecord("identity", "identity", 1.0, 1),
                        text_encoder=TextEncoderRecord("tiny", "last", text_encoder.identity()))
    cfg = UNetJob(data=ShardData(urls="unused"))
    args = dict(per_prompt=2, steps=2, seed=3)
    negative = sample_rows(unet, vae, text_encoder, manifest, cfg, ["a red circle"], guidance=0.0,
                           negative_prompt="a blue square", **args)
    as_prompt = sample_rows(unet, vae, text_encoder, manifest, cfg, ["a blue square"], guidance=1.0, **args)
    plain = sample_rows(unet, vae, text_encoder, manifest, cfg, ["a red circle"], guidance=0.0, **args)
    px = lambda rows: np.stack([np.asarray(im) for im in rows[0]]).astype(int)  # noqa: E731
    assert np.abs(px(negative) - px(as_prompt)).max() <= 1  # 8-bit rounding of the same tensors
    assert np.abs(px(negative) - px(plain)).max() > 1  # and not the empty caption's


@pytest.mark.parametrize("guidance,negative,message", [
    (-1.0, "", "validation_guidance must be a finite number >= 0, got -1.0"),
    (float("nan"), "", "validation_guidance must be a finite number >= 0, got nan"),
    (1.0, "blurry", "validation_negative_prompt 'blurry' needs validation_guidance > 1 (got 1.0)"),
    (0.0, "blurry", "validation_negative_prompt 'blurry' needs validation_guidance > 1 (got 0.0)"),
])
def test_validation_guidance_settings_are_checked(guidance, negative, message):
    cfg = UNetJob(data=ShardData(urls="cache"), validation_guidance=guidance, validation_negative_prompt=negative)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg.validate()


def test_validation_guidance_settings_that_mean_something_are_accepted():
    for guidance, negative in ((0.0, ""), (1.0, ""), (7.5, "blurry, low quality")):
        UNetJob(data=ShardData(urls="cache"), validation_guidance=guidance, validation_negative_prompt=negative).validate()


def test_sample_cli_takes_a_negative_prompt_and_refuses_one_that_cannot_act(tmp_path, monkeypatch):
    # launch/sample.py as its own __main__, in this process (its imports are loaded already).
    monkeypatch.setattr(sys, "argv", ["sample.py", "--run", str(tmp_path / "no_run"), "--prompt", "a red circle",
                                      "--negative-prompt", "blurry", "--guidance", "1"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "launch", "sample.py"), run_name="__main__")
    assert e.value.code == ("error: --negative-prompt 'blurry' needs --guidance > 1 (got 1.0): at 1 it is ignored, "
                            "below 1 samples move towards it")
