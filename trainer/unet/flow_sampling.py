"""Sampling SD3- and Flux-class transformers (#30): the flow-matching Euler steps of diffusers'
FlowMatchEulerDiscreteScheduler, set up and called as StableDiffusion3Pipeline and FluxPipeline do, so that
launch/sample.py and an exported pipeline draw the same image for the same noise.

SD3: the scheduler's own sigmas (shifted by its `shift`), classifier-free guidance against the negative (or
empty) prompt's encodings. Flux: sigmas linspace(1, 1/N, N), shifted by mu of the image's tokens, and no
classifier-free guidance: the guidance scale goes into the model's guidance embedding (Flux-dev).
"""
from __future__ import annotations

import numpy as np
import torch

from models.flow import flux_mu
from models.flow_model import family_of, sd3_context, velocity


def flow_text(text_encoder, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(text sequence, pooled) of `prompts` as the transformer takes them: every T5 token's state, as the
    pipelines compute them (SD3: CLIP's states first)."""
    out = {k: v.to(device) for k, v in text_encoder.embed(prompts).items()}
    context = sd3_context(out["clip_emb"], out["text_emb"]) if "clip_emb" in out else out["text_emb"]
    return context, out["pooled"]


@torch.no_grad()
def flow_sample_latents(model, text_encoder, scheduler_config: dict, prompts: list[str], *, steps: int,
                        guidance: float, generator, latent_shape: tuple[int, int, int], negative_prompt: str = "",
                        noise: torch.Tensor | None = None) -> torch.Tensor:
    """Latents [len(prompts), C, H, W] for `prompts`, from `noise` (default: drawn from `generator`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    family, device = family_of(model), next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n, (c, h, w) = len(prompts), latent_shape
    z = noise if noise is not None else torch.randn((n, c, h, w), generator=generator, device=device)
    z = z.to(device, torch.float32)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    context, pooled = flow_text(text_encoder, prompts, device)
    if family == "flux":
        sc = scheduler.config
        mu = flux_mu((h // 2) * (w // 2), sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096),
                     sc.get("base_shift", 0.5), sc.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=device)
        embedded = torch.full((n,), guidance, device=device) if model.config.get("guidance_embeds") else None
        for t in scheduler.timesteps:
            v = velocity(model, family, z.to(dtype), (t / 1000).expand(n).to(dtype), context.to(dtype),
                         pooled.to(dtype), None if embedded is None else embedded.to(dtype))
            z = scheduler.step(v, t, z).prev_sample
        return z
    scheduler.set_timesteps(steps, device=device)
    guided = guidance > 1
    if guided:
        neg_context, neg_pooled = flow_text(text_encoder, [negative_prompt] * n, device)
        context, pooled = torch.cat([neg_context, context]), torch.cat([neg_pooled, pooled])
    for t in scheduler.timesteps:
        x = torch.cat([z, z]) if guided else z
        v = velocity(model, family, x.to(dtype), (t / 1000).expand(x.shape[0]).to(dtype), context.to(dtype),
                     pooled.to(dtype))
        if guided:
            uncond, cond = v.chunk(2)
            v = uncond + guidance * (cond - uncond)
        z = scheduler.step(v, t, z).prev_sample
    return z
