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
    # Stable Diffusion 1.5's layout (4 levels, 2 ResNet + transformer blocks each: 684 parameter tensors, as
    # many as SD 1.5's 686) at 1/10 of its width (3.3M parameters): per-tensor overheads of a step
    # (benchmarks/step_overhead.py) show on a CPU as they would on SD 1.5, in a fraction of the time.
    "sd15_narrow": dict(_SD_BLOCKS, block_out_channels=(32, 64, 64, 64), norm_num_groups=8, attention_head_dim=8),
    # Stable Diffusion 1.5 (860M, CLIP ViT-L/14 768-d context) and 2.1 (865M, OpenCLIP
    # ViT-H/14 1024-d context, head dims 5..20 with linear projections).
    "sd15": dict(_SD_BLOCKS, attention_head_dim=8, cross_attention_dim=768),
    "sd21": dict(_SD_BLOCKS, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                 use_linear_projection=True),
    # SDXL base (2.6B; Podell et al. 2023): three levels, no attention at the first, 2 and 10
    # transformer blocks at the others, 2048-d context (CLIP-L + bigG), and "text_time": bigG's
    # pooled embedding (1280) with the six size/crop numbers, 256-d each, added to the time embedding.
    "sdxl": dict(block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, cross_attention_dim=2048,
                 addition_embed_type="text_time", addition_time_embed_dim=256),
    # SDXL's layout at CPU-test size (any context width and pooled width).
    "tiny_sdxl": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8),
}
TIME_IDS = 6  # SDXL's micro-conditioning: original (h, w), crop (top, left), target (h, w)


def needs_time_ids(config) -> bool:
    """The UNet takes SDXL's added conditioning (pooled text embedding and time_ids)."""
    return config.get("addition_embed_type") == "text_time"


def check_unet_fits(config: dict, latent_channels: int, context_dim: int, pooled_dim: int = 0) -> None:
    """A pretrained UNet's config must take the cache's latents and text embeddings as they are
    (with SDXL's text_time conditioning: the cache's pooled embedding too)."""
    if config.get("in_channels") != latent_channels or config.get("out_channels") != latent_channels:
        raise ValueError(f"its UNet takes {config.get('in_channels')}-channel latents, the cache holds "
                         f"{latent_channels}-channel ones")
    if config.get("cross_attention_dim") != context_dim:
        raise ValueError(f"its UNet expects {config.get('cross_attention_dim')}-d text embeddings, the cache holds "
                         f"{context_dim}-d ones")
    if needs_time_ids(config):
        if not pooled_dim:
            raise ValueError("its UNet is SDXL's (text_time conditioning on a pooled text embedding), and the cache "
                             "holds no pooled embedding: cache with an SDXL pipeline's two text encoders")
        want = TIME_IDS * int(config.get("addition_time_embed_dim") or 0) + pooled_dim
        if config.get("projection_class_embeddings_input_dim") != want:
            raise ValueError(f"its UNet's text_time projection takes {config.get('projection_class_embeddings_input_dim')} "
                             f"numbers, the cache's {pooled_dim}-d pooled embedding and 6 time ids make {want}")
        return
    extra = config.get("addition_embed_type") or config.get("class_embed_type")
    if extra:
        raise ValueError(f"its UNet needs extra conditioning ({extra}), which the trainer does not give")
    if pooled_dim:
        raise ValueError("the cache holds SDXL's pooled text embeddings, and the UNet has no text_time conditioning "
                         "to take them: use an SDXL UNet (model=sdxl or tiny_sdxl, or an SDXL pipeline)")


def build_unet(preset: str, latent_channels: int, latent_size: int, context_dim: int,
               seed: int = 0, pooled_dim: int = 0) -> UNet2DConditionModel:
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
    if needs_time_ids(cfg):
        cfg["projection_class_embeddings_input_dim"] = TIME_IDS * cfg["addition_time_embed_dim"] + pooled_dim
    check_unet_fits(cfg, latent_channels, context_dim, pooled_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**cfg)
