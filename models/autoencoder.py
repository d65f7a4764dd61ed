"""The first stage: diffusers' AutoencoderKL or VQModel, built from a preset or loaded frozen.

A trained autoencoder travels as a diffusers-format folder (config.json plus
diffusion_pytorch_model.safetensors); its `scaling_factor` (1 / std of its latents, as in
the latent-diffusion paper) travels in that config and on to the latent cache. The class is
read from config.json's `_class_name`, so a VQModel export loads like an AutoencoderKL one.

What the cache stores for each kind (`encode_moments`): an AutoencoderKL's posterior mean
and std; a VQModel's pre-quantisation latent `quant_conv(encoder(x))` with std 0, because a
latent diffusion model on a VQ first stage works on the continuous latent and lets the
decoder quantise (Rombach et al. 2022, sec. 3.1) — `VQModel.decode` does, by default.

`vae=identity` is the pixel-space "first stage" (`IdentityAutoencoder`, the latent-diffusion
paper's LDM-1 baseline): f = 1, the latent is the image itself in [-1, 1] (3 channels,
std 0, scaling_factor 1), so the cache, the UNet trainer and sampling run on pixels unchanged.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, ConfigMixin, ModelMixin, VQModel
from diffusers.configuration_utils import register_to_config

from .identity import model_identity

# Architecture presets. "tiny*" exist for unit tests, and "tiny" is also `make demo`'s first
# stage (2.7x faster than "demo" on CPU: nearly all the time goes to the full-resolution
# blocks); "demo" is the lab's f=4 CPU autoencoder; "sd" is Stable Diffusion's f=8 architecture (random weights: train it, or
# load a pretrained copy by path instead). Names starting with "vq_" build a VQModel
# (van den Oord et al. 2017; Esser et al. 2021) with `num_vq_embeddings` codes; the
# downsampling factor is 2 ** (len(block_out_channels) - 1).
PRESETS = {
    "tiny": dict(block_out_channels=(16, 32, 32), norm_num_groups=8, layers_per_block=1),  # f=4
    "tiny_f8": dict(block_out_channels=(16, 32, 32, 32), norm_num_groups=8, layers_per_block=1),
    "demo": dict(block_out_channels=(32, 64, 64), norm_num_groups=16, layers_per_block=1),  # f=4
    "f8": dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=16, layers_per_block=1),
    "sd": dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2,
               scaling_factor=0.18215),
    "vq_tiny": dict(block_out_channels=(16, 32, 32), norm_num_groups=8, layers_per_block=1, num_vq_embeddings=64),
    "vq_tiny_f8": dict(block_out_channels=(16, 32, 32, 32), norm_num_groups=8, layers_per_block=1,
                       num_vq_embeddings=64),
    "vq_f4": dict(block_out_channels=(32, 64, 64), norm_num_groups=16, layers_per_block=1, num_vq_embeddings=512),
    "vq_f8": dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=16, layers_per_block=1,
                  num_vq_embeddings=1024),
    # The latent-diffusion paper's VQ-f4 (8192 codes) and VQ-f8 (16384 codes) first stages.
    "vq_ldm_f4": dict(block_out_channels=(128, 256, 512), norm_num_groups=32, layers_per_block=2,
                      num_vq_embeddings=8192),
    "vq_ldm_f8": dict(block_out_channels=(128, 256, 256, 512), norm_num_groups=32, layers_per_block=2,
                      num_vq_embeddings=16384),
}


def is_vq_preset(preset: str) -> bool:
    return preset.startswith("vq_")


def build_autoencoder(preset: str, latent_channels: int = 4, seed: int = 0,
                      num_vq_embeddings: int = 0) -> AutoencoderKL | VQModel:
    """A freshly initialised AutoencoderKL (or VQModel for vq_* presets) of a named
    architecture, deterministic by seed; `num_vq_embeddings` > 0 overrides the preset's."""
    if preset not in PRESETS:
        raise ValueError(f"unknown autoencoder preset '{preset}'; presets: {', '.join(PRESETS)}")
    cfg = dict(PRESETS[preset])
    n = len(cfg["block_out_channels"])
    blocks = dict(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if is_vq_preset(preset):
            if num_vq_embeddings > 0:
                cfg["num_vq_embeddings"] = num_vq_embeddings
            return VQModel(in_channels=3, out_channels=3, latent_channels=latent_channels, **blocks, **cfg)
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, **blocks, **cfg)


IDENTITY = "identity"  # the vae= spec of the pixel-space first stage


@dataclass
class _Latents:
    latents: torch.Tensor  # what encode() returns: read by encode_moments like a VQModel's (std 0)


@dataclass
class _Decoded:
    sample: torch.Tensor  # what decode() returns, as diffusers' DecoderOutput


class IdentityAutoencoder(ModelMixin, ConfigMixin):
    """Pixels as the latent space (LDM-1): encode and decode return their input unchanged."""

    @register_to_config
    def __init__(self, latent_channels: int = 3, scaling_factor: float = 1.0):
        super().__init__()
        # No weights. An empty parameter carries the dtype and device that callers read from
        # a VAE (next(vae.parameters()), vae.device), and follows .to() like real weights.
        self.anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)

    def encode(self, x: torch.Tensor) -> _Latents:
        return _Latents(latents=x.to(self.anchor.dtype))

    def decode(self, z: torch.Tensor) -> _Decoded:
        return _Decoded(sample=z)


_CLASSES = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}


def _class_of(config: dict, where: str):
    name = config.get("_class_name", "AutoencoderKL")
    if name not in _CLASSES:
        raise FileNotFoundError(f"{where} holds a {name}; expected one of {', '.join(_CLASSES)}")
    return _CLASSES[name]


def load_autoencoder(source: str) -> AutoencoderKL | VQModel | IdentityAutoencoder:
    """Load a frozen AutoencoderKL or VQModel: `preset:NAME` (random weights, tests only), a
    local diffusers folder, or a hub id such as `stabilityai/sd-vae-ft-mse` (needs network or
    the hub cache); or `identity`, the pixel-space IdentityAutoencoder. The class comes from
    config.json. Missing files give one line naming them."""
    if source == IDENTITY:
        model = IdentityAutoencoder()
    elif source.startswith("preset:"):
        model = build_autoencoder(source.split(":", 1)[1])
    elif os.path.isdir(source):
        for name in ("config.json",):
            if not os.path.exists(os.path.join(source, name)):
                raise FileNotFoundError(f"autoencoder folder {source} has no {name}: "
                                        "expected a diffusers AutoencoderKL or VQModel export (save_pretrained)")
        try:
            with open(os.path.join(source, "config.json")) as f:
                cls = _class_of(json.load(f), f"{source}/config.json")
        except json.JSONDecodeError as e:
            raise FileNotFoundError(f"{source}/config.json is not valid JSON ({e.msg})") from None
        try:
            model = cls.from_pretrained(source)
        except (OSError, EnvironmentError, ValueError, RuntimeError) as e:  # ValueError: a tensor of another shape
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise FileNotFoundError(f"cannot load autoencoder weights from {source}: {first.split('. If you')[0][:200]}"
                                    ) from None
    elif source.count("/") >= 1 and not source.startswith(("/", ".")):
        repo, _, subfolder = source.partition("::")
        try:
            cls = _class_of(AutoencoderKL.load_config(repo, subfolder=subfolder or None), source)
            model = cls.from_pretrained(repo, subfolder=subfolder or None)
        except Exception as e:  # network errors, missing cache, gated repos
            raise FileNotFoundError(
                f"cannot load autoencoder '{source}' from the hub or its local cache ({type(e).__name__}); "
                "download it where there is network and point vae= at the local folder") from None
    else:
        raise FileNotFoundError(f"autoencoder path {source} does not exist")
    return model.eval().requires_grad_(False)


def encode_moments(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the latent the cache stores for images x in [-1, 1]: an AutoencoderKL's
    posterior; a VQModel's pre-quantisation latent with std 0 (deterministic). Decoding a
    latent is `vae.decode(z).sample` for both (a VQModel quantises z first)."""
    out = vae.encode(x)
    if hasattr(out, "latent_dist"):
        return out.latent_dist.mean, out.latent_dist.std
    return out.latents, torch.zeros_like(out.latents)


def latent_channels(vae) -> int:
    """Channels of the latent `encode_moments` returns (a VQModel's codebook dimension)."""
    if isinstance(vae, VQModel):
        return vae.config.vq_embed_dim or vae.config.latent_channels
    return vae.config.latent_channels


def autoencoder_identity(model) -> str:
    # Keys like _name_or_path say where it was loaded from, not what it is.
    return model_identity(model, {k: v for k, v in model.config.items() if not k.startswith("_")})


def encoder_identity(model) -> str:
    """The identity of what makes the latents: the encoder and quant_conv with the config. A
    decoder-only fine-tune keeps it, so a cache made with the original VAE stays valid."""
    config = {k: v for k, v in model.config.items() if not k.startswith("_") and k != "scaling_factor"}
    halves = torch.nn.ModuleDict({"encoder": model.encoder, **({"quant_conv": model.quant_conv}
                                                               if getattr(model, "quant_conv", None) is not None else {})})
    return model_identity(halves, config)


def freeze_encoder(model) -> None:
    """Freeze what encoder_identity covers; the decoder (and a VQ codebook, used when decoding) trains."""
    model.encoder.requires_grad_(False)
    if getattr(model, "quant_conv", None) is not None:
        model.quant_conv.requires_grad_(False)


def downsample_factor(model) -> int:
    if isinstance(model, IdentityAutoencoder):
        return 1
    return 2 ** (len(model.config.block_out_channels) - 1)
