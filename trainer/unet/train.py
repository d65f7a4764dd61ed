"""Second stage: train the text-conditional UNet on cached latents with DeepSpeed.

Progress is counted in samples seen; within one world size it advances a fixed global batch
per optimizer step, so the data position, the learning rate and every random draw are
functions of the step: resuming means loading the newest complete checkpoint (the one
furthest in samples) and continuing from it. At another world size (elastic resume) the step
is the one at the same sample count, and the sample count keeps growing from where it was.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
from safetensors.torch import load as st_load
from tqdm import tqdm

from data_pipeline import storage
from data_pipeline.latents import EMPTY_CAPTION, decode_sample, latent_affine, read_cached_shard, read_manifest
from models.diffusion import draw_latents, noise_schedule, training_loss
from models.text_encoder import load_text_encoder
from models.unet import build_unet

from trainer.core import checkpoint
from trainer.core import config as config_lib
from trainer.core.errors import TrainingError
from trainer.core.preemption import Preemption
from trainer.core import dist
from trainer.core.data import build_loader, check_manifest
from trainer.core.ema import EMA, EMA_DIR
from trainer.core.engine import (build_engine, deepspeed_config, drop_nonfinite_grads, global_grad_norm,
                                 resolve_precision, set_lr, skipped_steps)
from trainer.core.flops import device_peak_tflops, peak_memory_gb, unet_train_flops_per_sample
from trainer.core.metrics import RunLog, plot_loss


from trainer.unet.job import Plan, UNetJob, make_plan


def lr_at(step: int, cfg: UNetJob, plan: Plan) -> float:
    if step < plan.warmup_steps:
        return cfg.lr * (step + 1) / plan.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - plan.warmup_steps) / max(1, plan.total_steps - plan.warmup_steps))
    shape = 1 - progress if cfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.lr_final_ratio + (1 - cfg.lr_final_ratio) * shape)


def prepare_unet(unet, cfg: UNetJob):
    """The memory and speed options that change how the UNet runs, not what it computes."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    # SDPA dispatches to flash / memory-efficient attention kernels where the GPU has them.
    unet.set_attn_processor(AttnProcessor2_0() if cfg.attention == "sdpa" else AttnProcessor())
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    return unet


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
    preemption = Preemption()  # first: DataLoader workers forked later inherit its signal handler
    w = dist.init(cfg.dist_timeout_s)
    plan = make_plan(cfg, w.size)
    if w.is_main:
        # These keys do not change what is trained, so a resumed run may set them differently.
        config_lib.save_resolved(cfg, cfg.run_dir, ignore=(
            "stop_after_samples", "wandb", "data.num_workers", "peak_tflops", "validate_every_samples",
            "validation_prompts", "validation_steps", "validation_guidance", "validation_negative_prompt",
            "max_nonfinite_steps", "compile", "elastic_resume",
            "dist_timeout_s"))
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

    # --- model, optimizer, EMA, resume -----------------------------------------------------------
    unet = prepare_unet(build_unet(cfg.model, channels, size, context_dim, seed=cfg.seed), cfg)
    # Model FLOPs, the MFU convention: counted on a weightless copy on the meta device (shapes
    # only, instant at any size), without gradient checkpointing's recomputation.
    with torch.device("meta"):
        shapes_only = build_unet(cfg.model, channels, size, context_dim)
    flops_per_sample = unet_train_flops_per_sample(shapes_only, (channels, size, size), (empty.shape[-2], context_dim))
    peak = device_peak_tflops(precision, cfg.peak_tflops)
    engine = build_engine(unet, deepspeed_config(
        batch_per_rank=cfg.batch_per_rank, grad_accum=cfg.grad_accum, world_size=w.size, zero_stage=cfg.zero_stage,
        precision=precision, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
        offload_optimizer=cfg.offload_optimizer))
    if cfg.compile:
        engine.compile()
    # After deepspeed.initialize: under ZeRO-3 the EMA must see each rank's slice, not the full tensors.
    ema = EMA(engine.module, cfg.ema_halflife_samples, cfg.ema_rampup_ratio) if cfg.ema_halflife_samples else None
    schedule = noise_schedule(cfg.prediction_type, zero_terminal_snr=cfg.zero_terminal_snr)
    root, endpoint = cfg.checkpoint_url or checkpoint.default_root(cfg.run_dir), cfg.checkpoint_endpoint_url
    step, samples, nonfinite_steps, loader_state, log_from = 0, 0, 0, None, 0
    resume = checkpoint.latest(root, endpoint)
    if resume:
        written_by = checkpoint.info(resume, endpoint)["world_size"]
        elastic = written_by != w.size
        if elastic and not cfg.elastic_resume:
            raise config_lib.ConfigError(
                f"checkpoint {resume} was written by {written_by} ranks, this job has {w.size}; resume with the same "
                "world size, or set elastic_resume=true to reshard it (DeepSpeed universal checkpoint)")
        state = checkpoint.load(engine, resume, universal=elastic, endpoint_url=endpoint)
        check_manifest(manifest, cfg.data.urls, cfg.cache, state["cache"])
        loader_state, nonfinite_steps, log_from = state["loader"], state.get("nonfinite_steps", 0), state["step"]
        # Progress is samples: at another world size the global batch differs, so the step
        # (and with it the learning rate and the end) is the one at the same sample count.
        samples = state["samples"]  # only grows, so checkpoint names (samples_*) only grow
        step = samples // plan.global_batch
        if ema is not None:
            ema.load(checkpoint.fetch(resume, endpoint_url=endpoint, parts=(EMA_DIR,)))
        if w.is_main:
            print(f"resuming from {resume} at step {step}" +
                  (f" (elastic: written by {written_by} ranks, {state['samples']} samples)" if elastic else ""))

    # --- data: each rank's stream continues where the checkpoint left it ------------------------------
    urls = [storage.join(cfg.data.urls, s["shard"]) for s in manifest["shards"]]
    loader = build_loader(cfg.data, urls, decode_latent_sample, cfg.batch_per_rank, w, seed=cfg.seed,
                          run_dir=cfg.run_dir, counts=[s["count"] for s in manifest["shards"]],
                          checksums=[s["keys_sha256"] for s in manifest["shards"]], read_shard=read_cached_shard,
                          state=loader_state)
    batches, dataset = iter(loader), loader.dataset
    samples_per_epoch = dataset.samples_per_epoch()
    runlog = RunLog(cfg.run_dir, w.is_main, resume_step=log_from, resume_samples=samples, wandb_mode=cfg.wandb,
                    wandb_project=cfg.wandb_project, config=config_lib.to_dict(cfg),
                    plot_title=f"UNet {cfg.model}, {cfg.prediction_type} loss")
    validator = None
    if plan.validate_every_steps:
        from trainer.unet.sampling import Validator  # sampling imports this module

        validator = Validator(cfg, manifest, device, w.is_main)
    if w.is_main:
        print(f"{sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters, {w.size} ranks, global batch "
              f"{plan.global_batch}, {plan.total_steps} steps, {samples_per_epoch} samples per epoch, {precision}, "
              f"{flops_per_sample / 1e9:.2f} GFLOP per sample (forward + backward)")

    def save_checkpoint() -> None:
        checkpoint.save(engine, root, samples, {
            "step": step, "samples": samples, "world_size": w.size, "zero_stage": cfg.zero_stage,
            "nonfinite_steps": nonfinite_steps, "cache": trained_on, "loader": loader.state_dict()},
            keep_last=cfg.keep_last, extra=(lambda path: ema.save(path, w.is_main)) if ema is not None else None,
            endpoint_url=endpoint)

    # --- training loop ------------------------------------------------------------------------------
    bar = tqdm(total=plan.total_steps, initial=step, desc="unet", unit="step", disable=not w.is_main)
    losses, wait_s, read_bytes, t0, streak = [], 0.0, 0, time.time(), 0
    last_step = plan.total_steps
    if cfg.stop_after_samples > 0:
        last_step = min(last_step, step + math.ceil(cfg.stop_after_samples / plan.global_batch))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while step < last_step:
        lr = lr_at(step, cfg, plan)
        set_lr(engine, lr)
        step_loss, skipped_before, dropped = 0.0, skipped_steps(engine), False
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
            if cfg.channels_last:
                z0 = z0.contiguous(memory_format=torch.channels_last)
            if text_encoder is not None:
                with torch.no_grad():
                    context = text_encoder(batch["tokens"].long().to(device)).to(dtype)
            else:
                context = batch["text_emb"].to(device, dtype)
            # Classifier-free guidance needs an unconditional model: some captions become "".
            drop = torch.rand(context.shape[0], generator=gen, device=device) < cfg.caption_dropout
            context = torch.where(drop[:, None, None], empty, context)
            loss = training_loss(engine, z0, context, schedule, gen, min_snr_gamma=cfg.min_snr_gamma,
                                 offset_noise=cfg.offset_noise)
            engine.backward(loss)
            if micro == cfg.grad_accum - 1:
                dropped = drop_nonfinite_grads(engine)
            engine.step()
            step_loss += loss.item() / cfg.grad_accum
        step, samples = step + 1, samples + plan.global_batch
        bar.update(1)

        # --- a NaN/inf loss: the step was skipped; too many in a row end the run ----------------------
        step_loss = dist.all_reduce_mean(step_loss)  # non-finite on every rank if on any
        applied = not dropped and skipped_steps(engine) == skipped_before
        if math.isfinite(step_loss):
            losses.append(step_loss)
            streak = 0
        else:
            nonfinite_steps, streak = nonfinite_steps + 1, streak + 1
            if applied:  # never expected: DeepSpeed or drop_nonfinite_grads skip such steps
                raise TrainingError(f"loss was {step_loss} at step {step} and the optimizer step was "
                                               "applied; the weights may hold NaN, resume from the last checkpoint")
            if w.is_main:
                print(f"step {step}: loss is {step_loss}, step skipped ({nonfinite_steps} so far)")
        if applied and ema is not None:
            ema.update(samples, plan.global_batch)

        if step < last_step and preemption.requested():  # SIGUSR1/SIGTERM on any rank: every rank stops here,
            last_step = step  # logs and checkpoints as at the end of an invocation, then leaves the loop

        # --- logs, validation grids, checkpoints ------------------------------------------------------------
        give_up = streak >= cfg.max_nonfinite_steps
        if step % plan.log_every_steps == 0 or step == last_step or give_up:
            elapsed = time.time() - t0
            images_per_s = plan.log_every_steps * plan.global_batch / elapsed if losses else 0.0
            tflops = images_per_s / w.size * flops_per_sample / 1e12  # per device
            runlog.log(step, samples=samples, epoch=samples / samples_per_epoch,
                       loss=sum(losses) / len(losses) if losses else float("nan"), lr=lr,
                       images_per_s=images_per_s, data_wait_share=wait_s / elapsed,
                       read_mb_per_s_per_rank=read_bytes / elapsed / 1e6, tflops_per_device=tflops,
                       mfu=tflops / peak if peak else None, peak_memory_gb=peak_memory_gb(),
                       nonfinite_steps=nonfinite_steps, skipped_steps=skipped_steps(engine),
                       grad_norm=global_grad_norm(engine))  # the last step's, before clipping
            if losses:
                bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}")
            losses, wait_s, read_bytes, t0 = [], 0.0, 0, time.time()
        if give_up:
            raise TrainingError(
                f"loss was NaN/inf for {streak} consecutive steps (up to step {step}); stopping with the weights "
                f"of the last good step; newest complete checkpoint: {checkpoint.latest(root, endpoint) or 'none yet'}. "
                f"Lower lr (now {cfg.lr}), check the cache, or raise max_nonfinite_steps")
        if validator is not None and (step % plan.validate_every_steps == 0 or step == plan.total_steps):
            validator(step, ema.full_state() if ema is not None else None, engine, runlog)
        if step % plan.checkpoint_every_steps == 0 or step == last_step:
            save_checkpoint()
    bar.close()
    runlog.close()

    # --- the end: a loss curve beside the final checkpoint ---------------------------------------------
    final = checkpoint.latest(root, endpoint)
    if w.is_main:
        png = plot_loss(os.path.join(cfg.run_dir, "log.jsonl"), os.path.join(cfg.run_dir, "loss.png"),
                        title=f"UNet {cfg.model}, {cfg.prediction_type} loss")
        print(f"final checkpoint: {final}\nloss curve: {png}")
    dist.barrier()
    preemption.finish(final)  # stopped by SLURM's warning signal: rank 0 requeues the job
    return final
