"""Second stage: train the text-conditional UNet on cached latents with DeepSpeed.

Progress is counted in optimizer steps of a fixed global batch, so samples seen, the data
position, the learning rate and every random draw are functions of the step: resuming
means loading the newest complete checkpoint and continuing from its step.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np
import torch
from safetensors.torch import load as st_load
from tqdm import tqdm

from data_pipeline import storage
from data_pipeline.latents import EMPTY_CAPTION, decode_sample, latent_affine, read_manifest
from models.diffusion import draw_latents, noise_schedule, training_loss
from models.text_encoder import load_text_encoder
from models.unet import build_unet

from . import checkpoint
from . import config as config_lib
from . import dist
from .data import CacheExpect, ShardData, build_loader, check_manifest
from .engine import build_engine, deepspeed_config, resolve_precision, set_lr
from .metrics import RunLog, plot_loss


@dataclasses.dataclass
class UNetJob:
    run_dir: str = "runs/unet"  # checkpoints, log.jsonl, loss.png, config.yaml
    data: ShardData = dataclasses.field(default_factory=ShardData)  # data.urls: the latent cache root
    cache: CacheExpect = dataclasses.field(default_factory=CacheExpect)  # what the cache must have been made with
    latent_norm: str = "scaling_factor"  # scaling_factor (the VAE's) | per_channel (the cache's measured mean/std)
    random_flip: bool = False  # train on the mirrored image's moments half the time (cache made with flip=true)
    model: str = "demo"  # UNet preset (tiny, demo, sd15, sd21) or a diffusers config.json
    prediction_type: str = "epsilon"  # epsilon | v_prediction (Salimans & Ho 2022)
    caption_dropout: float = 0.1  # share of captions replaced by the empty caption (for CFG)
    batch_per_rank: int = 64  # micro batch on each rank
    grad_accum: int = 1  # micro batches per optimizer step
    total_samples: int = 80_000  # training length in samples (all ranks together)
    lr: float = 3e-4  # AdamW peak learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    warmup_samples: int = 4_000  # linear warm-up, then cosine decay to 10% of lr
    grad_clip: float = 1.0  # max global gradient norm
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    precision: str = "auto"  # auto (bf16 on capable GPUs, else fp32) | fp32 | bf16 | fp16
    seed: int = 0  # weights init, data order, noise
    log_every_samples: int = 1_280  # JSONL/wandb logging interval
    checkpoint_every_samples: int = 20_000  # resumable checkpoint interval
    keep_last: int = 2  # complete checkpoints kept
    stop_after_samples: int = 0  # end this invocation with a checkpoint after this many more samples (0: never);
    #   for time-sliced queues: rerunning the same command continues, the trajectory is unchanged
    wandb: str = "offline"  # offline (files in run_dir/wandb) | online | disabled; env WANDB_MODE wins
    wandb_project: str = "ldm"  # wandb project name

    def validate(self) -> None:
        if not self.data.urls:
            raise config_lib.ConfigError("data.urls is empty: name the latent cache to train on")
        if self.zero_stage not in (0, 1, 2, 3):
            raise config_lib.ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise config_lib.ConfigError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise config_lib.ConfigError(f"prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}")
        for key in ("batch_per_rank", "grad_accum", "total_samples", "log_every_samples", "checkpoint_every_samples"):
            if getattr(self, key) <= 0:
                raise config_lib.ConfigError(f"{key} must be positive, got {getattr(self, key)}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything derived from the config and the world size, computed in one place."""
    world_size: int
    global_batch: int  # samples per optimizer step, all ranks together
    total_steps: int
    warmup_steps: int
    log_every_steps: int
    checkpoint_every_steps: int


def make_plan(cfg: UNetJob, world_size: int) -> Plan:
    global_batch = cfg.batch_per_rank * cfg.grad_accum * world_size
    plan = Plan(world_size, global_batch, total_steps=math.ceil(cfg.total_samples / global_batch),
                warmup_steps=math.ceil(cfg.warmup_samples / global_batch),
                log_every_steps=max(1, cfg.log_every_samples // global_batch),
                checkpoint_every_steps=max(1, cfg.checkpoint_every_samples // global_batch))
    assert plan.global_batch == cfg.batch_per_rank * cfg.grad_accum * plan.world_size
    return plan


def lr_at(step: int, cfg: UNetJob, plan: Plan) -> float:
    if step < plan.warmup_steps:
        return cfg.lr * (step + 1) / plan.warmup_steps
    progress = (step - plan.warmup_steps) / max(1, plan.total_steps - plan.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def micro_seed(seed: int, rank: int, micro_step: int) -> int:
    """Seed of the noise, timesteps and caption dropout of one micro batch of one rank."""
    return int(np.random.SeedSequence([seed, rank, micro_step]).generate_state(1)[0])


decode_latent_sample = decode_sample  # the loader's decode for latent shards


def load_cache_text_encoder(manifest: dict):
    """The text encoder a cache was made with, checked against its recorded identity."""
    te = manifest["text_encoder"]
    text_encoder = load_text_encoder(te["spec"], te["layer"])
    if text_encoder.identity() != te["identity"]:
        raise config_lib.ConfigError(f"text encoder {te['spec']} is not the one the cache was made with")
    return text_encoder


def train_unet(cfg: UNetJob) -> str:
    # --- distributed set-up and the derived plan ---------------------------------------------
    w = dist.init()
    plan = make_plan(cfg, w.size)
    if w.is_main:
        # These keys do not change what is trained, so a resumed run may set them differently.
        config_lib.save_resolved(cfg, cfg.run_dir, ignore=("stop_after_samples", "wandb", "data.num_workers"))
    dist.barrier()
    device, precision = dist.device(), resolve_precision(cfg.precision)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    # --- the cache this run trains on ----------------------------------------------------------
    manifest = read_manifest(cfg.data.urls, cfg.data.endpoint_url)
    trained_on = check_manifest(manifest, cfg.data.urls, cfg.cache, None)
    if cfg.random_flip and not manifest["flip"]:
        raise config_lib.ConfigError(f"random_flip needs a cache made with flip=true; {cfg.data.urls} has none")
    channels, size, _ = manifest["latent_shape"]
    context_dim = manifest["text_emb_shape"][1]
    shift, scale = (t.to(device) for t in latent_affine(manifest, cfg.latent_norm))
    # A cache of token ids: the frozen text encoder runs inside the step.
    text_encoder = load_cache_text_encoder(manifest).to(device) if manifest["text"] == "tokens" else None
    empty = st_load(storage.read_bytes(storage.join(cfg.data.urls, EMPTY_CAPTION), cfg.data.endpoint_url))["text_emb"]
    empty = empty.to(device, dtype)

    # --- model, optimizer, resume ------------------------------------------------------------------
    unet = build_unet(cfg.model, channels, size, context_dim, seed=cfg.seed)
    engine = build_engine(unet, deepspeed_config(
        batch_per_rank=cfg.batch_per_rank, grad_accum=cfg.grad_accum, world_size=w.size, zero_stage=cfg.zero_stage,
        precision=precision, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip))
    schedule = noise_schedule(cfg.prediction_type)
    step, resume, loader_state = 0, checkpoint.latest(cfg.run_dir), None
    if resume:
        state = checkpoint.load(engine, resume)
        if state["world_size"] != w.size:
            raise config_lib.ConfigError(f"checkpoint {resume} was written by {state['world_size']} ranks, this job has "
                                         f"{w.size}; resume with the same world size or start a new run_dir")
        check_manifest(manifest, cfg.data.urls, cfg.cache, state["cache"])
        step, loader_state = state["step"], state["loader"]
        if w.is_main:
            print(f"resuming from {resume} at step {step}")

    # --- data: each rank's stream continues where the checkpoint left it ------------------------------
    urls = [storage.join(cfg.data.urls, s["shard"]) for s in manifest["shards"]]
    loader = build_loader(cfg.data, urls, decode_latent_sample, cfg.batch_per_rank, w, seed=cfg.seed,
                          run_dir=cfg.run_dir, counts=[s["count"] for s in manifest["shards"]],
                          checksums=[s["sha256"] for s in manifest["shards"]], state=loader_state)
    batches, dataset = iter(loader), loader.dataset
    samples_per_epoch = dataset.samples_per_epoch()
    runlog = RunLog(cfg.run_dir, w.is_main, resume_step=step, wandb_mode=cfg.wandb,
                    wandb_project=cfg.wandb_project, config=config_lib.to_dict(cfg))
    if w.is_main:
        print(f"{sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters, {w.size} ranks, global batch "
              f"{plan.global_batch}, {plan.total_steps} steps, {samples_per_epoch} samples per epoch, {precision}")

    # --- training loop ------------------------------------------------------------------------------
    bar = tqdm(total=plan.total_steps, initial=step, desc="unet", unit="step", disable=not w.is_main)
    losses, wait_s, read_bytes, t0 = [], 0.0, 0, time.time()
    last_step = plan.total_steps
    if cfg.stop_after_samples > 0:
        last_step = min(last_step, step + math.ceil(cfg.stop_after_samples / plan.global_batch))
    while step < last_step:
        lr = lr_at(step, cfg, plan)
        set_lr(engine, lr)
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            t_wait = time.time()
            batch = next(batches)
            wait_s += time.time() - t_wait
            read_bytes += batch["bytes"]
            gen = torch.Generator(device).manual_seed(micro_seed(cfg.seed, w.rank, step * cfg.grad_accum + micro))
            mean, std = batch["mean"].to(device), batch["std"].to(device)
            if cfg.random_flip:  # the mirrored image's moments for a random half of the batch
                flip = (torch.rand(mean.shape[0], generator=gen, device=device) < 0.5)[:, None, None, None]
                mean = torch.where(flip, batch["mean_flip"].to(device), mean)
                std = torch.where(flip, batch["std_flip"].to(device), std)
            z0 = ((draw_latents(mean, std, gen) - shift) * scale).to(dtype)
            if text_encoder is not None:
                context = text_encoder(batch["tokens"].long().to(device)).to(dtype)
            else:
                context = batch["text_emb"].to(device, dtype)
            # Classifier-free guidance needs an unconditional model: some captions become "".
            drop = torch.rand(context.shape[0], generator=gen, device=device) < cfg.caption_dropout
            context = torch.where(drop[:, None, None], empty, context)
            loss = training_loss(engine, z0, context, schedule, gen)
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / cfg.grad_accum
        step += 1
        losses.append(dist.all_reduce_mean(step_loss))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"loss is {losses[-1]} at step {step}; lower lr (now {cfg.lr}) or check the cache")
        bar.update(1)

        if step % plan.log_every_steps == 0 or step == last_step:
            elapsed = time.time() - t0
            samples = step * plan.global_batch
            runlog.log(step, samples=samples, epoch=samples / samples_per_epoch, loss=sum(losses) / len(losses), lr=lr,
                       images_per_s=len(losses) * plan.global_batch / elapsed, data_wait_share=wait_s / elapsed,
                       read_mb_per_s_per_rank=read_bytes / elapsed / 1e6)
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}")
            losses, wait_s, read_bytes, t0 = [], 0.0, 0, time.time()
        if step % plan.checkpoint_every_steps == 0 or step == last_step:
            checkpoint.save(engine, cfg.run_dir, step, {
                "step": step, "samples": step * plan.global_batch, "world_size": w.size,
                "cache": trained_on, "loader": loader.state_dict()}, keep_last=cfg.keep_last)
    bar.close()
    runlog.close()

    # --- the end: a loss curve beside the final checkpoint ---------------------------------------------
    final = checkpoint.latest(cfg.run_dir)
    if w.is_main:
        png = plot_loss(os.path.join(cfg.run_dir, "log.jsonl"), os.path.join(cfg.run_dir, "loss.png"),
                        title=f"UNet {cfg.model}, {cfg.prediction_type} loss")
        print(f"final checkpoint: {final}\nloss curve: {png}")
    dist.barrier()
    return final
