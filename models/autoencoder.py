"""The first stage: diffusers' AutoencoderKL, built from a preset or loaded frozen.

A trained autoencoder travels as a diffusers-format folder (config.json plus
diffusion_pytorch_model.safetensors); its `scaling_factor` (1 / std of its latents, as in
the latent-diffusion paper) travels in that config and on to the latent cache.
"""
from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKL

from .identity import model_identity

# Architecture presets. "tiny" exists for unit tests; "demo" is the CPU demo's f=4
# autoencoder; "sd" is Stable Diffusion's f=8 architecture (random weights: train it, or
# load a pretrained copy by path instead).
PRESETS = {
    "tiny": dict(block_out_channels=(16, 32, 32), norm_num_groups=8, layers_per_block=1),
    "demo": dict(block_out_channels=(32, 64, 64), norm_num_groups=16, layers_per_block=1),
    "f8": dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=16, layers_per_block=1),
    "sd": dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2,
               scaling_factor=0.18215),
}


def build_autoencoder(preset: str, latent_channels: int = 4, seed: int = 0) -> AutoencoderKL:
    """A freshly initialised AutoencoderKL of a named architecture (deterministic by seed)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown autoencoder preset '{preset}'; presets: {', '.join(PRESETS)}")
    cfg = dict(PRESETS[preset])
    n = len(cfg["block_out_channels"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                             down_block_types=("DownEncoderBlock2D",) * n,
                             up_block_types=("UpDecoderBlock2D",) * n, **cfg)


def load_autoencoder(source: str) -> AutoencoderKL:
    """Load a frozen AutoencoderKL: `preset:NAME` (random weights, tests only), a local
    diffusers folder, or a hub id such as `stabilityai/sd-vae-ft-mse` (needs network or
    the hub cache). Missing files give one line naming them."""
    if source.startswith("preset:"):
        model = build_autoencoder(source.split(":", 1)[1])
    elif os.path.isdir(source):
        for name in ("config.json",):
            if not os.path.exists(os.path.join(source, name)):
                raise FileNotFoundError(f"autoencoder folder {source} has no {name}: "
                                        "expected a diffusers AutoencoderKL export (save_pretrained)")
        try:
            model = AutoencoderKL.from_pretrained(source)
        except (OSError, EnvironmentError) as e:
            raise FileNotFoundError(f"cannot load autoencoder weights from {source}: {str(e).splitlines()[0]}") from None
    elif source.count("/") >= 1 and not source.startswith(("/", ".")):
        repo, _, subfolder = source.partition("::")
        try:
            model = AutoencoderKL.from_pretrained(repo, subfolder=subfolder or None)
        except Exception as e:  # network errors, missing cache, gated repos
            raise FileNotFoundError(
                f"cannot load autoencoder '{source}' from the hub or its local cache ({type(e).__name__}); "
                "download it where there is network and point vae= at the local folder") from None
    else:
        raise FileNotFoundError(f"autoencoder path {source} does not exist")
    return model.eval().requires_grad_(False)


def autoencoder_identity(model: AutoencoderKL) -> str:
    # Keys like _name_or_path say where it was loaded from, not what it is.
    return model_identity(model, {k: v for k, v in model.config.items() if not k.startswith("_")})


def downsample_factor(model: AutoencoderKL) -> int:
    return 2 ** (len(model.config.block_out_channels) - 1)
