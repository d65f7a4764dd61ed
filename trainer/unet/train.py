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

import torch
from safetensors.torch import load as st_load
from tqdm import tqdm

from data_pipeline import storage
from data_pipeline.latents import EMPTY_CAPTION, read_cached_shard
from models.unet import needs_time_ids

from trainer.cache.manifest import Manifest
from trainer.core import checkpoint, dist
from trainer.core import config as config_lib
from trainer.core.checkpoint_deepspeed import EnginePart
from trainer.core.data import build_loader
from trainer.core.ema import EMA
from trainer.core.engine import global_grad_norm, resolve_precision, set_lr
from trainer.core.errors import TrainingError
from trainer.core.flops import device_peak_tflops, flow_train_flops_per_sample, peak_memory_gb, \
    unet_train_flops_per_sample
from trainer.core.metrics import RunLog, SampleLog, StepTally
from trainer.core.preemption import Preemption
from trainer.core.schedule import lr_at
from trainer.unet import pretrained
from trainer.unet.data import caption_picker, check_caches, training_data
from trainer.unet.job import UNetJob, ema_rampup, make_plan
from trainer.unet.lora import check_base
from trainer.unet.sampling import Validator
from trainer.unet.pretrained import flow_family, training_schedule
from trainer.unet.step import DTYPES, build_unet_engine, flow_objective, step_setup, train_step, unet_ds_config


@config_lib.holds_run_dir
def train_unet(cfg: UNetJob) -> str:
    # --- distributed set-up and the derived plan ---------------------------------------------
    preemption = Preemption()  # first: DataLoader workers forked later inherit its signal handler
    w = dist.init(cfg.dist_timeout_s)
    cfg = pretrained.resolve(cfg, say=print if w.is_main else None)  # prediction_type=auto: pretrained's
    plan = make_plan(cfg, w.size)
    # --- the cache this run trains on: checked before config.yaml is written, so a refusal locks nothing ------
    manifest = Manifest.read(cfg.data.urls, cfg.data.endpoint_url)
    trained_on = manifest.check_expected(cfg.data.urls, cfg.cache, None)
    # A cache made with other encoders than pretrained's: every rank stops, with rank 0's reason.
    mismatch = dist.all_gather_objects(pretrained.cache_mismatch(cfg, manifest, cfg.data.urls) if w.is_main else None)
    if mismatch[0]:
        raise config_lib.ConfigError(mismatch[0])
    check_caches(cfg, manifest)
    root, endpoint = cfg.checkpoint_url or checkpoint.default_root(cfg.run_dir), cfg.checkpoint_endpoint_url
    if w.is_main:
        # These keys do not change what is trained, so a resumed run may set them differently; total_samples
        # may grow (the schedule continues to the new end). Until a first checkpoint the folder binds nothing.
        config_lib.save_resolved(cfg, cfg.run_dir, ignore=(
            "stop_after_samples", "wandb", "tracker", "data.num_workers", "peak_tflops", "validate_every_samples",
            "validation_prompts", "validation_steps", "validation_guidance", "validation_negative_prompt",
            "max_nonfinite_steps", "compile", "elastic_resume", "data.log_samples",
            "dist_timeout_s"), grow=("total_samples",), bound=checkpoint.latest(root, endpoint) is not None,
            notes=pretrained.trained_model_notes(cfg))
    dist.barrier()
    device, precision = dist.device(), resolve_precision(cfg.precision)
    dtype = DTYPES[precision]

    channels, size, _ = manifest.latent_shape
    context_dim = manifest.text_emb_shape[1]
    shift, scale = (t.to(device) for t in manifest.latent_affine(cfg.latent_norm))
    # A cache of token ids: the text encoder runs inside the step (frozen, or with lora_text_encoder adapted,
    # riding on the engine's UNet).
    text_encoder = manifest.text_encoder.load().to(device) if manifest.text == "tokens" else None
    empty_all = st_load(storage.read_bytes(storage.join(cfg.data.urls, EMPTY_CAPTION), cfg.data.endpoint_url))
    family = flow_family(cfg)  # "sd3" | "flux": a rectified-flow transformer; None: a UNet
    if family is not None and text_encoder is not None:  # token ids: "" through the encoders, as every caption
        with torch.no_grad():
            empty_all = {k: v[0] for k, v in text_encoder.embed([""]).items() if k != "text_len"}
    empty = empty_all["text_emb"].to(device, dtype)
    pooled_dim, empty_pooled, empty_clip = manifest.pooled_dim, None, None
    if family is not None:  # SD3/Flux: dropout puts the empty caption's encodings in place of every text input
        empty_pooled = empty_all["pooled"].to(device, dtype)
        empty_clip = empty_all["clip_emb"].to(device, dtype) if "clip_emb" in empty_all else None
    elif pooled_dim:  # SDXL: dropout zeroes both encoders' outputs, as its pipelines' force_zeros_for_empty_prompt
        empty, empty_pooled = torch.zeros_like(empty), torch.zeros(pooled_dim, device=device, dtype=dtype)

    # --- model, optimizer, EMA, resume -----------------------------------------------------------
    # Model FLOPs, the MFU convention: counted on a weightless copy on the meta device (shapes
    # only, instant at any size), without gradient checkpointing's recomputation.
    with torch.device("meta"):
        shapes_only = pretrained.shapes_only(cfg, channels, size, context_dim, pooled_dim)
    if family is not None:  # the text sequence: SD3's CLIP states before T5's
        text_tokens = empty.shape[-2] + (empty_clip.shape[-2] if empty_clip is not None else 0)
        flops_per_sample = flow_train_flops_per_sample(shapes_only, family, (channels, size, size),
                                                       (text_tokens, context_dim), pooled_dim)
    else:
        flops_per_sample = unet_train_flops_per_sample(shapes_only, (channels, size, size), (empty.shape[-2], context_dim))
    peak = device_peak_tflops(precision, cfg.peak_tflops)
    # init_from: another run's weights to start from, unless this run has a checkpoint of its own to resume.
    engine = build_unet_engine(cfg, channels, size, context_dim, unet_ds_config(cfg, w.size, precision), pooled_dim,
                               init_from=bool(cfg.init_from) and checkpoint.latest(root, endpoint) is None,
                               say=print if w.is_main else (lambda _: None), text_encoder=text_encoder)
    unet = engine.module
    # After deepspeed.initialize: under ZeRO-3 the EMA must see each rank's slice, not the full tensors.
    ema = EMA(engine.module, cfg.ema_halflife_samples, ema_rampup(cfg), trainable_only=cfg.lora_rank > 0) \
        if cfg.ema_halflife_samples else None
    if ema is not None and ema_rampup(cfg) != cfg.ema_rampup_ratio and w.is_main:
        print(f"LoRA: the adapters start at zero, so their EMA ramps up (ema_rampup_ratio={ema_rampup(cfg):g})")
    lora = cfg.lora_rank > 0  # checkpoints hold the adapters alone; the frozen base is pretrained's
    step_cfg = step_setup(cfg, rank=w.rank, device=device, dtype=dtype, shift=shift, scale=scale, empty=empty,
                          text_encoder=text_encoder, empty_pooled=empty_pooled, empty_clip=empty_clip,
                          flow=flow_objective(cfg, training_schedule(cfg), unet.config))
    step, samples, nonfinite_steps, loader_state, log_from = 0, 0, 0, None, 0

    def parts_for(path: str, meta: dict) -> list:
        elastic = meta.get("world_size", 1) != w.size
        if elastic and not cfg.elastic_resume:
            raise config_lib.ConfigError(
                f"checkpoint {path} was written by {meta.get('world_size', 1)} ranks, this job has {w.size}; resume with the "
                "same world size, or set elastic_resume=true to reshard it (DeepSpeed universal checkpoint)")
        return [EnginePart(engine, universal=elastic, exclude_frozen=lora), *([ema] if ema is not None else [])]

    resume, meta, parts = checkpoint.resume(root, parts_for, endpoint)
    if resume:
        written_by, engine_part = meta.get("world_size", 1), parts[0]
        elastic = written_by != w.size
        state = engine_part.state
        manifest.check_expected(cfg.data.urls, cfg.cache, state["cache"])
        if lora:
            check_base(unet, state.get("lora_base"), f"checkpoint {resume}", cfg.pretrained)
        loader_state, nonfinite_steps, log_from = state["loader"], state.get("nonfinite_steps", 0), state["step"]
        # Progress is samples: at another world size the global batch differs, so the step
        # (and with it the learning rate and the end) is the one at the same sample count.
        samples = state["samples"]  # only grows, so checkpoint names (samples_*) only grow
        step = samples // plan.global_batch
        if w.is_main:
            print(f"resuming from {resume} at step {step}" +
                  (f" (elastic: written by {written_by} ranks, {state['samples']} samples)" if elastic else ""))
            was = state.get("total_samples", cfg.total_samples)
            if was != cfg.total_samples:  # grown (save_resolved refuses a shrink): the schedule runs to the new end
                before = lr_at(step, cfg.lr, plan.warmup_steps, math.ceil(was / plan.global_batch), cfg.lr_schedule,
                               cfg.lr_final_ratio)
                now = lr_at(step, cfg.lr, plan.warmup_steps, plan.total_steps, cfg.lr_schedule, cfg.lr_final_ratio)
                print(f"total_samples grew from {was} to {cfg.total_samples}: training continues to the new end"
                      + (f"; the {cfg.lr_schedule} schedule is stretched to it (lr {before:.3g} -> {now:.3g} here)"
                         if abs(before - now) > 1e-12 else ""))

    # --- data: each rank's stream continues where the checkpoint left it ------------------------------
    # A bucketed cache: every batch holds one bucket's shape (its samples' .json names it). With
    # data.class_urls, the class images' cache trains beside it (DreamBooth prior preservation).
    td = training_data(cfg.data, manifest, needs_time_ids(unet.config), cfg.random_flip,
                       caption_picker(cfg, manifest, text_encoder),
                       token_length=text_encoder.tokenize([""]).shape[-1] if text_encoder is not None else 0)
    loader = build_loader(cfg.data, td.urls, td.decode, cfg.batch_per_rank, w, seed=cfg.seed, run_dir=cfg.run_dir,
                          counts=td.counts, checksums=td.checksums, read_shard=read_cached_shard, state=loader_state,
                          bucketer=td.bucketer, repeats=td.repeats, weights=td.weights)
    batches, dataset = iter(loader), loader.dataset
    # An epoch is every sample once (repeats included) plus the fill of bucket's last batches, weighted 0.
    samples_per_epoch, slots_per_epoch = dataset.samples_per_epoch(), dataset.slots_per_epoch()
    runlog = RunLog(cfg.run_dir, w.is_main, resume_step=log_from, resume_samples=samples, wandb_mode=cfg.wandb,
                    wandb_project=cfg.wandb_project, config=config_lib.to_dict(cfg), tracker=cfg.tracker,
                    plot_title=f"UNet {cfg.pretrained or cfg.model}, {cfg.prediction_type} loss")
    sample_log = SampleLog(cfg.run_dir, w.rank, samples, w.is_main) if cfg.data.log_samples else None
    dist.barrier()  # rank 0 cut the sample logs back to the resumed step before anyone appends
    validator = None
    if plan.validate_every_steps:
        validator = Validator(cfg, manifest, device, w.is_main)
    if w.is_main:
        dreambooth = (f" with {td.class_samples} class images x{cfg.data.class_repeats} weighted "
                      f"{cfg.data.prior_loss_weight}" if td.class_samples else "")
        print(f"{sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters, {w.size} ranks, global batch "
              f"{plan.global_batch}, {plan.total_steps} steps, {samples_per_epoch} samples per epoch{dreambooth} "
              f"({1 - samples_per_epoch / slots_per_epoch:.0%} of its batch places filled, weighted 0), {precision}, "
              f"{flops_per_sample / 1e9:.2f} GFLOP per sample (forward + backward)")

    def save_checkpoint() -> None:
        state = {"step": step, "samples": samples, "world_size": w.size, "zero_stage": cfg.zero_stage,
                 "nonfinite_steps": nonfinite_steps, "cache": trained_on, "loader": loader.state_dict(),
                 "total_samples": cfg.total_samples,
                 **({"lora_base": unet.ldm_base_fingerprint} if lora else {})}
        parts = [EnginePart(engine, state, exclude_frozen=lora), *([ema] if ema is not None else [])]
        started = time.time()
        path = checkpoint.save(root, samples, parts, keep_last=cfg.keep_last, endpoint_url=endpoint)
        if w.is_main:  # a line per checkpoint: the end of a large run is minutes of it (#29: silent before)
            tqdm.write(f"step {step}: checkpoint {path} ({time.time() - started:.1f} s)")

    # --- training loop ------------------------------------------------------------------------------
    bar = tqdm(total=plan.total_steps, initial=step, desc="unet", unit="step", disable=not w.is_main)
    tally, wait_s, read_bytes, t0, logged_steps = StepTally(device), 0.0, 0, time.time(), step
    last_step = plan.total_steps
    if cfg.stop_after_samples > 0:
        last_step = min(last_step, step + math.ceil(cfg.stop_after_samples / plan.global_batch))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while step < last_step:
        lr = lr_at(step, cfg.lr, plan.warmup_steps, plan.total_steps, cfg.lr_schedule, cfg.lr_final_ratio)
        set_lr(engine, lr)
        result = train_step(engine, batches, step, step_cfg)
        if sample_log is not None:
            sample_log.write(samples, result.keys, result.epochs, result.weights)
        wait_s, read_bytes = wait_s + result.wait_s, read_bytes + result.read_bytes
        step, samples = step + 1, samples + plan.global_batch
        bar.update(1)
        # Loss and skip stay on the device (a skipped step, non-finite loss or gradient, changed no weight);
        # the EMA folds the weights in only where the step was applied, decided on the device too.
        tally.add(result.loss, result.applied)
        if ema is not None:
            ema.update(samples, plan.global_batch, result.applied)

        if step < last_step and preemption.requested():  # SIGUSR1/SIGTERM on any rank: every rank stops here,
            last_step = step  # logs and checkpoints as at the end of an invocation, then leaves the loop

        # --- NaN/inf steps, read at logging and checkpoint steps: too many in a row end the run ---------
        log_now, checkpoint_now = step % plan.log_every_steps == 0 or step == last_step, \
            step % plan.checkpoint_every_steps == 0 or step == last_step
        give_up = False
        if log_now or checkpoint_now:
            skipped, streak, applied_nonfinite = tally.read_counts()
            if applied_nonfinite:  # never expected: the step skips itself on a non-finite gradient norm
                raise TrainingError(f"a NaN/inf loss before step {step} was applied to the weights; the weights may "
                                    "hold NaN, resume from the last checkpoint")
            nonfinite_steps += skipped
            give_up = streak >= cfg.max_nonfinite_steps
            if skipped and w.is_main:
                print(f"step {step}: {skipped} step(s) skipped since the last report, the loss or a gradient was NaN/inf "
                      f"({nonfinite_steps} so far)")

        # --- logs, validation grids, checkpoints ------------------------------------------------------------
        if log_now or give_up:
            elapsed = time.time() - t0
            loss = tally.read_loss()
            images_per_s = (step - logged_steps) * plan.global_batch / elapsed
            tflops = images_per_s / w.size * flops_per_sample / 1e12  # per device
            runlog.log(step, samples=samples, epoch=samples / slots_per_epoch, loss=loss, lr=lr,
                       images_per_s=images_per_s, data_wait_share=wait_s / elapsed,
                       read_mb_per_s_per_rank=read_bytes / elapsed / 1e6, tflops_per_device=tflops,
                       mfu=tflops / peak if peak else None, peak_memory_gb=peak_memory_gb(),
                       nonfinite_steps=nonfinite_steps, skipped_steps=nonfinite_steps,
                       grad_norm=global_grad_norm(engine))  # the last step's, before clipping
            if math.isfinite(loss):
                bar.set_postfix(loss=f"{loss:.4f}")
            wait_s, read_bytes, t0, logged_steps = 0.0, 0, time.time(), step
        if give_up:
            raise TrainingError(
                f"loss or gradients were NaN/inf for {streak} consecutive steps (up to step {step}); stopping with the "
                f"weights of the last good step; newest complete checkpoint: {checkpoint.latest(root, endpoint) or 'none yet'}. "
                f"Lower lr (now {cfg.lr}), check the cache, or raise max_nonfinite_steps")
        if validator is not None and (step % plan.validate_every_steps == 0 or step == plan.total_steps):
            validator(step, ema.full_state() if ema is not None else None, engine, runlog, samples)
        if checkpoint_now:
            save_checkpoint()
    bar.close()
    if w.is_main:
        print("drawing the loss curve")
    runlog.close()

    # --- the end: the final checkpoint and the loss curve (drawn by runlog.close) ----------------------
    final = checkpoint.latest(root, endpoint)
    if w.is_main:
        print(f"final checkpoint: {final}\nloss curve: {runlog.png}")
    dist.barrier()
    preemption.finish(final)  # stopped by SLURM's warning signal: rank 0 requeues the job
    return final
