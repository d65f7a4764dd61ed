"""SD3's and Flux's transformers, called as their diffusers pipelines call them (#30): single-device torch code.

SD3 (MMDiT, Esser et al. 2024): latents [B, 16, h, w] in, patchified inside the model; the text sequence is CLIP's
77 states (zero-padded to T5's width) followed by T5's; the pooled CLIP embedding joins the timestep, which is
sigma x 1000.
Flux.1: latents packed into 2x2 patches outside the model ([B, hw / 4, 64]) with three position ids per patch
(0, row, column) and zeros for the text tokens; the timestep is sigma (the model scales it by 1000), and the
distilled models (Flux-dev) also take a guidance scale as an embedding.
`velocity(model, family, x, sigmas, text)` hides both: latents in, velocity (noise - data) out, same shape.
"""
from __future__ import annotations

import torch

# From-scratch presets (model=...): the released architectures (their diffusers configs; the text widths come
# from the cache), and the same layouts at test size for CPU runs and tests.
PRESETS = {
    "sd3_medium": ("sd3", dict(patch_size=2, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                               caption_projection_dim=1536, pos_embed_max_size=192)),
    "sd35_large": ("sd3", dict(patch_size=2, num_layers=38, attention_head_dim=64, num_attention_heads=38,
                               caption_projection_dim=2432, pos_embed_max_size=192, qk_norm="rms_norm")),
    "flux_dev": ("flux", dict(patch_size=1, num_layers=19, num_single_layers=38, attention_head_dim=128,
                              num_attention_heads=24, guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
    "tiny_sd3": ("sd3", dict(patch_size=2, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                             caption_projection_dim=16, pos_embed_max_size=64)),
    "tiny_flux": ("flux", dict(patch_size=1, num_layers=1, num_single_layers=1, attention_head_dim=8,
                               num_attention_heads=2, guidance_embeds=True, axes_dims_rope=(2, 2, 4))),
}
CLASSES = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}


def family_of(model) -> str | None:
    """"sd3" or "flux" for a flow transformer, else None (a UNet)."""
    name = type(model).__name__
    return next((f for f, c in CLASSES.items() if c == name), None)


def build_preset(name: str, channels: int, size: int, context_dim: int, pooled_dim: int, seed: int = 0):
    """A random-weight transformer of preset `name` for latents [channels, size, size], T5 states of width
    `context_dim` and a pooled CLIP embedding of `pooled_dim`, seeded by `seed`."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    family, settings = PRESETS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "sd3":  # its position table covers pos_embed_max_size patches a side: at least this size
            settings = {**settings, "pos_embed_max_size": max(settings["pos_embed_max_size"], size // 2)}
            return SD3Transformer2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                                         joint_attention_dim=context_dim, pooled_projection_dim=pooled_dim, **settings)
        return FluxTransformer2DModel(in_channels=channels * 4, joint_attention_dim=context_dim,
                                      pooled_projection_dim=pooled_dim, **settings)


def pack(z: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: Flux's 2x2 patches, row by row (FluxPipeline._pack_latents)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """pack's inverse: [B, (H/2)(W/2), 4C] -> [B, C, H, W]."""
    b, _, d = x.shape
    return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """[(H/2)(W/2), 3]: (0, row, column) of each packed patch, Flux's rotary positions."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def sd3_context(clip_emb: torch.Tensor, t5_emb: torch.Tensor) -> torch.Tensor:
    """SD3's text sequence: CLIP's states zero-padded to T5's width, then T5's (StableDiffusion3Pipeline)."""
    clip = torch.nn.functional.pad(clip_emb, (0, t5_emb.shape[-1] - clip_emb.shape[-1]))
    return torch.cat([clip, t5_emb], dim=-2)


def velocity(model, family: str, x: torch.Tensor, sigmas: torch.Tensor, context: torch.Tensor,
             pooled: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
    """The model's velocity for latents `x` [B, C, H, W] at noise levels `sigmas` [B]; `context`: the text
    sequence (sd3_context for SD3, T5's for Flux), `pooled` the pooled CLIP embedding, `guidance` [B] Flux-dev's
    guidance scale. `model` may be a DeepSpeed engine (called with keywords, as its forward takes them)."""
    if family == "sd3":
        return model(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                     timestep=sigmas * 1000, return_dict=False)[0]
    h, w = x.shape[-2:]
    out = model(hidden_states=pack(x), encoder_hidden_states=context, pooled_projections=pooled, timestep=sigmas,
                img_ids=image_ids(h, w, x.device, x.dtype),
                txt_ids=torch.zeros(context.shape[1], 3, device=x.device, dtype=x.dtype),
                guidance=guidance, return_dict=False)[0]
    return unpack(out, h, w)
