"""First-stage training: an AutoencoderKL on image shards, exported in diffusers format.

The loss here is the textbook one, pixel MSE plus a small KL term. The perceptual (LPIPS)
and adversarial (PatchGAN) terms that make Stable Diffusion's decoder sharp belong to the
autoencoder lab; this trainer is what the demo needs to get a usable latent space on CPU.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data_pipeline.images import DEFAULT_MAX_PIXELS, image_and_caption
from data_pipeline.storage import DataError, expand_shards
from models.autoencoder import build_autoencoder

from . import checkpoint
from . import config as config_lib
from . import dist
from .data import ImageData, build_loader
from .metrics import RunLog, plot_loss


@dataclasses.dataclass
class AutoencoderJob:
    run_dir: str = "runs/autoencoder"  # checkpoints, logs, config.yaml; export/ holds the result
    data: ImageData = dataclasses.field(default_factory=ImageData)
    preset: str = "demo"  # architecture in models/autoencoder.py: tiny, demo, f8, sd
    latent_channels: int = 4  # channels of the latent space
    batch_per_rank: int = 32  # images per optimizer step
    total_samples: int = 100_000  # training length in images
    lr: float = 1e-3  # AdamW peak learning rate
    warmup_samples: int = 5_000  # linear warm-up, then cosine decay to 10% of lr
    kl_weight: float = 1e-6  # weight of KL(q(z|x) || N(0, I)); small keeps the latent informative
    seed: int = 0  # weights init, data order
    log_every_samples: int = 2_000  # JSONL/wandb logging interval
    checkpoint_every_samples: int = 20_000  # resumable state interval
    scaling_samples: int = 1024  # images used to measure the latent std for scaling_factor
    wandb: str = "offline"  # offline (files in run_dir/wandb) | online | disabled; env WANDB_MODE wins

    def validate(self) -> None:
        if not self.data.urls:
            raise config_lib.ConfigError("data.urls is empty: name the image shards to train on")
        for key in ("batch_per_rank", "total_samples", "log_every_samples", "checkpoint_every_samples"):
            if getattr(self, key) <= 0:
                raise config_lib.ConfigError(f"{key} must be positive, got {getattr(self, key)}")


def lr_at(samples: int, peak: float, warmup: int, total: int) -> float:
    if samples < warmup:
        return peak * (samples + 1) / warmup
    progress = min(1.0, (samples - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def decode_image_sample(sample: dict, resolution: int, min_size: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    # A batch of an aspect-ratio bucket carries its shape; otherwise the square crop.
    x, _, _ = image_and_caption(sample, sample.get("__size__", resolution), min_size=min_size, max_pixels=max_pixels)
    return {"x": x}


@torch.no_grad()
def measure_scaling_factor(model, batches, limit: int) -> float:
    """1 / std of posterior samples, so that scaled latents have unit variance (LDM, sec. 4.3.2)."""
    zs, n = [], 0
    for batch in batches:
        zs.append(model.encode(batch["x"]).latent_dist.sample().flatten())
        n += batch["x"].shape[0]
        if n >= limit:
            break
    return float(1.0 / torch.cat(zs).std())


def train_autoencoder(cfg: AutoencoderJob) -> str:
    """Train, checkpoint, resume, export. Returns the export folder."""
    w = dist.world()
    if w.size > 1:
        raise RuntimeError("train_autoencoder runs as a single process for now; start it with plain python")
    config_lib.save_resolved(cfg, cfg.run_dir)
    torch.manual_seed(cfg.seed)

    # --- model, optimizer, resume -------------------------------------------------------
    model = build_autoencoder(cfg.preset, cfg.latent_channels, seed=cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.5, 0.9), weight_decay=0.0)
    step, resume, loader_state = 0, checkpoint.latest(cfg.run_dir), None
    if resume:
        model.load_state_dict(load_file(os.path.join(resume, "model.safetensors")))
        state = torch.load(os.path.join(resume, "optimizer.pt"), map_location="cpu", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        step, loader_state = state["step"], state["loader"]
        print(f"resuming from {resume} (step {step})")
    total_steps = cfg.total_samples // cfg.batch_per_rank
    log_every = max(1, cfg.log_every_samples // cfg.batch_per_rank)
    ckpt_every = max(1, cfg.checkpoint_every_samples // cfg.batch_per_rank)

    # --- data -----------------------------------------------------------------------------
    urls = expand_shards(cfg.data.urls, cfg.data.endpoint_url)
    loader = build_loader(cfg.data, urls, functools.partial(decode_image_sample, **cfg.data.decode_options()),
                          cfg.batch_per_rank, w, seed=cfg.seed, run_dir=cfg.run_dir, state=loader_state)
    batches = iter(loader)
    runlog = RunLog(cfg.run_dir, True, resume_step=step, wandb_mode=cfg.wandb, wandb_project="ldm-autoencoder",
                    config=config_lib.to_dict(cfg))

    # --- training loop --------------------------------------------------------------------
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="autoencoder", unit="step")
    t0, done_since = time.time(), 0
    while step < total_steps:
        x = next(batches)["x"]
        lr = lr_at(step * cfg.batch_per_rank, cfg.lr, cfg.warmup_samples, cfg.total_samples)
        for g in opt.param_groups:
            g["lr"] = lr
        posterior = model.encode(x).latent_dist
        recon = model.decode(posterior.sample()).sample
        rec_loss = torch.nn.functional.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()  # per pixel, comparable to the MSE term
        loss = rec_loss + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step, done_since = step + 1, done_since + 1
        bar.update(1)
        if not torch.isfinite(loss):
            raise RuntimeError(f"autoencoder loss is {loss.item()} at step {step}; lower lr (now {cfg.lr})")

        if step % log_every == 0 or step == total_steps:
            rate = done_since * cfg.batch_per_rank / (time.time() - t0)
            runlog.log(step, samples=step * cfg.batch_per_rank, loss=loss.item(), mse=rec_loss.item(),
                       kl=kl.item(), lr=lr, images_per_s=rate)
            bar.set_postfix(mse=f"{rec_loss.item():.4f}", img_s=f"{rate:.0f}")
            t0, done_since = time.time(), 0
        if step % ckpt_every == 0 or step == total_steps:
            # Weights as safetensors; optimizer tensors are read back with weights_only=True.
            path = os.path.join(checkpoint.checkpoint_dir(cfg.run_dir), checkpoint.tag_for(step))
            os.makedirs(path, exist_ok=True)
            save_file(model.state_dict(), os.path.join(path, "model.safetensors"))
            torch.save({"optimizer": opt.state_dict(), "step": step, "loader": loader.state_dict()},
                       os.path.join(path, "optimizer.pt"))
            checkpoint.mark_complete(path, {"step": step, "samples": step * cfg.batch_per_rank})
            checkpoint.prune(cfg.run_dir, keep_last=2)
    bar.close()
    runlog.close()

    # --- export -----------------------------------------------------------------------------
    model.eval()
    scaling = measure_scaling_factor(model, batches, cfg.scaling_samples)
    model.register_to_config(scaling_factor=scaling)
    export = os.path.join(cfg.run_dir, "export")
    model.save_pretrained(export, safe_serialization=True)
    plot_loss(os.path.join(cfg.run_dir, "log.jsonl"), os.path.join(cfg.run_dir, "loss.png"),
              keys=("mse",), title="autoencoder reconstruction MSE")
    print(f"autoencoder exported to {export} (scaling_factor {scaling:.4f})")
    return export
