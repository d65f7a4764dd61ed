"""The UNet job's configuration, and the plan derived from it and the world size."""

from __future__ import annotations

import dataclasses
import math

from models.flow import TIMESTEP_SAMPLERS, WEIGHTINGS

from trainer.cache.manifest import CacheExpect
from trainer.core import config as config_lib
from trainer.core import optimizers
from trainer.core.data import LatentData
from trainer.core.job_checks import check_guidance, check_pretrained, check_unet_model


@dataclasses.dataclass
class UNetJob:
    run_dir: str = "runs/unet"  # checkpoints, log.jsonl, loss.png, config.yaml
    data: LatentData = dataclasses.field(default_factory=LatentData)  # data.urls: the latent cache root
    cache: CacheExpect = dataclasses.field(default_factory=CacheExpect)  # what the cache must have been made with
    latent_norm: str = "scaling_factor"  # scaling_factor (the VAE's) | per_channel (the cache's measured mean/std)
    random_flip: bool = False  # train on the mirrored image's moments half the time (cache made with flip=true)
    pretrained: str = ""  # a diffusers SD or SDXL pipeline folder or hub id to fine-tune: its unet/ (architecture and
    #   weights), its scheduler's betas and prediction type; the cache must be made with its vae/ and text encoder(s)
    model: str = "demo"  # UNet preset (tiny, demo, lab, sd15, sd21, sdxl, tiny_sdxl) or a diffusers config.json; with
    #   pretrained: leave it. sdxl/tiny_sdxl need a cache of SDXL's two text encoders (their pooled embedding)
    init_from: str = ""  # start from another run's weights: RUN (its newest complete checkpoint) or a checkpoint
    #   folder RUN/checkpoints/samples_N; its EMA weights where it kept them; a fresh optimizer, schedule and EMA
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on pretrained's frozen UNet (Hu et al. 2021); 0: all weights
    lora_alpha: float = 0.0  # LoRA scale numerator: the update is (lora_alpha / lora_rank) B A; 0: lora_rank (scale 1)
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])  # layers
    #   that get adapters (names or name suffixes of the UNet's modules, as peft matches them): the attention projections
    #   (SD3/Flux: this default becomes both streams' attention projections and MLPs, saved so in config.yaml)
    lora_text_encoder: bool = False  # also train adapters of lora_rank on the text encoder(s)' attention projections
    #   (q, k, v, out); needs a cache made with text=tokens (the encoder then runs in the step, as kohya's train_text_encoder)
    prediction_type: str = "auto"  # epsilon | v_prediction (Salimans & Ho 2022) | flow (rectified flow: SD3/Flux
    #   transformers, models/flow.py) | auto: pretrained's (flow for an SD3 or Flux folder), else epsilon (flow for
    #   the tiny_sd3 and tiny_flux presets)
    timestep_sampler: str = "logit_normal"  # flow: logit_normal | mode | uniform (Esser et al. 2024, sec. 3.1)
    logit_mean: float = 0.0  # flow, logit_normal: the mean of the normal whose sigmoid is u
    logit_std: float = 1.0  # flow, logit_normal: its standard deviation
    mode_scale: float = 1.29  # flow, mode: the scale of Esser et al.'s eq. 20
    flow_shift: float = 0.0  # flow: SD3's sigma shift s u / (1 + (s - 1) u); 0: pretrained's scheduler's (3.0 for SD3;
    #   Flux's scheduler shifts by resolution instead: mu from its image tokens)
    loss_weighting: str = "none"  # flow: none | sigma_sqrt | cosmap (diffusers' SD3 weightings)
    flux_guidance: float = 3.5  # Flux with a guidance embedding (dev): the guidance the model is told in training
    min_snr_gamma: float = 0.0  # > 0: min-SNR-gamma loss weighting (Hang et al. 2023; 5 there); 0 off
    offset_noise: float = 0.0  # > 0: per-channel noise offset (Guttenberg 2023; 0.1 usual); 0 off
    input_perturbation: float = 0.0  # > 0: the input is noised with noise + this x N(0, I), the target stays the
    #   noise (Ning et al. 2023: less exposure bias; 0.1 there, as diffusers and kohya offer); 0 off
    zero_terminal_snr: bool = False  # rescale betas to SNR(T)=0 (Lin et al. 2024); needs v_prediction
    caption_dropout: float = 0.1  # share of captions replaced by the empty caption (for CFG)
    caption_shuffle: bool = False  # shuffle each caption's comma-separated tags per sample and epoch (kohya's
    #   shuffle_caption); needs a cache with text=tokens: an embeddings cache holds each caption encoded once
    keep_tokens: int = 0  # with caption_shuffle: the first N tags stay in front (kohya's keep_tokens; a trigger word)
    batch_per_rank: int = 64  # micro batch on each rank
    grad_accum: int = 1  # micro batches per optimizer step
    total_samples: int = 80_000  # training length in samples (all ranks together)
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes: 8-bit moments) | prodigy (finds its own step size;
    #   lr=1 multiplies it) | adafactor (factored moments; zero_stage=0): trainer/core/optimizers.py
    lr: float = 3e-4  # peak learning rate (prodigy: the multiplier of its own estimate, 1.0)
    lr_schedule: str = "cosine"  # after warm-up: cosine | linear (decay to lr * lr_final_ratio) | constant
    lr_final_ratio: float = 0.1  # learning rate at the end of a cosine/linear schedule, relative to lr
    betas: tuple[float, float] = (0.9, 0.999)  # Adam betas (adamw, adamw8bit, prodigy; adafactor keeps no first moment)
    weight_decay: float = 0.01  # decoupled weight decay
    warmup_samples: int = 4_000  # linear warm-up from 0 to lr
    grad_clip: float = 1.0  # max global gradient norm
    ema_halflife_samples: int = 1_000_000  # EMA half-life in samples (EDM, Karras et al. 2022); 0: no EMA
    ema_rampup_ratio: float = 0.05  # early on the half-life is at most this share of samples seen; 0 off
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state in host memory (stage 1-3)
    precision: str = "auto"  # auto (bf16 on capable GPUs, else fp32) | fp32 | bf16 | fp16 (dynamic loss scaling)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    channels_last: bool = False  # NHWC convolutions: the input, and at ZeRO-0 the weights too (ZeRO-1/2 keep them in
    #   DeepSpeed's flat buffers); the earlier H200 "2.3x the memory" was the benchmark keeping old engines (#26)
    attention: str = "sdpa"  # sdpa (torch scaled_dot_product_attention: flash/memory-efficient kernels) | eager
    compile: bool = False  # torch.compile the UNet block by block (first steps are slow while it compiles)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune |
    #   max-autotune-no-cudagraphs
    compile_backend: str = "inductor"  # inductor (generated kernels) | aot_eager (traced graphs run eagerly: checks
    #   that the UNet compiles without the code generation, which takes minutes on a CPU)
    max_nonfinite_steps: int = 10  # stop after this many consecutive steps with a NaN/inf loss (each is skipped)
    peak_tflops: float = 0.0  # the device's dense peak for MFU; 0: built-in table for known GPUs
    seed: int = 0  # weights init, data order, noise
    log_every_samples: int = 1_280  # JSONL/wandb logging interval
    checkpoint_every_samples: int = 20_000  # resumable checkpoint interval
    keep_last: int = 2  # complete checkpoints kept
    dist_timeout_s: int = 600  # a collective waiting this long for a rank fails the job (dead or hung rank)
    checkpoint_url: str = ""  # where checkpoints go: a path or fsspec URL (s3://bucket/run); "": run_dir/checkpoints
    checkpoint_endpoint_url: str | None = None  # S3-compatible endpoint for checkpoint_url; default AWS_ENDPOINT_URL
    elastic_resume: bool = False  # allow resuming at another world size (DeepSpeed universal checkpoint);
    #   the global batch follows the world size and the schedule continues at the same sample count
    validate_every_samples: int = 0  # sample validation_prompts with the EMA weights this often (0: never)
    validation_prompts: list[str] = dataclasses.field(default_factory=list)  # one grid row per prompt
    validation_steps: int = 25  # sampler steps for validation grids
    validation_guidance: float = 5.0  # classifier-free guidance scale of validation grids: >= 0; 1 is the
    #   conditional model alone, 0 the unconditional (or negative-prompt) side alone, > 1 extrapolates from it
    validation_negative_prompt: str = ""  # caption that guidance steers validation samples away from
    #   (replaces the empty caption's embedding); "": plain classifier-free guidance; needs validation_guidance > 1
    stop_after_samples: int = 0  # end this invocation with a checkpoint after this many more samples (0: never);
    #   for time-sliced queues: rerunning the same command continues, the trajectory is unchanged
    tracker: str = "wandb"  # wandb (as `wandb` says) | tensorboard (run_dir/tensorboard) | none: besides log.jsonl
    wandb: str = "offline"  # offline (files in run_dir/wandb) | online | disabled; env WANDB_MODE wins
    wandb_project: str = "ldm"  # wandb project name


    # pretrained= on the command line replaces a config file's model (trainer/core/config.py)
    NAMES_ALSO = {"pretrained": ("model",)}

    def validate(self) -> None:
        if not self.data.urls:
            raise config_lib.ConfigError("data.urls is empty: name the latent cache to train on")
        if self.zero_stage not in (0, 1, 2, 3):
            raise config_lib.ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise config_lib.ConfigError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        config_lib.check_choice("prediction_type", self.prediction_type, ("auto", "epsilon", "v_prediction", "flow"))
        config_lib.check_choice("timestep_sampler", self.timestep_sampler, TIMESTEP_SAMPLERS)
        config_lib.check_choice("loss_weighting", self.loss_weighting, WEIGHTINGS)
        if self.logit_std <= 0 or self.flow_shift < 0 or self.flux_guidance < 0 or not 0 <= self.mode_scale <= 1.5:
            raise config_lib.ConfigError(f"logit_std must be > 0, flow_shift and flux_guidance >= 0 and mode_scale in "
                                         f"[0, 1.5] (u must stay in (0, 1)), got {self.logit_std}, {self.flow_shift}, "
                                         f"{self.flux_guidance} and {self.mode_scale}")
        from models.pipeline import is_local
        from trainer.unet.pretrained import flow_family

        # Validation reads no network (a hub id's model_index.json would be a request, 46 s to time out offline): a
        # hub id is a transformer's where prediction_type=flow says so, and its loader checks that with network.
        hub = bool(self.pretrained) and not is_local(self.pretrained)
        flow = self.prediction_type == "flow" if hub else flow_family(self) is not None
        if self.pretrained:
            check_pretrained(self.pretrained, ("transformer", "vae", "scheduler") if flow else
                             ("unet", "vae", "text_encoder", "tokenizer", "scheduler"))
            if self.model != UNetJob.model:
                raise config_lib.ConfigError(f"model={self.model} and pretrained={self.pretrained} both name the UNet "
                                             "(pretrained's unet/ is trained): leave model out")
        for key in ("batch_per_rank", "grad_accum", "total_samples", "log_every_samples", "checkpoint_every_samples",
                    "max_nonfinite_steps", "validation_steps", "dist_timeout_s"):
            if getattr(self, key) <= 0:
                raise config_lib.ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        flow_defaults = {k: getattr(UNetJob, k) for k in ("timestep_sampler", "logit_mean", "logit_std", "mode_scale",
                                                          "flow_shift", "loss_weighting", "flux_guidance")}
        if flow:
            if self.prediction_type not in ("auto", "flow"):
                raise config_lib.ConfigError(f"prediction_type={self.prediction_type}: {self.pretrained or self.model} "
                                             "is a transformer trained with rectified flow (prediction_type=flow or auto)")
            if self.latent_norm != "scaling_factor":
                raise config_lib.ConfigError(f"latent_norm={self.latent_norm}: SD3 and Flux pipelines decode with their "
                                             "VAE's shift_factor and scaling_factor (latent_norm=scaling_factor)")
            for key in ("min_snr_gamma", "offset_noise", "input_perturbation"):
                if getattr(self, key):
                    raise config_lib.ConfigError(f"{key}={getattr(self, key)} belongs to the DDPM objective; a flow "
                                                 "transformer trains with rectified flow (timestep_sampler, "
                                                 "loss_weighting, flow_shift instead)")
        elif self.prediction_type == "flow":
            raise config_lib.ConfigError("prediction_type=flow trains SD3 and Flux transformers (pretrained= such a "
                                         f"folder, or model=tiny_sd3|tiny_flux); {self.pretrained or self.model} is a UNet")
        elif any(getattr(self, k) != v for k, v in flow_defaults.items()):
            key = next(k for k, v in flow_defaults.items() if getattr(self, k) != v)
            raise config_lib.ConfigError(f"{key}={getattr(self, key)} sets the rectified-flow objective of SD3/Flux "
                                         "transformers; this job trains a UNet (leave it out)")
        if self.zero_terminal_snr and resolved_prediction_type(self) != "v_prediction":
            raise config_lib.ConfigError("zero_terminal_snr=true needs prediction_type=v_prediction "
                                         "(epsilon is undefined at SNR 0)")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise config_lib.ConfigError(f"lr_schedule must be cosine, linear or constant, got {self.lr_schedule!r}")
        config_lib.check_choice("compile_mode", self.compile_mode,
                                ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
        config_lib.check_choice("compile_backend", self.compile_backend, ("inductor", "aot_eager"))
        if self.attention not in ("sdpa", "eager"):
            raise config_lib.ConfigError(f"attention must be sdpa or eager, got {self.attention!r}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise config_lib.ConfigError("offload_optimizer=true needs zero_stage 1, 2 or 3")
        optimizers.check(self.optimizer, zero_stage=self.zero_stage, lr=self.lr, elastic_resume=self.elastic_resume)
        if self.keep_tokens < 0 or (self.keep_tokens and not self.caption_shuffle):
            raise config_lib.ConfigError(f"keep_tokens={self.keep_tokens} needs caption_shuffle=true (it keeps the first "
                                         "tags in place while the rest are shuffled) and must be >= 0")
        if self.validate_every_samples > 0 and not self.validation_prompts:
            raise config_lib.ConfigError("validate_every_samples is set but validation_prompts is empty")
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise config_lib.ConfigError(f"lora_rank and lora_alpha must be >= 0, got {self.lora_rank} and {self.lora_alpha}")
        if self.lora_text_encoder and flow:
            raise config_lib.ConfigError("lora_text_encoder=true adapts CLIP text encoders of SD 1.x/2.x and SDXL; "
                                         "for SD3 and Flux it is not supported yet (their T5 is cached or frozen)")
        if self.lora_text_encoder and not self.lora_rank:
            raise config_lib.ConfigError("lora_text_encoder=true adds adapters of lora_rank to the text encoder: set "
                                         "lora_rank > 0 (the UNet then trains adapters too)")
        if self.lora_rank:
            if not self.pretrained:
                raise config_lib.ConfigError("lora_rank > 0 needs pretrained= (adapters adapt a pretrained UNet; "
                                             "a random one is trained whole)")
            if self.zero_stage == 3:
                raise config_lib.ConfigError("lora_rank > 0 runs at zero_stage 0-2: the adapters are small, and "
                                             "ZeRO-3 would partition the frozen base for nothing")
            if self.elastic_resume and self.zero_stage in (1, 2):
                raise config_lib.ConfigError("elastic_resume with lora_rank > 0 is not supported at ZeRO-1/2 yet (the "
                                             "universal conversion of adapter-only checkpoints is untested): use "
                                             "zero_stage=0, whose checkpoints load at any world size")
            if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
                raise config_lib.ConfigError(f"lora_targets must be a non-empty list of module names, got {self.lora_targets}")
        check_guidance(self.validation_guidance, self.validation_negative_prompt, "validation_guidance",
                       "validation_negative_prompt")
        if self.input_perturbation > 1:
            raise config_lib.ConfigError(f"input_perturbation must be in [0, 1] (0.1 is usual), got {self.input_perturbation}")
        for key in ("min_snr_gamma", "offset_noise", "input_perturbation", "ema_halflife_samples", "ema_rampup_ratio", "lr_final_ratio",
                    "peak_tflops", "validate_every_samples"):
            if getattr(self, key) < 0:
                raise config_lib.ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        # The rest of the fields, so that a bad value fails on the login node, not after the queue.
        if not self.run_dir:
            raise config_lib.ConfigError("run_dir is empty: name the run's folder")
        self.data.validate("data.")
        self.cache.validate("cache.")
        config_lib.check_endpoint("checkpoint_endpoint_url", self.checkpoint_endpoint_url)
        config_lib.check_choice("latent_norm", self.latent_norm, ("scaling_factor", "per_channel"))
        config_lib.check_choice("precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        config_lib.check_wandb(self, "wandb_project")
        check_unet_model(self.model)
        config_lib.check_positive(self, ("lr", "keep_last"))
        config_lib.check_non_negative(self, ("weight_decay", "warmup_samples", "grad_clip", "seed",
                                             "stop_after_samples"))
        if self.lr_final_ratio > 1:
            raise config_lib.ConfigError(f"lr_final_ratio must be in [0, 1], got {self.lr_final_ratio}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise config_lib.ConfigError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")


def resolved_prediction_type(cfg: UNetJob) -> str:
    from trainer.unet.pretrained import prediction_type

    return prediction_type(cfg)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything derived from the config and the world size, computed in one place."""
    world_size: int
    global_batch: int  # samples per optimizer step, all ranks together
    total_steps: int
    warmup_steps: int
    log_every_steps: int
    checkpoint_every_steps: int
    validate_every_steps: int  # 0: never


def make_plan(cfg: UNetJob, world_size: int) -> Plan:
    global_batch = cfg.batch_per_rank * cfg.grad_accum * world_size
    plan = Plan(world_size, global_batch, total_steps=math.ceil(cfg.total_samples / global_batch),
                warmup_steps=math.ceil(cfg.warmup_samples / global_batch),
                log_every_steps=max(1, cfg.log_every_samples // global_batch),
                checkpoint_every_steps=max(1, cfg.checkpoint_every_samples // global_batch),
                validate_every_steps=max(1, cfg.validate_every_samples // global_batch) if cfg.validate_every_samples else 0)
    assert plan.global_batch == cfg.batch_per_rank * cfg.grad_accum * plan.world_size
    return plan


# A LoRA adapter starts at zero (B = 0), not at the pretrained weights: an EMA of it without a ramp-up
# stays near zero for a half-life (a 64-sample run exported weights of 1.5e-7 where 1e-3 were trained, #29).
LORA_EMA_RAMPUP = 0.05


def ema_rampup(cfg: UNetJob) -> float:
    """The EMA ramp-up a run uses: cfg.ema_rampup_ratio; for LoRA adapters at least LORA_EMA_RAMPUP."""
    return max(cfg.ema_rampup_ratio, LORA_EMA_RAMPUP) if cfg.lora_rank else cfg.ema_rampup_ratio


def ema_note(cfg: UNetJob, samples: int) -> tuple[str, bool]:
    """What an EMA export (or validation grid) of a run at `samples` holds, and whether to warn: without
    a ramp-up an EMA that has seen fewer samples than its half-life is still mostly its starting weights."""
    halflife, ramp = cfg.ema_halflife_samples, ema_rampup(cfg)
    start = "zero adapters" if cfg.lora_rank else "pretrained's weights" if cfg.pretrained else "the initial weights"
    if ramp > 0:
        return f"EMA weights (half-life {halflife} samples, ramped up: at most {ramp:g} of the samples seen)", False
    left = 0.5 ** (samples / halflife)
    text = f"EMA weights (half-life {halflife} samples, no ramp-up; {samples} samples seen)"
    if samples < halflife:
        return (f"{text}: the EMA still holds {left:.0%} of {start}, the trained weights {1 - left:.0%}; "
                "--weights raw exports the trained weights"), True
    return text, False

