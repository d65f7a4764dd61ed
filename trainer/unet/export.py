"""Export a trained run as a self-contained diffusers-format folder.

    OUT/unet/        the UNet of the newest complete checkpoint: its EMA weights where the run kept
                     an EMA, else the trained weights (safetensors; gathered under ZeRO-3)
    OUT/scheduler/   the training noise schedule (DDPMScheduler config; any diffusers sampler loads it)
    OUT/vae/         the frozen autoencoder, copied when it is a local folder
    OUT/ldm.json     what else a pipeline needs: text encoder spec and identity, prediction type,
                     how latents were normalised, and the cache's VAE identity and scaling factor
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

from models.diffusion import noise_schedule

from trainer.core.checkpoint import default_root, latest
from trainer.unet.sampling import load_run


def export_run(run_dir: str, out: str, weights: str = "ema") -> str:
    unet, vae, text_encoder, cfg, manifest = load_run(run_dir, weights)
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"export folder {out} is not empty; choose a new one")
    unet.save_pretrained(os.path.join(out, "unet"), safe_serialization=True)
    noise_schedule(cfg.prediction_type, zero_terminal_snr=cfg.zero_terminal_snr).save_pretrained(os.path.join(out, "scheduler"))
    source = manifest.vae.source
    if os.path.isdir(source):
        shutil.copytree(source, os.path.join(out, "vae"))
    shift, scale = manifest.latent_affine(cfg.latent_norm)
    info = {
        "checkpoint": latest(cfg.checkpoint_url or default_root(run_dir), cfg.checkpoint_endpoint_url),
        "weights": "ema" if weights == "ema" and cfg.ema_halflife_samples else "raw",
        "prediction_type": cfg.prediction_type,
        "latent_norm": {"kind": cfg.latent_norm, "shift": shift.flatten().tolist(), "scale": scale.flatten().tolist()},
        "vae": {**dataclasses.asdict(manifest.vae), "folder": "vae" if os.path.isdir(source) else None},
        "text_encoder": dataclasses.asdict(manifest.text_encoder),
        "resolution": manifest.resolution,
    }
    with open(os.path.join(out, "ldm.json"), "w") as f:
        json.dump(info, f, indent=1)
    return out
