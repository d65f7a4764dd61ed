"""The first stage's objectives: plain VAE, KL-VAE with LPIPS + PatchGAN, and VQ-GAN.

- `kl_plain`: pixel MSE + KL, the textbook VAE. MSE's optimum under uncertainty is the
  average of the plausible images, so fine texture comes out as grey mush.
- `kl_gan`: L1 + LPIPS (Zhang et al. 2018) + a small KL + a PatchGAN (Isola et al. 2017)
  with hinge loss: the recipe of Stable Diffusion's AutoencoderKL (Rombach et al. 2022,
  after Esser et al. 2021). The latent only has to carry structure; the adversarial term
  lets the decoder paint plausible texture back.
- `vq_gan`: a VQModel with L1 + LPIPS + codebook and commitment losses (van den Oord et al.
  2017) + the same discriminator (Esser et al. 2021).

Images are in [-1, 1]. Every term is a mean per pixel (or per logit), so the weights
compare across resolutions; the KL is summed over the latent and divided by the pixels of
an image, which keeps LDM's ratio of the KL to the (summed) reconstruction loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.discriminator import frozen

OBJECTIVES = ("kl_plain", "kl_gan", "vq_gan")


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss (Lim & Ye 2017; taming): real logits pushed above +1,
    fake below -1, nothing gained beyond."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge GAN: raise the discriminator's score of its output."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float = 1.0, max_weight: float = 1e4) -> torch.Tensor:
    """Weight of the GAN term: ||grad_L L_rec|| / (||grad_L L_GAN|| + 1e-4), clamped to
    [0, max_weight], times disc_weight, with L the decoder's last layer (Esser et al. 2021,
    eq. 7). It balances the two gradients where they meet the output, whatever the loss scales.
    A constant: no gradient flows through it."""
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = rec_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach() * disc_weight


def codebook_losses(z: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook, commitment) of VQ-VAE (van den Oord et al. 2017, eq. 3): the codebook loss
    moves the chosen codes to the encoder outputs, the commitment loss keeps the encoder
    near its codes; each stops the gradient on the other side. (diffusers' VectorQuantizer
    in its default legacy mode swaps the beta between the two; these are the paper's.)"""
    return F.mse_loss(codes, z.detach()), F.mse_loss(z, codes.detach())


def vq_forward(model, x: torch.Tensor):
    """A VQModel's reconstruction with what the losses need: (recon, z, codes, indices).
    z = quant_conv(encoder(x)) (the latent the cache stores); the decoder gets z + sg(codes - z),
    the straight-through estimator, so the encoder learns through the quantiser. The same
    computation as `VQModel.decode(z)` (tested)."""
    z = model.encode(x).latents
    quant, _, (_, _, indices) = model.quantize(z)  # straight-through already; its own loss is unused
    codes = model.quantize.embedding(indices.flatten()).view(z.shape[0], z.shape[2], z.shape[3], -1)
    codes = codes.permute(0, 3, 1, 2)
    spatial = quant if model.config.norm_type == "spatial" else None
    recon = model.decoder(model.post_quant_conv(quant), spatial)
    return recon, z, codes, indices.flatten()


class CodebookUsage:
    """Code counts over the last `window` batches: perplexity exp(H(p)) (the number of
    equally used codes it is worth; the codebook size at best) and codes never chosen."""

    def __init__(self, size: int, window: int):
        self.size, self.window = size, window
        self.counts = torch.zeros(window, size, dtype=torch.long)
        self.seen = 0  # batches added so far
        self.restarted = 0  # codes re-initialised by restart_dead_codes so far

    def update(self, indices: torch.Tensor, reduce=None) -> None:
        """Count one batch's codes; `reduce` sums the counts over ranks, so that every rank
        sees the same dead codes and restarts the same ones."""
        counts = torch.bincount(indices.flatten().cpu(), minlength=self.size)
        self.counts[self.seen % self.window] = reduce(counts) if reduce is not None else counts
        self.seen += 1

    def stats(self) -> dict:
        total = self.counts.sum(0)
        p = total.double() / max(1, int(total.sum()))
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        return {"perplexity": float(math.exp(entropy)), "dead_codes": int((total == 0).sum()),
                "codes_restarted": self.restarted}

    def dead(self) -> torch.Tensor:
        """Indices of codes unused over a full window (none before the window has filled)."""
        if self.seen < self.window:
            return torch.zeros(0, dtype=torch.long)
        return (self.counts.sum(0) == 0).nonzero().flatten()

    def state_dict(self) -> dict:
        return {"counts": self.counts.clone(), "seen": self.seen, "restarted": self.restarted}

    def load_state_dict(self, state: dict) -> None:
        self.counts, self.seen = state["counts"].clone(), int(state["seen"])
        self.restarted = int(state.get("restarted", 0))


@torch.no_grad()
def restart_dead_codes(codebook: nn.Embedding, z: torch.Tensor, dead: torch.Tensor, generator: torch.Generator,
                       optimizer: torch.optim.Optimizer | None = None) -> int:
    """Move dead codes onto encoder outputs drawn from the batch, with fresh Adam moments.

    A codebook initialised near zero (diffusers/taming: uniform +-1/K) is mostly never
    chosen: a few codes win every nearest-neighbour search and the rest get no gradient
    (codebook collapse). Re-seeding unused codes from current encoder outputs (Dhariwal et
    al. 2020, Jukebox; Zeghidour et al. 2021, SoundStream) puts them where the data is.
    Not in taming transformers, whose runs are long enough to live with collapse."""
    if dead.numel() == 0:
        return 0
    vectors = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    pick = torch.randint(0, vectors.shape[0], (dead.numel(),), generator=generator).to(vectors.device)
    rows = dead.to(codebook.weight.device)
    codebook.weight[rows] = vectors[pick].to(codebook.weight.dtype)
    state = optimizer.state.get(codebook.weight, {}) if optimizer is not None else {}
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][rows] = 0
    return dead.numel()


class FirstStageLoss(nn.Module):
    """The objective's two losses: `generator_loss` for the autoencoder's step and
    `discriminator_loss` for the discriminator's, on the same batch. The LPIPS network is
    frozen and held outside the module tree (never trained, never saved); the
    discriminator is a child, saved with the checkpoints but not with the export."""

    def __init__(self, objective: str, *, lpips=None, discriminator: nn.Module | None = None,
                 kl_weight: float = 1e-6, lpips_weight: float = 1.0, disc_weight: float = 0.5,
                 disc_start_samples: int = 0, codebook_weight: float = 1.0, vq_beta: float = 0.25):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if objective != "kl_plain" and (lpips is None or discriminator is None):
            raise ValueError(f"objective {objective} needs an LPIPS network and a discriminator")
        self.objective, self._lpips, self.discriminator = objective, [lpips], discriminator
        self.kl_weight, self.lpips_weight, self.disc_weight = kl_weight, lpips_weight, disc_weight
        self.disc_start_samples, self.codebook_weight, self.vq_beta = disc_start_samples, codebook_weight, vq_beta
        self.last_indices: torch.Tensor | None = None  # codes chosen in the latest generator_loss (vq_gan)
        self.last_latents: torch.Tensor | None = None  # its pre-quantisation latents (vq_gan)

    @property
    def lpips(self):
        return self._lpips[0]

    def gan_active(self, samples_seen: int) -> bool:
        """The discriminator joins after disc_start_samples (taming's disc_start): a GAN on a
        random decoder only learns to tell noise from images and destabilises early training."""
        return self.discriminator is not None and samples_seen >= self.disc_start_samples

    def reconstruct(self, model, x: torch.Tensor, generator: torch.Generator | None = None):
        """(recon, extras): extras holds `kl` (KL objectives) or `z`, `codes`, `indices` (VQ)."""
        if self.objective == "vq_gan":
            recon, z, codes, indices = vq_forward(model, x)
            return recon, {"z": z, "codes": codes, "indices": indices}
        posterior = model.encode(x).latent_dist
        recon = model.decode(posterior.sample(generator=generator)).sample
        kl = posterior.kl().mean() / x[0].numel()  # per pixel, comparable to the reconstruction terms
        return recon, {"kl": kl}

    def generator_loss(self, model, x: torch.Tensor, samples_seen: int, generator: torch.Generator | None = None):
        """(loss, recon, logs) for the autoencoder's step; the discriminator is a fixed function here."""
        recon, extra = self.reconstruct(model, x, generator)
        logs: dict[str, torch.Tensor | float] = {}
        if self.objective == "kl_plain":
            rec = F.mse_loss(recon.float(), x.float())
            logs.update(mse=rec, kl=extra["kl"])
            return rec + self.kl_weight * extra["kl"], recon, logs
        l1 = (recon.float() - x.float()).abs().mean()
        perceptual = self.lpips(recon.float(), x.float()).mean()
        rec = l1 + self.lpips_weight * perceptual
        logs.update(l1=l1, lpips=perceptual)
        loss = rec
        if self.objective == "kl_gan":
            loss = loss + self.kl_weight * extra["kl"]
            logs["kl"] = extra["kl"]
        else:
            self.last_indices = extra["indices"].detach()  # for the codebook usage statistics
            self.last_latents = extra["z"].detach()  # for restarting dead codes
            codebook, commit = codebook_losses(extra["z"].float(), extra["codes"].float())
            loss = loss + self.codebook_weight * (codebook + self.vq_beta * commit)
            logs.update(codebook=codebook, commit=commit)
        if self.gan_active(samples_seen):
            with frozen(self.discriminator):
                g_loss = hinge_g_loss(self.discriminator(recon).float())
            weight = adaptive_weight(rec, g_loss, model.decoder.conv_out.weight, self.disc_weight)
            loss = loss + weight * g_loss
            logs.update(g_loss=g_loss, disc_adaptive_weight=weight)
        return loss, recon, logs

    def discriminator_loss(self, x: torch.Tensor, recon: torch.Tensor):
        """(loss, logs) for the discriminator's step; recon is detached, so no gradient
        reaches the autoencoder."""
        logits_real = self.discriminator(x.detach()).float()
        logits_fake = self.discriminator(recon.detach()).float()
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, {"d_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
