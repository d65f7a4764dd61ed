"""The autoencoder job's configuration: every field typed, commented and checked."""

from __future__ import annotations

import dataclasses

from models.autoencoder import is_vq_preset
from models.discriminator import NORMS, patch_grid
from models.perceptual import BACKBONE_FILES

from trainer.autoencoder.losses import OBJECTIVES
from trainer.core import config as config_lib
from trainer.core.data import ImageData
from trainer.core.job_checks import check_vae_spec


def pretrained_vae(pretrained: str) -> str:
    """The autoencoder a `pretrained=` names: a pipeline folder's (or hub id's) vae/, or the folder itself."""
    import os

    from models.pipeline import part_spec

    if os.path.isdir(pretrained) and not os.path.exists(os.path.join(pretrained, "model_index.json")):
        return pretrained
    return part_spec(pretrained, "vae")


@dataclasses.dataclass
class AutoencoderJob:
    run_dir: str = "runs/autoencoder"  # checkpoints, logs, config.yaml; export/ holds the result
    data: ImageData = dataclasses.field(default_factory=ImageData)  # the image shards and how they are decoded
    objective: str = "kl_plain"  # kl_plain (MSE + KL) | kl_gan (L1 + LPIPS + KL + PatchGAN) | vq_gan (VQModel)
    preset: str = "demo"  # architecture in models/autoencoder.py: tiny, demo (f4), f8, sd; vq_tiny, vq_f4, vq_f8, ...
    pretrained: str = ""  # start from trained weights instead of preset's random ones: a diffusers SD pipeline
    #   folder or hub id (its vae/), or an AutoencoderKL / VQModel folder; preset and latent_channels are then its own
    train_encoder: bool = True  # false: encoder and quant_conv frozen, the decoder alone trains (as SD's improved
    #   VAEs were made): latents, scaling_factor and every cache made with the pretrained VAE stay valid
    latent_channels: int = 4  # channels of the latent space
    codebook_size: int = 0  # VQ codes (vq_gan); 0: the preset's
    batch_per_rank: int = 32  # images per rank per optimizer step (global batch: x world size)
    total_samples: int = 100_000  # training length in images
    lr: float = 1e-3  # autoencoder Adam peak learning rate
    warmup_samples: int = 5_000  # linear warm-up, then cosine decay to 10% of lr (autoencoder only)
    grad_clip: float = 1.0  # max gradient norm, each model separately (0: off)
    kl_weight: float = 1e-6  # weight of KL(q(z|x) || N(0, I)); small keeps the latent informative (LDM: 1e-6)
    lpips_net: str = "vgg"  # LPIPS backbone: vgg (taming/LDM) | alex (needs images of 32 px or more)
    lpips_weights: str = ""  # backbone file; "": torchvision's hub cache; random: random backbone (tests only)
    lpips_weight: float = 1.0  # weight of the LPIPS term against L1 (taming: 1.0)
    disc_start_samples: int = 50_000  # images before the discriminator and the GAN term switch on
    disc_weight: float = 0.5  # factor on the adaptive GAN weight (LDM's KL-f8: 0.5; taming VQGAN: 0.8)
    disc_lr: float = 2e-4  # discriminator Adam learning rate (constant, as in taming)
    disc_layers: int = 3  # stride-2 layers of the PatchGAN (3: 70x70 patches); needs resolution >= 3 * 2**layers
    disc_channels: int = 64  # width of the discriminator's first layer, doubled per layer up to 8x
    disc_norm: str = "batch"  # discriminator normalisation: batch (pix2pix, taming) | group | none
    codebook_weight: float = 1.0  # weight of the codebook + beta * commitment loss (vq_gan)
    vq_beta: float = 0.25  # commitment weight beta (van den Oord et al. 2017: 0.25)
    codebook_window_batches: int = 50  # batches over which codebook perplexity and dead codes are counted
    codebook_restart_batches: int = 0  # every this many batches, codes unused over the window are re-seeded
    #   from encoder outputs of the batch (Jukebox/SoundStream; not in taming); 0: off
    precision: str = "fp32"  # fp32 | bf16 (autocast on CUDA; CPU runs fp32)
    ema_decay: float = 0.0  # EMA of the autoencoder's weights per step, e.g. 0.999 (0: off); export uses it
    seed: int = 0  # weights init, data order, latent draws
    log_every_samples: int = 2_000  # JSONL/wandb logging interval
    checkpoint_every_samples: int = 20_000  # resumable state interval
    keep_last: int = 2  # complete checkpoints kept
    checkpoint_url: str = ""  # where checkpoints go: a path or fsspec URL (s3://bucket/run); "": run_dir/checkpoints
    checkpoint_endpoint_url: str | None = None  # S3-compatible endpoint for checkpoint_url; default AWS_ENDPOINT_URL
    stop_after_samples: int = 0  # end this invocation with a checkpoint after this many more images (0: never);
    #   for time-sliced queues: rerunning the same command continues, the trajectory is unchanged
    scaling_samples: int = 1024  # images used to measure the latent std for scaling_factor
    tracker: str = "wandb"  # wandb (as `wandb` says) | tensorboard (run_dir/tensorboard) | none: besides log.jsonl
    wandb: str = "offline"  # offline (files in run_dir/wandb) | online | disabled; env WANDB_MODE wins

    def validate(self) -> None:
        bad = config_lib.ConfigError
        if not self.data.urls:
            raise bad("data.urls is empty: name the image shards to train on")
        for key in ("batch_per_rank", "total_samples", "log_every_samples", "checkpoint_every_samples",
                    "codebook_window_batches", "scaling_samples"):
            if getattr(self, key) <= 0:
                raise bad(f"{key} must be positive, got {getattr(self, key)}")
        for key in ("grad_clip", "kl_weight", "lpips_weight", "disc_start_samples", "disc_weight", "codebook_weight",
                    "vq_beta", "stop_after_samples", "codebook_size", "codebook_restart_batches"):
            if getattr(self, key) < 0:
                raise bad(f"{key} must be >= 0, got {getattr(self, key)}")
        config_lib.check_choice("objective", self.objective, OBJECTIVES)
        self._validate_fields()
        if self.pretrained:
            for key in ("preset", "latent_channels", "codebook_size"):
                if getattr(self, key) != getattr(AutoencoderJob, key):
                    raise bad(f"{key}={getattr(self, key)} and pretrained={self.pretrained} both set the architecture: "
                              f"leave {key} out (the pretrained model's is used)")
            check_vae_spec(pretrained_vae(self.pretrained), "pretrained")
        elif not self.train_encoder:
            raise bad("train_encoder=false needs pretrained=: a frozen random encoder gives the decoder nothing to learn")
        elif (self.objective == "vq_gan") != is_vq_preset(self.preset):
            want = "a vq_* preset (VQModel)" if self.objective == "vq_gan" else "an AutoencoderKL preset (not vq_*)"
            raise bad(f"objective={self.objective} needs {want}; preset is {self.preset!r}")
        if self.precision not in ("fp32", "bf16"):
            raise bad(f"precision must be fp32 or bf16, got {self.precision!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise bad(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.objective != "kl_plain":
            if self.lpips_net not in BACKBONE_FILES:
                raise bad(f"lpips_net must be one of {', '.join(BACKBONE_FILES)}, got {self.lpips_net!r}")
            if self.disc_norm not in NORMS:
                raise bad(f"disc_norm must be one of {', '.join(NORMS)}, got {self.disc_norm!r}")
            if self.disc_layers < 1 or patch_grid(self.data.resolution, self.disc_layers) < 1:
                raise bad(f"disc_layers={self.disc_layers} leaves no patches at data.resolution="
                          f"{self.data.resolution} (needs resolution >= {3 * 2 ** max(self.disc_layers, 1)})")

    def _validate_fields(self) -> None:
        """The fields not checked above, when the config is resolved (login node, --dry-run)."""
        from models.autoencoder import PRESETS
        from models.perceptual import RANDOM

        if not self.run_dir:
            raise config_lib.ConfigError("run_dir is empty: name the run's folder")
        self.data.validate("data.")
        config_lib.check_choice("preset", self.preset, PRESETS)
        config_lib.check_choice("lpips_net", self.lpips_net, BACKBONE_FILES)
        config_lib.check_choice("disc_norm", self.disc_norm, NORMS)
        config_lib.check_wandb(self)
        config_lib.check_endpoint("checkpoint_endpoint_url", self.checkpoint_endpoint_url)
        config_lib.check_positive(self, ("latent_channels", "lr", "disc_lr", "disc_channels", "keep_last"))
        config_lib.check_non_negative(self, ("warmup_samples", "seed"))
        if self.lpips_weights not in ("", RANDOM):
            config_lib.check_local_path("lpips_weights", self.lpips_weights, "LPIPS backbone", kind="file")

    def steps(self, samples: int, world_size: int = 1) -> int:
        return max(1, samples // (self.batch_per_rank * world_size))
