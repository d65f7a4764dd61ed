"""The denoiser: diffusers' UNet2DConditionModel from a named preset or a config file."""
from __future__ import annotations

import json
import os

import torch
from diffusers import UNet2DConditionModel

_SD_BLOCKS = dict(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
PRESETS = {
    # CPU tests.
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # `make demo-long`'s UNet: 3M parameters, about 0.27 s per batch of 64 8x8 latents on 2 cores.
    "demo": dict(block_out_channels=(64, 128), layers_per_block=1, norm_num_groups=16, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # The autoencoder lab (lab/run.py) and `make demo`: one config for latents and pixels alike,
    # attention only below the first level, so that pixel space (LDM-1) stays trainable on a CPU. 1.7M parameters;
    # training, 2 cores: about 1.2 ms per 8x8x4 latent, 16 ms per 32x32x3 image.
    "lab": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, attention_head_dim=8,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    # Stable Diffusion 1.5 (860M, CLIP ViT-L/14 768-d context) and 2.1 (865M, OpenCLIP
    # ViT-H/14 1024-d context, head dims 5..20 with linear projections).
    "sd15": dict(_SD_BLOCKS, attention_head_dim=8, cross_attention_dim=768),
    "sd21": dict(_SD_BLOCKS, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                 use_linear_projection=True),
}


def check_unet_fits(config: dict, latent_channels: int, context_dim: int) -> None:
    """A pretrained UNet's config must take the cache's latents and text embeddings as they are."""
    if config.get("in_channels") != latent_channels or config.get("out_channels") != latent_channels:
        raise ValueError(f"its UNet takes {config.get('in_channels')}-channel latents, the cache holds "
                         f"{latent_channels}-channel ones")
    if config.get("cross_attention_dim") != context_dim:
        raise ValueError(f"its UNet expects {config.get('cross_attention_dim')}-d text embeddings, the cache holds "
                         f"{context_dim}-d ones")
    extra = config.get("addition_embed_type") or config.get("class_embed_type")
    if extra:
        raise ValueError(f"its UNet needs extra conditioning ({extra}), which the SD trainer does not give "
                         "(SDXL is not supported yet)")


def build_unet(preset: str, latent_channels: int, latent_size: int, context_dim: int,
               seed: int = 0) -> UNet2DConditionModel:
    """A freshly initialised UNet. `preset` is a name above or a diffusers config.json path.

    The tiny/demo presets take their cross-attention width from the text encoder; for
    the SD presets and config files a different width is an error, not a silent change.
    """
    if preset in PRESETS:
        cfg = dict(PRESETS[preset])
    elif preset.endswith(".json") and os.path.exists(preset):
        with open(preset) as f:
            cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    else:
        raise ValueError(f"unknown UNet preset '{preset}': use one of {', '.join(PRESETS)} or a config.json path")
    fixed = cfg.get("cross_attention_dim")
    if fixed is not None and fixed != context_dim:
        raise ValueError(f"UNet '{preset}' expects {fixed}-d text embeddings, the text encoder gives {context_dim}")
    cfg.update(in_channels=latent_channels, out_channels=latent_channels, sample_size=latent_size,
               cross_attention_dim=context_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**cfg)
