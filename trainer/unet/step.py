"""One optimizer step of the UNet job, and the engine it steps: shared by the training loop and
every benchmark, so that what a benchmark times is what training runs.

A step is `grad_accum` micro batches. Each draws its latents from the cached posterior moments
(optionally the mirrored image's), normalises them, embeds token captions where the cache holds
tokens, replaces a random share of the captions by the empty one, and takes the diffusion loss,
backward and DeepSpeed's step. Every random draw of a micro batch comes from one generator seeded
by (seed, rank, micro step), in a fixed order, so a resumed run draws exactly what an
uninterrupted one would have.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterator

import numpy as np
import torch

from models.diffusion import draw_latents, training_loss
from models.flow import flow_loss, flux_mu
from models.flow_model import family_of, sd3_context, velocity

from trainer.core.engine import build_engine, deepspeed_config, skipped_steps, step_applied
from trainer.unet.job import UNetJob
from trainer.unet.lora import add_text_encoder_lora
from trainer.unet.pretrained import build_model, flow_family, init_from_run, training_schedule

# Resolved precision -> the UNet's weight and input dtype. bf16 is autocast over fp32 weights
# (trainer/core/engine.py): inputs stay fp32 and each matmul and convolution casts to bf16.
DTYPES = {"fp32": torch.float32, "bf16": torch.float32, "fp16": torch.float16}


def micro_seed(seed: int, rank: int, micro_step: int) -> int:
    """Seed of the noise, timesteps and caption dropout of one micro batch of one rank."""
    return int(np.random.SeedSequence([seed, rank, micro_step]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class FlowObjective:
    """The rectified-flow objective of an SD3/Flux transformer (models/flow.py), fixed for a run."""
    family: str  # sd3 | flux (models/flow_model.py's call conventions)
    sampler: str  # timestep sampler: logit_normal | mode | uniform
    logit_mean: float
    logit_std: float
    mode_scale: float
    shift: float  # SD3's fixed shift (1: none); unused where `dynamic`
    dynamic: bool  # Flux's resolution-dependent shift: mu from each batch's image tokens
    weighting: str  # none | sigma_sqrt | cosmap
    guidance: float | None  # Flux-dev's guidance embedding value; None: the model has none
    mu_line: tuple = (256, 4096, 0.5, 1.15)  # where `dynamic`: (base tokens, max tokens, base shift, max shift)

    def loss(self, engine, z0, context, pooled, generator, sample_weight=None, loss_mask=None) -> torch.Tensor:
        guidance = None if self.guidance is None else torch.full((z0.shape[0],), self.guidance, device=z0.device,
                                                                 dtype=z0.dtype)
        mu = flux_mu((z0.shape[-2] // 2) * (z0.shape[-1] // 2), *self.mu_line) if self.dynamic else None
        return flow_loss(lambda xt, sigmas: velocity(engine, self.family, xt, sigmas.to(xt.dtype), context, pooled,
                                                     guidance),
                         z0, generator, sampler=self.sampler, shift=self.shift, mu=mu, weighting=self.weighting,
                         logit_mean=self.logit_mean, logit_std=self.logit_std, mode_scale=self.mode_scale,
                         sample_weight=sample_weight, loss_mask=loss_mask)


def flow_objective(cfg: UNetJob, schedule, model_config) -> FlowObjective | None:
    """The job's FlowObjective for a flow transformer (None for a UNet): `schedule` the training schedule
    (its shift), `model_config` the transformer's (its guidance embedding)."""
    family = flow_family(cfg)
    if family is None:
        return None
    sc = schedule.config
    return FlowObjective(family, cfg.timestep_sampler, cfg.logit_mean, cfg.logit_std, cfg.mode_scale,
                         shift=float(sc.shift), dynamic=bool(sc.get("use_dynamic_shifting", False)),
                         weighting=cfg.loss_weighting,
                         guidance=cfg.flux_guidance if model_config.get("guidance_embeds") else None,
                         mu_line=(sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096),
                                  sc.get("base_shift", 0.5), sc.get("max_shift", 1.15)))


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """What stays fixed for a whole run; `train_step` reads nothing else but the batches."""
    schedule: Any  # the noise schedule (models.diffusion.noise_schedule)
    shift: torch.Tensor  # latent normalisation z = (draw - shift) * scale, on `device`
    scale: torch.Tensor  # (Manifest.latent_affine: the VAE's factor or per channel)
    dtype: torch.dtype  # the UNet's input dtype (DTYPES of the resolved precision)
    device: torch.device  # where the engine runs; the generators live here too
    empty: torch.Tensor  # the empty caption's embedding, on `device` in `dtype` (caption dropout's target)
    empty_pooled: torch.Tensor | None = None  # SDXL: the pooled embedding dropout puts in its place; None: no
    #   pooled embedding (the UNet has no text_time conditioning)
    text_encoder: Any = None  # text encoder on `device` for a cache of token ids; None: cached embeddings
    empty_tokens: torch.Tensor | None = None  # with lora_text_encoder: the empty caption's token ids, which caption
    #   dropout encodes with the adapted encoder (its embedding moves as the encoder trains); None: `empty` is used
    text_grad: bool = False  # the text encoder has adapters that train (lora_text_encoder): encode with gradients
    flow: FlowObjective | None = None  # SD3/Flux transformers: rectified flow; None: the DDPM objective (`schedule`)
    empty_clip: torch.Tensor | None = None  # SD3: the empty caption's CLIP states (with `empty`'s T5 states and
    #   `empty_pooled`, what caption dropout puts in place of all three text inputs)
    caption_dropout: float = 0.1  # share of captions replaced by the empty one
    random_flip: bool = False  # use the mirrored image's moments for a random half of each batch
    min_snr_gamma: float = 0.0  # training_loss's min-SNR weighting (0: off)
    offset_noise: float = 0.0  # training_loss's per-channel noise offset (0: off)
    input_perturbation: float = 0.0  # training_loss's input perturbation (0: off)
    channels_last: bool = False  # NHWC latents, matching a channels_last UNet
    seed: int = 0  # the run's seed: with rank and micro step it seeds each micro batch
    rank: int = 0  # this process's rank
    grad_accum: int = 1  # micro batches per optimizer step


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What a step hands the loop, on the device: reading `loss` or `applied` on the host waits for the
    step's kernels, so the loop reads them once per logging interval (trainer/unet/tally.py)."""
    loss: torch.Tensor  # this rank's loss, mean over the micro batches (NaN/inf when any was); 0-d, on the device
    applied: torch.Tensor  # bool, 0-d: the optimizer step changed the weights (not skipped for non-finite gradients)
    wait_s: float  # seconds spent waiting for the batches
    read_bytes: int  # shard bytes of the batches (the loader's `bytes`)
    keys: list  # the samples of the micro batches, "SHARD_URL:KEY" (the loader's `keys`, for data.log_samples)
    epochs: list  # the loader's epoch of each
    weights: list  # their loss weights (0: fill, not trained on), read from the loader's CPU tensor


def step_setup(cfg: UNetJob, *, rank: int, device: torch.device, dtype: torch.dtype, shift: torch.Tensor,
               scale: torch.Tensor, empty: torch.Tensor, text_encoder=None,
               empty_pooled: torch.Tensor | None = None, flow: FlowObjective | None = None,
               empty_clip: torch.Tensor | None = None) -> StepSetup:
    """The job's step settings; shift, scale, empty(_pooled) and text_encoder come from the cache (or a benchmark):
    with lora_text_encoder, the adapted encoder the engine's UNet carries."""
    empty_tokens = None
    if cfg.lora_text_encoder and empty_pooled is None:  # SDXL's dropout target stays zeros, as its pipelines use
        empty_tokens = text_encoder.tokenize([""]).to(device)
    return StepSetup(
        schedule=training_schedule(cfg), shift=shift, empty_pooled=empty_pooled, empty_tokens=empty_tokens,
        text_grad=cfg.lora_text_encoder, flow=flow, empty_clip=empty_clip,
        scale=scale, dtype=dtype, device=device, empty=empty, text_encoder=text_encoder,
        caption_dropout=cfg.caption_dropout, random_flip=cfg.random_flip, min_snr_gamma=cfg.min_snr_gamma,
        offset_noise=cfg.offset_noise, input_perturbation=cfg.input_perturbation, channels_last=cfg.channels_last,
        seed=cfg.seed, rank=rank,
        grad_accum=cfg.grad_accum)


def micro_inputs(batch: dict, gen: torch.Generator, s: StepSetup) -> tuple:
    """(z0, context, added conditioning or None, loss mask or None) of one micro batch: latents drawn from the
    cached moments (the mirrored image's for a random half with random_flip) and normalised, the text embedding
    (or the encoder's, for a cache of token ids), a random share of captions replaced by the empty one, and the
    loss mask (flipped with its image) where the cache has masks. SD3/Flux: context is the transformer's text
    sequence (SD3: CLIP's states, then T5's) and the added conditioning {"pooled": the pooled CLIP embedding}."""
    device = s.device
    mean, std = batch["mean"].to(device, non_blocking=True), batch["std"].to(device, non_blocking=True)
    mask = batch["mask"].to(device, non_blocking=True) if "mask" in batch else None  # [B, h, w] loss weights
    if s.random_flip:  # the mirrored image's moments for a random half of the batch
        flip = (torch.rand(mean.shape[0], generator=gen, device=device) < 0.5)[:, None, None, None]
        mean = torch.where(flip, batch["mean_flip"].to(device, non_blocking=True), mean)
        std = torch.where(flip, batch["std_flip"].to(device, non_blocking=True), std)
        if mask is not None:
            mask = torch.where(flip[:, 0], mask.flip(-1), mask)
    z0 = ((draw_latents(mean, std, gen) - s.shift) * s.scale).to(s.dtype)
    if s.channels_last:
        z0 = z0.contiguous(memory_format=torch.channels_last)
    # Classifier-free guidance needs an unconditional model: some captions become "". With
    # SDXL's two encoders, both encoders' outputs (context and pooled) are dropped together.
    drop = torch.rand(mean.shape[0], generator=gen, device=device) < s.caption_dropout
    if s.text_encoder is not None:
        tokens = batch["tokens"].long().to(device, non_blocking=True)
        if s.empty_tokens is not None:  # an adapted encoder: "" is encoded by it, as the dropped captions
            tokens = torch.where(drop.view(-1, *[1] * (tokens.dim() - 1)), s.empty_tokens, tokens)
        with torch.set_grad_enabled(s.text_grad):
            text = s.text_encoder.embed_tokens(tokens)
    else:
        text = {k: batch[k] for k in ("text_emb", "pooled", "clip_emb") if k in batch}
    context = text["text_emb"].to(device, s.dtype, non_blocking=True)
    if s.empty_tokens is None:
        context = torch.where(drop[:, None, None], s.empty, context)
    if s.flow is not None:  # every text input of SD3/Flux becomes the empty caption's together
        pooled = torch.where(drop[:, None], s.empty_pooled, text["pooled"].to(device, s.dtype, non_blocking=True))
        if s.flow.family == "sd3":
            clip = torch.where(drop[:, None, None], s.empty_clip, text["clip_emb"].to(device, s.dtype, non_blocking=True))
            context = sd3_context(clip, context)
        return z0, context, {"pooled": pooled}, mask
    added = None
    if s.empty_pooled is not None:
        pooled = torch.where(drop[:, None], s.empty_pooled, text["pooled"].to(device, s.dtype, non_blocking=True))
        added = {"text_embeds": pooled, "time_ids": batch["time_ids"].to(device, s.dtype, non_blocking=True)}
    return z0, context, added, mask


def train_step(engine, batches: Iterator[dict], step: int, s: StepSetup) -> StepResult:
    """Optimizer step `step`: `s.grad_accum` micro batches from `batches` (dicts of the latent cache's
    fp16 `mean`, `std` (and `mean_flip`, `std_flip`), `text_emb` or `tokens`, and `bytes`).

    Nothing in it waits for the device: the loss stays a tensor, the gradient norm, clipping and the
    skip of a non-finite step happen on the device (trainer/core/engine.py), so a GPU runs ahead of
    the host for the whole step (issue #26: each host read waits for every queued kernel)."""
    loss_sum, skipped_before, wait_s, read_bytes = None, skipped_steps(engine), 0.0, 0
    keys, epochs, weights = [], [], []
    for micro in range(s.grad_accum):
        t_wait = time.perf_counter()
        batch = next(batches)
        wait_s += time.perf_counter() - t_wait
        read_bytes += batch["bytes"]
        keys += batch.get("keys", [])
        epochs += [int(batch.get("epoch", 0))] * len(batch.get("keys", []))
        if "loss_weight" in batch and not batch["loss_weight"].is_cuda:  # a CPU tensor: no device sync
            weights += batch["loss_weight"].tolist()
        gen = torch.Generator(s.device).manual_seed(micro_seed(s.seed, s.rank, step * s.grad_accum + micro))
        z0, context, added, mask = micro_inputs(batch, gen, s)
        if s.flow is not None:
            loss = s.flow.loss(engine, z0, context, added["pooled"], gen, batch.get("loss_weight"), mask)
        else:
            loss = training_loss(engine, z0, context, s.schedule, gen, min_snr_gamma=s.min_snr_gamma,
                                 offset_noise=s.offset_noise, added_cond=added, sample_weight=batch.get("loss_weight"),
                                 loss_mask=mask, input_perturbation=s.input_perturbation)
        engine.backward(loss)
        engine.step()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    mean_loss = loss_sum if s.grad_accum == 1 else loss_sum / s.grad_accum
    return StepResult(mean_loss, step_applied(engine, skipped_before), wait_s, read_bytes, keys, epochs, weights)


def prepare_unet(unet, cfg: UNetJob):
    """The memory and speed options that change how the UNet runs, not what it computes."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    # SDPA dispatches to flash / memory-efficient attention kernels where the GPU has them. SD3's and Flux's
    # transformers keep their own (joint attention) processors, which use SDPA already.
    if family_of(unet) is None:
        unet.set_attn_processor(AttnProcessor2_0() if cfg.attention == "sdpa" else AttnProcessor())
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # one shape per bucket: each conv's fastest algorithm, found once
    if cfg.compile and cfg.zero_stage < 3:
        compile_blocks(unet, cfg.compile_mode, cfg.compile_backend)
    return unet


def compile_blocks(unet, mode: str = "default", backend: str = "inductor") -> int:
    """torch.compile each down, mid and up block of the UNet in place, as torchtitan compiles each
    transformer block: blocks of one shape share their compiled code, so compiling takes a fraction
    of a whole-model compile, a graph break stays inside one block, and `Module.compile` leaves the
    module tree and its state-dict keys as they were (checkpoints, the EMA and export are unchanged).
    The embeddings and the first and last convolutions stay eager. Returns the blocks compiled."""
    if family_of(unet) is not None:  # SD3/Flux: each (double- and single-stream) transformer block
        blocks = [*unet.transformer_blocks, *getattr(unet, "single_transformer_blocks", [])]
    else:
        blocks = [b for b in (*unet.down_blocks, unet.mid_block, *unet.up_blocks) if b is not None]
    for block in blocks:
        block.compile(backend=backend, **({} if backend != "inductor" else {"mode": mode}))
    return len(blocks)


def to_channels_last(engine, cfg: UNetJob) -> None:
    """NHWC weights as well as NHWC inputs, where the weights are the module's own tensors (ZeRO-0): cuDNN
    runs NHWC convolutions without converting either side. Done after deepspeed.initialize, whose
    initial broadcast views each parameter as bytes and fails on an NHWC one ("stride(-1) must be 1",
    seen on an H200); the parameters stay the same objects, so the optimizer and the EMA follow. At
    ZeRO-1/2 weights are views of DeepSpeed's flat buffers and stay contiguous (train_step still makes
    the input NHWC); ZeRO-3 partitions them."""
    if cfg.channels_last and engine.zero_optimization_stage() == 0:
        engine.module.to(memory_format=torch.channels_last)


def unet_ds_config(cfg: UNetJob, world_size: int, precision: str) -> dict:
    """The job's DeepSpeed config at `world_size` ranks; `precision` resolved (engine.resolve_precision)."""
    return deepspeed_config(
        batch_per_rank=cfg.batch_per_rank, grad_accum=cfg.grad_accum, world_size=world_size, zero_stage=cfg.zero_stage,
        precision=precision, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
        offload_optimizer=cfg.offload_optimizer, optimizer=cfg.optimizer, warmup=cfg.warmup_samples > 0)


def build_unet_engine(cfg: UNetJob, channels: int, size: int, context_dim: int, ds_config: dict, pooled_dim: int = 0,
                      init_from: bool = False, say=print, text_encoder=None):
    """The job's UNet (seeded by cfg.seed, or the pretrained folder's, or with `init_from` cfg.init_from's
    run's; with cfg's speed options) in a DeepSpeed engine of `ds_config`. With cfg.lora_text_encoder,
    `text_encoder` (the cache's, for its token ids) gets adapters and rides on the UNet (trainer/unet/lora.py)."""
    unet = prepare_unet(build_model(cfg, channels, size, context_dim, pooled_dim), cfg)
    if cfg.lora_text_encoder:  # after prepare_unet: the UNet's checkpointing and attention options are its own
        add_text_encoder_lora(unet, text_encoder, cfg)
    if init_from:
        init_from_run(unet, cfg, say)
    engine = build_engine(unet, ds_config)
    to_channels_last(engine, cfg)
    if cfg.compile and cfg.zero_stage == 3:  # ZeRO-3 gathers parameters in module hooks: DeepSpeed's own compile
        engine.compile(backend=cfg.compile_backend, compile_kwargs={"mode": cfg.compile_mode}
                       if cfg.compile_backend == "inductor" else {})
    return engine
