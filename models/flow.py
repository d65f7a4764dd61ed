"""Rectified flow: the training objective of SD3- and Flux-class transformers (issue #30).

The forward process is a straight line from data to noise (Liu et al. 2022, "Flow Straight and Fast";
Lipman et al. 2023, "Flow Matching for Generative Modeling"):

    x_sigma = (1 - sigma) x0 + sigma eps,    sigma in [0, 1], 1 being pure noise,

and the model learns its velocity, d x_sigma / d sigma = eps - x0. Sampling integrates that ODE from
sigma = 1 to 0 (the Euler steps of diffusers' FlowMatchEulerDiscreteScheduler, which pipelines use).

Which sigmas training sees decides what the model is good at. Esser et al. 2024 ("Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis", section 3.1) compare samplers of a u in (0, 1):
- logit-normal: u = sigmoid(n), n ~ N(m, s^2), which favours the middle (m = 0, s = 1 was their best);
- mode: u = 1 - v - scale (cos^2(pi v / 2) - 1 + v), v uniform (their eq. 20; scale 1.29 in their sweep);
- uniform.
Then a shift moves u towards the noise end, since a larger image keeps more of its signal at one sigma:
- SD3's fixed shift s (3.0 for SD3 at 1024 px): sigma = s u / (1 + (s - 1) u);
- Flux's resolution-dependent one: sigma = e^mu / (e^mu + 1 / u - 1), mu linear in the number of image
  tokens (0.5 at 256 tokens, 1.15 at 4,096: the values of Flux's pipeline config).
Loss weightings as diffusers' SD3 scripts offer them: none, sigma_sqrt (1 / sigma^2), cosmap
(2 / (pi (1 - 2 sigma + 2 sigma^2)), Esser et al.'s eq. 21).
"""
from __future__ import annotations

import math

import torch

TIMESTEP_SAMPLERS = ("logit_normal", "mode", "uniform")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def sample_u(n: int, generator, device, sampler: str = "logit_normal", logit_mean: float = 0.0,
             logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """n values of u in (0, 1), float32, drawn from `sampler` with one draw of `generator`."""
    if sampler == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, device=device))
    v = torch.rand(n, generator=generator, device=device)
    if sampler == "mode":
        return 1 - v - mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
    if sampler == "uniform":
        return v
    raise ValueError(f"timestep sampler must be one of {', '.join(TIMESTEP_SAMPLERS)}, got {sampler!r}")


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's fixed shift: s u / (1 + (s - 1) u); 1 leaves u as it is."""
    return shift * u / (1 + (shift - 1) * u)


def flux_mu(image_tokens: int, base_tokens: int = 256, max_tokens: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """Flux's mu for an image of `image_tokens` tokens (latent pixels / 4): linear between the two points."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (image_tokens - base_tokens)


def time_shift(u: torch.Tensor, mu: float) -> torch.Tensor:
    """Flux's exponential shift: e^mu / (e^mu + 1 / u - 1) (equal to shift_sigmas with s = e^mu)."""
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1))


def loss_weight(sigmas: torch.Tensor, weighting: str = "none") -> torch.Tensor:
    if weighting == "none":
        return torch.ones_like(sigmas)
    if weighting == "sigma_sqrt":
        return sigmas.clamp(min=1e-6) ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")


def noised(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_sigma, the velocity target eps - x0) for per-sample sigmas [B]."""
    s = sigmas.view(-1, *[1] * (x0.dim() - 1)).to(x0.dtype)
    return (1 - s) * x0 + s * noise, noise - x0


def flow_loss(predict, x0: torch.Tensor, generator, *, sampler: str = "logit_normal", shift: float = 1.0,
              mu: float | None = None, weighting: str = "none", logit_mean: float = 0.0, logit_std: float = 1.0,
              mode_scale: float = 1.29, sample_weight: torch.Tensor | None = None,
              loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of `predict(x_sigma, sigmas)`'s velocity at sigmas drawn as the module doc says:
    `mu` given, Flux's exponential shift; else SD3's `shift`. The draws come from `generator` in a fixed
    order (noise, then u), so a resumed run draws what an uninterrupted one would. `sample_weight` [B]
    scales each sample (0: the loader's fill); `loss_mask` [B, h, w] each latent position, as training_loss's."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32).to(x0.dtype)
    u = sample_u(x0.shape[0], generator, x0.device, sampler, logit_mean, logit_std, mode_scale)
    u = u.clamp(1e-5, 1 - 1e-5)  # sigma 0 trains nothing and sigma 1 divides by zero in sigma_sqrt
    sigmas = time_shift(u, mu) if mu is not None else shift_sigmas(u, shift)
    xt, target = noised(x0, noise, sigmas)
    pred = predict(xt, sigmas)
    err = (pred.float() - target.float()).pow(2)
    if loss_mask is not None:
        err = err * loss_mask.to(err.device, err.dtype)[:, None]
    per_sample = err.mean(dim=tuple(range(1, x0.dim())))
    per_sample = per_sample * loss_weight(sigmas, weighting)
    if sample_weight is not None:
        per_sample = per_sample * sample_weight.to(per_sample.device, per_sample.dtype)
    return per_sample.mean()
