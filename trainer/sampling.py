"""Generate images from a trained run: text -> UNet in latent space -> frozen VAE decoder."""
from __future__ import annotations

import os

import torch
from diffusers import UNet2DConditionModel
from PIL import Image, ImageDraw

from data_pipeline.images import grid, to_pil
from data_pipeline.latents import latent_affine, read_manifest
from models.autoencoder import autoencoder_identity, load_autoencoder
from models.diffusion import noise_schedule, sample_latents

from . import checkpoint
from . import config as config_lib
from .unet import UNetJob, load_cache_text_encoder


def load_run(run_dir: str):
    """(UNet, VAE, text encoder, run config, cache manifest) of a run's newest complete checkpoint.

    The VAE and text encoder are the ones the latent cache was made with; their identity
    is checked against the cache manifest so a swapped folder cannot decode garbage.
    """
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a train_unet run directory?")
    cfg = config_lib.load_config(UNetJob, path)
    ckpt = checkpoint.latest(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint yet")
    manifest = read_manifest(cfg.data.urls, cfg.data.endpoint_url)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(ckpt, "unet")).eval()
    vae = load_autoencoder(manifest["vae"]["source"])
    if autoencoder_identity(vae) != manifest["vae"]["identity"]:
        raise config_lib.ConfigError(f"the autoencoder at {manifest['vae']['source']} is not the one the cache "
                                     f"{cfg.data.urls} was made with")
    text_encoder = load_cache_text_encoder(manifest)
    return unet, vae, text_encoder, cfg, manifest


@torch.no_grad()
def generate(run_dir: str, prompts: list[str], *, per_prompt: int = 4, guidance: float = 5.0, steps: int = 50,
             sampler: str = "ddim", seed: int = 0) -> list[list[Image.Image]]:
    unet, vae, text_encoder, cfg, manifest = load_run(run_dir)
    shift, scale = latent_affine(manifest, cfg.latent_norm)  # the model's latents are (z - shift) * scale
    schedule = noise_schedule(cfg.prediction_type)
    rows = []
    for i, prompt in enumerate(prompts):
        context = text_encoder.encode([prompt] * per_prompt)
        uncond = text_encoder.encode([""])
        gen = torch.Generator().manual_seed(seed + i)
        z = sample_latents(unet, context, uncond, dict(schedule.config), steps=steps, guidance=guidance,
                           sampler=sampler, generator=gen)
        images = vae.decode(z / scale + shift).sample
        rows.append([to_pil(x) for x in images])
    return rows


def save_grid(rows: list[list[Image.Image]], prompts: list[str], out: str, tile: int = 128) -> str:
    """One row per prompt, the prompt written above it; small images are enlarged with
    nearest-neighbour so that what the model drew is shown pixel for pixel."""
    tiles = [[im.resize((tile, tile), Image.Resampling.NEAREST) for im in row] for row in rows]
    label_h, cols = 16, max(len(r) for r in tiles)
    canvas = Image.new("RGB", (cols * tile, len(tiles) * (tile + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (row, prompt) in enumerate(zip(tiles, prompts)):
        y = r * (tile + label_h)
        draw.text((4, y + 2), prompt, fill=(0, 0, 0))
        canvas.paste(grid(row, cols), (0, y + label_h))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    canvas.save(out)
    return out
