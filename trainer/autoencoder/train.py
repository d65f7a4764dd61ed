"""First-stage training: an AutoencoderKL or VQModel on image shards, exported in diffusers format.

Three objectives (trainer/autoencoder/losses.py): `kl_plain` (pixel MSE + KL, the textbook VAE and the
demo's default), `kl_gan` (L1 + LPIPS + KL + PatchGAN: Stable Diffusion's recipe) and `vq_gan`
(VQModel, L1 + LPIPS + codebook/commitment + PatchGAN: taming transformers). With a
discriminator each step is two steps on the same batch, as in taming: the autoencoder's
(discriminator frozen), then the discriminator's (reconstruction detached), each with its own
Adam. Every random draw is a function of (seed, step) and the loader's position is saved, so
k steps + resume + k steps is the same run as 2k steps. The export is the autoencoder alone
(EMA weights when `ema_decay` > 0) with its measured `scaling_factor`; LPIPS and the
discriminator stay behind.

Checkpoints are the one format of trainer/core/checkpoint.py (local or an fsspec URL, the
completion marker, verification before load, pruning), with these parts: `model.safetensors`,
`discriminator.safetensors`, the EMA in `ema/` (diffusers layout) and `training_state.pt`
(optimizer states, codebook usage, every rank's loader position, step), written by rank 0:
the state is replicated. Checkpoints of the older layout (`model.safetensors` + `optimizer.pt`)
are refused in one line.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import time

import torch
from diffusers import VQModel
from tqdm import tqdm

from data_pipeline import storage
from data_pipeline.images import DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, image_and_caption
from data_pipeline.storage import expand_shards
from models.autoencoder import build_autoencoder, downsample_factor, encode_moments, freeze_encoder, load_autoencoder
from models.discriminator import build_discriminator
from models.perceptual import RANDOM_NOTICE, load_lpips

from trainer.autoencoder.job import AutoencoderJob, pretrained_vae
from trainer.autoencoder.losses import CodebookUsage, FirstStageLoss, restart_dead_codes
from trainer.core import checkpoint, dist
from trainer.core import config as config_lib
from trainer.core.data import build_loader, image_shard_counts
from trainer.core.ema import EMA, halflife_for_decay
from trainer.core.errors import TrainingError
from trainer.core.metrics import RunLog, plot_loss
from trainer.core.preemption import Preemption
from trainer.core.schedule import lr_at

EMA_FOLDER = "ema"  # the autoencoder's EMA in a checkpoint (the UNet's is ema_unet)
STATE = "training_state"  # optimizer states, codebook usage, loader positions, step: STATE.pt
OLD_STATE = "optimizer.pt"  # the older layout's file (model.safetensors + optimizer.pt), refused


def refuse_older_layout(path: str, endpoint_url: str | None = None) -> None:
    """A checkpoint written before the common format has no STATE.pt: refused in one line,
    before anything is read, with the ways on."""
    if (storage.exists(storage.join(path, OLD_STATE), endpoint_url)
            and not storage.exists(storage.join(path, f"{STATE}.pt"), endpoint_url)):
        raise checkpoint.CheckpointError(
            f"checkpoint {path} is in the older autoencoder layout (model.safetensors + {OLD_STATE}), which this "
            "version does not read: retrain in a new run_dir, or resume and export it with the previous version")


def decode_image_sample(sample: dict, resolution: int, min_size: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                        formats: tuple[str, ...] = DEFAULT_FORMATS) -> dict:
    # A batch of an aspect-ratio bucket carries its shape; otherwise the square crop.
    x, _, _ = image_and_caption(sample, sample.get("__size__", resolution), min_size=min_size, max_pixels=max_pixels,
                                formats=formats)
    return {"x": x}


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The latent draws of one step: a function of (seed, step, rank), so a resumed run draws the same."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step + rank * (1 << 40)) % (2 ** 63))


@torch.no_grad()
def measure_scaling_factor(model, batches, limit: int, seed: int = 0) -> float:
    """1 / std of the latents the cache will hold (posterior samples for AutoencoderKL, the
    pre-quantisation latent for VQModel), so that scaled latents have unit variance (LDM, sec. 4.3.2)."""
    device, gen = next(model.parameters()).device, torch.Generator().manual_seed(seed)
    zs, n = [], 0
    while n < limit:  # next(), not a for loop: iter() on the run's Loader would restart it
        x = next(batches)["x"].to(device)
        mean, std = encode_moments(model, x)
        zs.append((mean + std * torch.randn(mean.shape, generator=gen).to(device)).flatten().float().cpu())
        n += x.shape[0]
    return float(1.0 / torch.cat(zs).std())


def _check_replicas(model: torch.nn.Module, step: int) -> None:
    """Averaged gradients keep every rank's weights bit-identical; a fingerprint compared at
    each checkpoint turns a rank that went its own way into an error, not a silent fork."""
    fingerprint = float(sum(p.detach().double().sum() for p in model.parameters()))
    prints = dist.all_gather_objects(fingerprint)
    if len(set(prints)) > 1:
        raise TrainingError(f"the ranks' autoencoder weights differ at step {step} "
                            f"(parameter sums {prints}); a rank skipped or repeated a step")


def build_model(cfg: AutoencoderJob):
    """The autoencoder to train: a preset with random weights seeded by cfg.seed, or the
    pretrained one (its encoder frozen with train_encoder=false)."""
    if not cfg.pretrained:
        return build_autoencoder(cfg.preset, cfg.latent_channels, seed=cfg.seed, num_vq_embeddings=cfg.codebook_size)
    model = load_autoencoder(pretrained_vae(cfg.pretrained)).requires_grad_(True).train()
    if isinstance(model, VQModel) != (cfg.objective == "vq_gan"):
        fits = "vq_gan" if isinstance(model, VQModel) else "kl_plain or kl_gan"
        raise config_lib.ConfigError(f"objective={cfg.objective} does not train a {type(model).__name__} "
                                     f"(pretrained={cfg.pretrained}): use {fits}")
    if not cfg.train_encoder:
        freeze_encoder(model)
    return model


def build_objective(cfg: AutoencoderJob, device) -> FirstStageLoss:
    """The loss with its frozen LPIPS network and its discriminator (loaded first: a missing
    LPIPS backbone stops the run before any data is read)."""
    if cfg.objective == "kl_plain":
        return FirstStageLoss("kl_plain", kl_weight=cfg.kl_weight)
    lpips = load_lpips(cfg.lpips_net, cfg.lpips_weights).to(device)
    disc = build_discriminator(cfg.disc_channels, cfg.disc_layers, cfg.disc_norm, seed=cfg.seed + 1).to(device)
    return FirstStageLoss(cfg.objective, lpips=lpips, discriminator=disc, kl_weight=cfg.kl_weight,
                          lpips_weight=cfg.lpips_weight, disc_weight=cfg.disc_weight,
                          disc_start_samples=cfg.disc_start_samples, codebook_weight=cfg.codebook_weight,
                          vq_beta=cfg.vq_beta)


def _clip_step(params, opt, grad_clip: float) -> torch.Tensor:
    """Clip (where grad_clip > 0) and step; returns the gradient norm before clipping, for the
    log (an infinite limit leaves the gradients as they are)."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    opt.step()
    return norm


@config_lib.holds_run_dir
def train_autoencoder(cfg: AutoencoderJob) -> str:
    """Train, checkpoint, resume, export. Returns the export folder (the checkpoint when
    `stop_after_samples` ended the invocation early)."""
    preemption = Preemption()  # before the DataLoader forks: its workers inherit the handler
    # Data parallel over torchrun / accelerate launch / srun ranks: each rank draws its own
    # batches, the gradients are averaged (dist.average_gradients), the weights stay equal.
    w = dist.init()
    batch = cfg.batch_per_rank * w.size  # images per optimizer step, all ranks
    if w.is_main:  # total_samples may grow; until a first checkpoint the folder binds nothing (#29)
        ckpt_root = cfg.checkpoint_url or checkpoint.default_root(cfg.run_dir)
        config_lib.save_resolved(cfg, cfg.run_dir, ignore=("stop_after_samples", "wandb", "tracker"), grow=("total_samples",),
                                 bound=checkpoint.latest(ckpt_root, cfg.checkpoint_endpoint_url) is not None)
    dist.barrier()
    torch.manual_seed(cfg.seed)
    device = dist.device()
    if cfg.precision == "bf16" and device.type != "cuda":
        print("note: precision=bf16 applies on CUDA only; this CPU run is fp32")
    autocast = (functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
                if cfg.precision == "bf16" and device.type == "cuda" else contextlib.nullcontext)

    # --- models, optimizers, resume -------------------------------------------------------
    model = build_model(cfg)
    if cfg.data.resolution % downsample_factor(model):
        raise config_lib.ConfigError(f"data.resolution={cfg.data.resolution} is not a multiple of "
                                     f"{cfg.pretrained or cfg.preset}'s downsampling factor {downsample_factor(model)}")
    model.to(device)
    objective = build_objective(cfg, device)
    disc = objective.discriminator
    # Adam with beta1 = 0.5, as in taming: GAN training is unstable with a long momentum.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.5, 0.9),
                            weight_decay=0.0)
    disc_opt = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9)) if disc is not None else None
    # The per-step decay as the common EMA's half-life in samples, ramp-up off: the same average.
    ema = (EMA(model, halflife_for_decay(cfg.ema_decay, batch), rampup_ratio=0.0, folder=EMA_FOLDER)
           if cfg.ema_decay > 0 else None)
    usage = (CodebookUsage(model.config.num_vq_embeddings, cfg.codebook_window_batches)
             if cfg.objective == "vq_gan" else None)
    # What a checkpoint holds besides STATE.pt; the same parts are saved and loaded.
    weights = [checkpoint.SafetensorsPart("model", model),
               *([checkpoint.SafetensorsPart("discriminator", disc)] if disc is not None else []),
               *([ema] if ema is not None else [])]
    root, endpoint = cfg.checkpoint_url or checkpoint.default_root(cfg.run_dir), cfg.checkpoint_endpoint_url
    step, loader_state, train_state = 0, None, checkpoint.TorchState(STATE)

    def parts_for(path: str, meta: dict) -> list:
        refuse_older_layout(path, endpoint)
        if meta.get("world_size", 1) != w.size:
            raise checkpoint.CheckpointError(f"checkpoint {path} was written by {meta.get('world_size', 1)} "
                                             f"ranks and this run has {w.size}: resume with the same number")
        return [*weights, train_state]

    resume, _, _ = checkpoint.resume(root, parts_for, endpoint)
    if resume:
        state = train_state.state
        opt.load_state_dict(state["optimizer"])
        if disc_opt is not None:
            disc_opt.load_state_dict(state["disc_optimizer"])
        if usage is not None:
            usage.load_state_dict(state["codebook_usage"])
        step, loader_state = state["step"], state["loaders"][w.rank]
        if w.is_main:
            print(f"resuming from {resume} (step {step})")
    total_steps = cfg.total_samples // batch
    last_step = total_steps
    if cfg.stop_after_samples > 0:
        last_step = min(total_steps, step + math.ceil(cfg.stop_after_samples / batch))
    log_every, ckpt_every = cfg.steps(cfg.log_every_samples, w.size), cfg.steps(cfg.checkpoint_every_samples, w.size)

    # --- data -----------------------------------------------------------------------------
    urls = expand_shards(cfg.data.urls, cfg.data.endpoint_url)
    # The loader splits samples (per bucket) across ranks and workers: counted once, by rank 0.
    counts = dist.all_gather_objects(image_shard_counts(urls, cfg.data.endpoint_url, cfg.run_dir,
                                                        cfg.data.bucketer(), cfg.data.max_member_bytes)
                                     if w.is_main else None)[0]
    loader = build_loader(cfg.data, urls, functools.partial(decode_image_sample, **cfg.data.decode_options()),
                          cfg.batch_per_rank, w, seed=cfg.seed, run_dir=cfg.run_dir, counts=counts,
                          state=loader_state)
    batches = iter(loader)
    curve_keys = ("mse",) if cfg.objective == "kl_plain" else ("l1", "lpips")  # the losses loss.png shows
    runlog = RunLog(cfg.run_dir, w.is_main, resume_step=step, wandb_mode=cfg.wandb, wandb_project="ldm-autoencoder",
                    config=config_lib.to_dict(cfg), plot_keys=curve_keys, tracker=cfg.tracker,
                    plot_title=f"autoencoder ({cfg.objective}) reconstruction loss")
    if step == 0 and objective.lpips is not None and objective.lpips.random_backbone:
        runlog.log(0, samples=0, note=RANDOM_NOTICE)

    def save_checkpoint() -> str:
        # Rank 0 writes the replicated state, with every rank's loader position; the save is
        # collective, so no rank runs ahead of a checkpoint that is not complete.
        loaders = dist.all_gather_objects(loader.state_dict())
        _check_replicas(model, step)
        state = {"optimizer": opt.state_dict(), "step": step, "loaders": loaders, "world_size": w.size}
        if disc_opt is not None:
            state["disc_optimizer"] = disc_opt.state_dict()
        if usage is not None:
            state["codebook_usage"] = usage.state_dict()
        return checkpoint.save(root, step * batch, [*weights, checkpoint.TorchState(STATE, state)],
                               keep_last=cfg.keep_last, endpoint_url=endpoint)

    # --- training loop --------------------------------------------------------------------
    model.train()
    if disc is not None:
        disc.train()
    bar = tqdm(total=total_steps, initial=step, desc=f"autoencoder ({cfg.objective})", unit="step",
               disable=not w.is_main)
    t0, done_since = time.time(), 0
    while step < last_step:
        got = next(batches)
        x = got["x"].to(device)
        # Fill weighs 0 (data_pipeline/loader.py: a bucket's last batch, a failed image's place, a stand-in
        # for a batch whose images all failed): the batch's losses, computed over the whole batch (LPIPS, the
        # discriminator), are scaled by its share of real images, and an all-fill batch trains on nothing.
        keep = got["loss_weight"].float().mean().to(device) if "loss_weight" in got else None
        seen = step * batch
        lr = lr_at(seen, cfg.lr, cfg.warmup_samples, cfg.total_samples)
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast():
            loss, recon, logs = objective.generator_loss(model, x, seen, step_generator(cfg.seed, step, w.rank))
        if keep is not None:
            loss = loss * keep
        if not torch.isfinite(loss):
            raise TrainingError(f"autoencoder loss is {loss.item()} at step {step}; lower lr (now {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(model.parameters())
        grad_norm = _clip_step(model.parameters(), opt, cfg.grad_clip)
        if ema is not None:
            ema.update(seen + batch, batch)
        if objective.gan_active(seen):
            with autocast():
                d_loss, d_logs = objective.discriminator_loss(x, recon)
            if keep is not None:
                d_loss = d_loss * keep
            if not torch.isfinite(d_loss):
                raise TrainingError(f"discriminator loss is {d_loss.item()} at step {step}; "
                                    f"lower disc_lr (now {cfg.disc_lr})")
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            dist.average_gradients(disc.parameters())
            _clip_step(disc.parameters(), disc_opt, cfg.grad_clip)
            logs.update(d_logs)
        if usage is not None:
            usage.update(objective.last_indices, reduce=dist.all_reduce_sum_)
            if cfg.codebook_restart_batches and (step + 1) % cfg.codebook_restart_batches == 0:
                usage.restarted += restart_dead_codes(model.quantize.embedding, objective.last_latents, usage.dead(),
                                                      step_generator(cfg.seed + 1, step), opt)
                dist.broadcast_(model.quantize.embedding.weight)  # rank 0's picks: the codebooks stay equal
        step, done_since = step + 1, done_since + 1
        bar.update(1)
        if step < last_step and preemption.requested():  # SLURM's warning signal or SIGTERM: checkpoint now
            last_step = step

        if step % log_every == 0 or step == total_steps:
            rate = done_since * batch / (time.time() - t0)
            # Means over ranks, in one all-reduce (every rank logs at the same steps).
            keys = sorted(logs)
            means = torch.tensor([loss.item(), *(float(logs[k].detach() if torch.is_tensor(logs[k]) else logs[k])
                                                  for k in keys)], dtype=torch.float64)
            means = (dist.all_reduce_sum_(means) / w.size).tolist()
            mean_loss, values = means[0], dict(zip(keys, means[1:]))
            values.update(usage.stats() if usage is not None else {})
            runlog.log(step, samples=step * batch, loss=mean_loss, **values, lr=lr,
                       disc_active=objective.gan_active(seen), images_per_s=rate,
                       grad_norm=float(grad_norm))  # the last step's, averaged gradients, before clipping
            rec_key = "mse" if cfg.objective == "kl_plain" else "l1"
            bar.set_postfix({rec_key: f"{values[rec_key]:.4f}", "img_s": f"{rate:.0f}"})
            t0, done_since = time.time(), 0
        if step % ckpt_every == 0 or step == last_step:
            path = save_checkpoint()
    bar.close()
    runlog.close()
    if preemption.finish(path):  # stopped by a signal: requeue after SLURM's warning
        return path
    if step < total_steps:
        if w.is_main:
            print(f"stopped after stop_after_samples={cfg.stop_after_samples} at step {step} of {total_steps}; "
                  "rerun the same command to continue")
        return path

    # --- export: the autoencoder alone (EMA weights when kept), by rank 0 -------------------
    export = os.path.join(cfg.run_dir, "export")
    if not w.is_main:
        dist.barrier()
        return export
    model.eval()
    if ema is not None:
        current = model.state_dict()  # buffers, if a preset has any, keep their values
        current.update({k: v.to(current[k].dtype) for k, v in ema.full_state().items()})
        model.load_state_dict(current)
    # A pretrained VAE keeps its scaling factor: the UNets trained on its latents expect it (SD's
    # fine-tuned VAEs kept 0.18215), and with train_encoder=false the latents are unchanged.
    scaling = model.config.scaling_factor if cfg.pretrained else \
        measure_scaling_factor(model, batches, cfg.scaling_samples, seed=cfg.seed)
    model.register_to_config(scaling_factor=scaling)
    model.save_pretrained(export, safe_serialization=True)
    plot_loss(os.path.join(cfg.run_dir, "log.jsonl"), os.path.join(cfg.run_dir, "loss.png"),
              keys=curve_keys, title=f"autoencoder ({cfg.objective}) reconstruction loss")
    print(f"autoencoder exported to {export} (scaling_factor {scaling:.4f})")
    dist.barrier()
    return export
