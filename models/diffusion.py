"""The diffusion process: forward noising for training, guided sampling for generation.

The noise schedule is diffusers' DDPMScheduler (Stable Diffusion's scaled-linear betas by
default); sampling uses a diffusers solver built from the same schedule config.
"""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

SAMPLERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}


# The keys of a pipeline's scheduler config that define its noise schedule (the betas); the
# rest (solver, timestep spacing, offsets) is how a sampler walks it, not what was trained.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "rescale_betas_zero_snr")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def noise_schedule(prediction_type: str = "epsilon", num_timesteps: int = 1000,
                   zero_terminal_snr: bool = False, base: dict | None = None) -> DDPMScheduler:
    """SD's scaled-linear schedule, optionally rescaled so that the last step is pure noise.

    `base`: a pretrained pipeline's scheduler config, whose betas (SCHEDULE_KEYS) replace SD's
    so that fine-tuning continues on the schedule the model was trained with.

    With SD's betas the final step keeps sqrt(alpha_bar_T) = 0.068 of the image, so a model
    never learns to start from pure noise and cannot make very dark or bright images. Lin et
    al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed") rescale the
    betas to SNR(T) = 0, which needs v-prediction (epsilon is undefined at SNR 0) and
    "trailing" sampler timesteps so that sampling starts at T.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if zero_terminal_snr and prediction_type != "v_prediction":
        raise ValueError("zero_terminal_snr needs prediction_type v_prediction: epsilon is undefined at SNR 0")
    betas = dict(num_train_timesteps=num_timesteps, beta_schedule="scaled_linear", beta_start=0.00085,
                 beta_end=0.012)
    if base is not None:
        betas = {k: base[k] for k in SCHEDULE_KEYS if base.get(k) is not None and k != "rescale_betas_zero_snr"}
        if betas.get("beta_schedule", "linear") not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule {betas['beta_schedule']!r} is not one the trainer knows "
                             f"({', '.join(BETA_SCHEDULES)})")
        zero_terminal_snr = zero_terminal_snr or bool(base.get("rescale_betas_zero_snr"))
    return DDPMScheduler(**betas, prediction_type=prediction_type, clip_sample=False,
                         rescale_betas_zero_snr=zero_terminal_snr,
                         timestep_spacing="trailing" if zero_terminal_snr else "leading")


def snr(schedule: DDPMScheduler, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at integer timesteps t."""
    alpha_bar = schedule.alphas_cumprod.to(t.device)[t].float()
    return alpha_bar / (1 - alpha_bar)


def draw_latents(mean: torch.Tensor, std: torch.Tensor, generator) -> torch.Tensor:
    """z ~ N(mean, std^2) from cached posterior moments.

    Caching the moments rather than one sample keeps the VAE's posterior noise as data
    augmentation, as EDM2 does; a fixed sample would show the UNet the same z every epoch.
    """
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return mean.float() + std.float() * eps


def training_loss(unet, z0: torch.Tensor, context: torch.Tensor, schedule: DDPMScheduler,
                  generator, *, min_snr_gamma: float = 0.0, offset_noise: float = 0.0,
                  added_cond: dict | None = None, sample_weight: torch.Tensor | None = None,
                  loss_mask: torch.Tensor | None = None, input_perturbation: float = 0.0) -> torch.Tensor:
    """Mean squared error of the UNet's epsilon or v prediction at a random timestep.

    min_snr_gamma > 0 weights each sample by min(SNR, gamma) / SNR (epsilon) or
    min(SNR, gamma) / (SNR + 1) (v), which is the same weighting in x0 terms: low-noise
    steps stop dominating the gradient (Hang et al. 2023, "Efficient Diffusion Training
    via Min-SNR Weighting Strategy"; gamma = 5 there). offset_noise > 0 adds a per-image,
    per-channel constant to the noise so the model can change an image's mean brightness
    (Guttenberg 2023, "Diffusion with Offset Noise"; 0.1 is the usual value). `added_cond`: SDXL's
    {"text_embeds": pooled, "time_ids": [B, 6]} for a UNet with text_time conditioning. `sample_weight`
    [B] scales each sample's loss (0: fill the loader weighted 0). `loss_mask` [B, h, w] weights each latent
    position (0: its error is not trained on), averaged over every position as kohya's masked loss does, so
    a half-masked image weighs half. `input_perturbation` > 0 noises the input with noise + gamma * xi
    (xi ~ N(0, I)) while the target stays the noise itself (Ning et al. 2023, "Input Perturbation Reduces
    Exposure Bias in Diffusion Models"; gamma = 0.1 there): training sees inputs slightly off the forward
    process, as sampling does.
    """
    b = z0.shape[0]
    noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    if offset_noise > 0:
        noise = noise + offset_noise * torch.randn((b, z0.shape[1], 1, 1), generator=generator, device=z0.device,
                                                   dtype=z0.dtype)
    t = torch.randint(0, schedule.config.num_train_timesteps, (b,), generator=generator, device=z0.device)
    if input_perturbation > 0:
        xi = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        zt = schedule.add_noise(z0, noise + input_perturbation * xi, t)
    else:
        zt = schedule.add_noise(z0, noise, t)
    target = noise if schedule.config.prediction_type == "epsilon" else schedule.get_velocity(z0, noise, t)
    extra = {"added_cond_kwargs": added_cond} if added_cond is not None else {}
    pred = unet(zt.to(context.dtype), t, context, **extra).sample
    err = (pred.float() - target.float()).pow(2)
    if loss_mask is not None:
        err = err * loss_mask.to(err.device, err.dtype)[:, None]
    per_sample = err.mean(dim=tuple(range(1, pred.dim())))
    if min_snr_gamma > 0:
        s = snr(schedule, t)
        clipped = torch.clamp(s, max=min_snr_gamma)
        per_sample = per_sample * (clipped / s if schedule.config.prediction_type == "epsilon" else clipped / (s + 1))
    if sample_weight is not None:
        per_sample = per_sample * sample_weight.to(per_sample.device, per_sample.dtype)
    return per_sample.mean()


def make_sampler(name: str, schedule_config: dict):
    """A diffusers solver over the training schedule, set up as Stable Diffusion pipelines run it:
    "leading" timesteps offset by 1 (StableDiffusionPipeline rewrites steps_offset to 1 when it
    loads a scheduler without it), so that an exported pipeline walks the same timesteps."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
    leading = schedule_config.get("timestep_spacing", "leading") == "leading"
    # A keyword, not a key: from_config ignores keys its _use_default_values lists.
    return SAMPLERS[name].from_config(schedule_config, **({"steps_offset": 1} if leading else {}))


@torch.no_grad()
def sample_latents(unet, context: torch.Tensor, uncond: torch.Tensor, schedule_config: dict, *,
                   steps: int = 50, guidance: float = 5.0, sampler: str = "ddim",
                   generator: torch.Generator | None = None, size: tuple[int, int] | None = None,
                   noise: torch.Tensor | None = None, added: dict | None = None,
                   added_uncond: dict | None = None) -> torch.Tensor:
    """Classifier-free guided sampling (Ho & Salimans 2022): eps = u + g * (c - u).

    `size`: latent (height, width), default the UNet's sample_size; `noise`: the initial
    latents (unscaled standard normal), else drawn from `generator`. `added`, `added_uncond`:
    SDXL's {"text_embeds", "time_ids"} of the prompts and of the unconditional side."""
    scheduler = make_sampler(sampler, schedule_config)
    scheduler.set_timesteps(steps)
    cfg = unet.config
    b = context.shape[0]
    h, w = size or (cfg.sample_size, cfg.sample_size)
    if noise is None:
        noise = torch.randn((b, cfg.in_channels, h, w), generator=generator, device=context.device)
    z = noise.to(context.device, torch.float32) * scheduler.init_noise_sigma
    both = torch.cat([uncond.expand(b, -1, -1), context])
    extra = {}
    if added is not None:
        extra["added_cond_kwargs"] = {k: torch.cat([added_uncond[k].expand_as(v), v]).to(context.dtype)
                                      for k, v in added.items()}
    for t in scheduler.timesteps:
        zin = scheduler.scale_model_input(torch.cat([z, z]), t)
        out_u, out_c = unet(zin.to(context.dtype), t, both, **extra).sample.float().chunk(2)
        z = scheduler.step(out_u + guidance * (out_c - out_u), t, z).prev_sample
    return z
