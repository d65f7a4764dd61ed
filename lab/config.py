"""The autoencoder lab's configuration (`LabJob`) and the sub-job configs built from it.

The lab runs the project's own jobs (train_autoencoder, cache_latents, train_unet) with
configs derived here: the three first stages from their base YAMLs under
configs/autoencoder/ with the lab's shared settings on top, so that they differ only in
objective and model kind; the four UNets from one set of settings, so that they differ
only in the space they denoise. Each sub-config is built as its dataclass (the lab's values
set on the fields directly), then goes through `load_config` with the user's `overrides`,
so a bad entry is the same one-line error it would be on that job's command line.
"""
from __future__ import annotations

import dataclasses
import os

from data_pipeline import synthetic

from lab.sample_quality import check_clip_spec
from trainer.autoencoder.job import AutoencoderJob
from trainer.cache.job import CacheJob
from trainer.core import config as config_lib
from trainer.core.data import ImageData
from trainer.unet.job import UNetJob

FIRST_STAGES = ("kl_plain", "kl_gan", "vq_gan")  # trained first stages, by objective
PIXELS = "pixels"  # the identity first stage (LDM-1)
SPACES = FIRST_STAGES + (PIXELS,)  # every space a UNet is trained in
ALL_TEXTURES = tuple(synthetic.TEXTURES)


@dataclasses.dataclass
class LabData:
    urls: str = ""  # training image shards; "": textured synthetic shapes drawn into run_dir/data/train
    heldout_urls: str = ""  # held-out image shards for evaluation; "": drawn with seed + 1 into run_dir/data/heldout
    endpoint_url: str | None = None  # S3-compatible endpoint for the URLs; default AWS_ENDPOINT_URL
    resolution: int = 32  # image side in pixels (a multiple of every first stage's factor)
    train_images: int = 4000  # synthetic training images drawn
    heldout_images: int = 512  # synthetic held-out images drawn
    per_shard: int = 500  # images per synthetic shard
    seed: int = 0  # generator seed of the synthetic training set (held-out: seed + 1)
    textures: list[str] = dataclasses.field(default_factory=lambda: list(ALL_TEXTURES))  # shape fills drawn from
    background_textures: list[str] = dataclasses.field(default_factory=lambda: list(ALL_TEXTURES))  # background fills
    num_workers: int = 1  # DataLoader processes of the training and cache jobs


@dataclasses.dataclass
class LabModels:
    kl_plain: str = ""  # an existing export (diffusers folder or hub id) used instead of training; "": train
    kl_gan: str = ""  # same, for the KL-VAE with LPIPS + PatchGAN
    vq_gan: str = ""  # same, for the VQ-GAN


@dataclasses.dataclass
class LabAutoencoder:
    kl_plain_config: str = "configs/autoencoder/kl_plain.yaml"  # base AutoencoderJob config of each objective:
    kl_gan_config: str = "configs/autoencoder/kl_gan.yaml"  #   loss weights come from there, the settings
    vq_gan_config: str = "configs/autoencoder/vq_gan.yaml"  #   below are the same for all three
    kl_preset: str = "demo"  # AutoencoderKL architecture of kl_plain and kl_gan (models/autoencoder.py)
    vq_preset: str = "vq_f4"  # VQModel architecture of vq_gan (same widths and factor as kl_preset)
    latent_channels: int = 4  # channels of every latent space
    batch_size: int = 32  # images per step
    total_samples: int = 32_000  # training length in images
    warmup_samples: int = 2_000  # linear learning-rate warm-up in images
    disc_start_samples: int = 8_000  # images before the discriminator joins (kl_gan, vq_gan)
    lpips_net: str = "vgg"  # LPIPS backbone (vgg as in taming/LDM)
    lpips_weights: str = "random"  # random: random backbone (not perceptual; said in the report); "": hub cache; PATH
    log_every_samples: int = 640  # log interval in images
    checkpoint_every_samples: int = 8_000  # checkpoint interval in images
    overrides: list[str] = dataclasses.field(default_factory=list)  # further AutoencoderJob key=value, all three


@dataclasses.dataclass
class LabCache:
    text_encoder: str = "tiny"  # tiny (random weights) or OpenCLIP MODEL:PRETRAINED, as in cache_latents
    batch_size: int = 128  # images per encoder call
    precision: str = "auto"  # auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16


@dataclasses.dataclass
class LabUNet:
    model: str = "lab"  # UNet preset (models/unet.py) or config.json, the same in every space
    batch_size: int = 64  # samples per step
    total_samples: int = 32_000  # training length in samples, the same in every space
    lr: float = 1e-3  # AdamW peak learning rate
    warmup_samples: int = 2_000  # linear warm-up in samples
    ema_halflife_samples: int = 5_000  # EMA half-life in samples; samples come from the EMA weights
    zero_stage: int = 0  # DeepSpeed ZeRO stage (0: a plain torch optimizer, right for one process)
    log_every_samples: int = 640  # log interval in samples (the loss curves' resolution)
    checkpoint_every_samples: int = 16_000  # checkpoint interval in samples
    overrides: list[str] = dataclasses.field(default_factory=list)  # further UNetJob key=value, all four


@dataclasses.dataclass
class LabSampling:
    prompts: list[str] = dataclasses.field(default_factory=list)  # fixed prompts; []: the first num_prompts
    #   captions of the synthetic held-out set (needed with real data: the synthetic grammar is not assumed)
    num_prompts: int = 20  # held-out captions used when prompts is empty
    per_prompt: int = 8  # images per prompt (all scored)
    guidance: float = 3.0  # classifier-free guidance scale
    steps: int = 25  # sampler steps
    sampler: str = "ddim"  # ddim | dpm
    grid_prompts: int = 6  # prompts (rows) shown in each space's sample grid


@dataclasses.dataclass
class LabClassifier:
    images: int = 6000  # synthetic images (training seed) the caption classifier learns from
    steps: int = 1500  # AdamW steps
    batch_size: int = 64  # images per step
    width: int = 32  # first-layer channels (32 reads textures at 32 px)


@dataclasses.dataclass
class LabEval:
    images: int = 512  # held-out images evaluated, and the real side of sample FID (fewer when the shards hold fewer)
    batch_size: int = 64  # images per evaluation batch
    inception_weights: str = ""  # rFID and sample FID: Inception-v3 weights file; "": torch hub cache, else n/a
    clip_model: str = ""  # CLIP score: OpenCLIP MODEL:PATH (a local weights file); "": CLIP score is n/a
    hf_cutoff: float = 0.5  # high-frequency share: energy above this fraction of Nyquist
    grid_images: int = 4  # held-out images in the reconstruction grid


@dataclasses.dataclass
class LabJob:
    run_dir: str = "runs/lab"  # everything goes here; report.md last
    seed: int = 0  # seed of every training job and of sampling
    threads: int = 0  # torch CPU threads in this process (0: torch's default)
    data: LabData = dataclasses.field(default_factory=LabData)  # the images
    models: LabModels = dataclasses.field(default_factory=LabModels)  # first stages to load instead of train
    autoencoder: LabAutoencoder = dataclasses.field(default_factory=LabAutoencoder)  # first-stage training
    cache: LabCache = dataclasses.field(default_factory=LabCache)  # latent caches
    unet: LabUNet = dataclasses.field(default_factory=LabUNet)  # second-stage training, per space
    sampling: LabSampling = dataclasses.field(default_factory=LabSampling)  # generation
    classifier: LabClassifier = dataclasses.field(default_factory=LabClassifier)  # caption accuracy
    eval: LabEval = dataclasses.field(default_factory=LabEval)  # reconstruction and sample-quality metrics

    @property
    def synthetic(self) -> bool:
        return not self.data.urls

    def validate(self) -> None:
        bad = config_lib.ConfigError
        for key in ("train_images", "heldout_images", "per_shard", "resolution"):
            if getattr(self.data, key) <= 0:
                raise bad(f"data.{key} must be positive, got {getattr(self.data, key)}")
        for key in ("num_prompts", "per_prompt", "steps", "grid_prompts"):
            if getattr(self.sampling, key) <= 0:
                raise bad(f"sampling.{key} must be positive, got {getattr(self.sampling, key)}")
        for key in ("images", "steps", "batch_size", "width"):
            if getattr(self.classifier, key) <= 0:
                raise bad(f"classifier.{key} must be positive, got {getattr(self.classifier, key)}")
        check_clip_spec(self.eval.clip_model)  # its form here; its file when the lab starts (dry runs work)
        if self.sampling.sampler not in ("ddim", "dpm"):
            raise bad(f"sampling.sampler must be ddim or dpm, got {self.sampling.sampler!r}")
        for key in ("textures", "background_textures"):
            try:
                synthetic.parse_textures(getattr(self.data, key), f"data.{key}")
            except ValueError as e:
                raise bad(str(e)) from None
        if not self.synthetic and not self.data.heldout_urls:
            raise bad("data.heldout_urls is empty: with data.urls set, name held-out shards to evaluate on")
        if not self.synthetic and not self.sampling.prompts:
            raise bad("sampling.prompts is empty: with data.urls set (real data), list the prompts to sample")
        if self.synthetic:
            for i, prompt in enumerate(self.sampling.prompts):
                try:
                    synthetic.parse_caption(prompt)
                except ValueError as e:
                    raise bad(f"sampling.prompts[{i}]: {e}") from None
        # Build every sub-config once, so that a bad override fails here, before any work.
        for name in FIRST_STAGES:
            autoencoder_job(self, name, "placeholder")
        for space in SPACES:
            unet_job(self, space, "placeholder")
        cache_job(self, "identity", "placeholder")
        self._validate_own_fields()

    def _validate_own_fields(self) -> None:
        """The lab's fields that no sub-config checks, when the config is resolved (also --dry-run)."""
        from trainer.core.job_checks import check_vae_spec

        if not self.run_dir:
            raise config_lib.ConfigError("run_dir is empty: name the lab's folder")
        config_lib.check_non_negative(self, ("seed", "threads"))
        config_lib.check_non_negative(self.data, ("seed",), "data.")
        config_lib.check_non_negative(self.sampling, ("guidance",), "sampling.")
        config_lib.check_positive(self.eval, ("images", "batch_size", "grid_images"), "eval.")
        if not 0.0 < self.eval.hf_cutoff < 1.0:
            raise config_lib.ConfigError(f"eval.hf_cutoff must be in (0, 1), got {self.eval.hf_cutoff}")
        if self.eval.inception_weights:
            config_lib.check_local_path("eval.inception_weights", self.eval.inception_weights, "Inception weights",
                                        kind="file")
        for name in ("kl_plain", "kl_gan", "vq_gan"):
            if getattr(self.models, name):
                check_vae_spec(getattr(self.models, name), f"models.{name}")


def stage_dir(cfg: LabJob, *parts: str) -> str:
    return os.path.join(cfg.run_dir, *parts)


def _sub_config(cls, section: str, job, extra: list[str]):
    """`job`, built from the lab's settings, with the user's `key=value` list `extra` on top,
    typed and validated as that job's command line would be; an error names the lab section
    it came from."""
    try:
        return config_lib.load_config(cls, None, list(extra), base=job)
    except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f"{section}: {e}") from None


def _with_endpoint(data, endpoint_url: str | None):
    """The data section reading from the lab's endpoint, where it names one."""
    return dataclasses.replace(data, endpoint_url=endpoint_url) if endpoint_url else data


def autoencoder_job(cfg: LabJob, name: str, train_urls: str) -> AutoencoderJob:
    """The AutoencoderJob of first stage `name` (an objective), trained on `train_urls`: its
    base YAML, the lab's shared settings, then autoencoder.overrides."""
    a, d = cfg.autoencoder, cfg.data
    key = f"autoencoder.{name}_config"
    section = f"{key} + autoencoder.overrides"
    try:  # validated below, once the lab's settings complete it
        base = config_lib.load_config(AutoencoderJob, getattr(a, f"{name}_config"), validate=False)
    except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f"{section}: {e}") from None
    data = dataclasses.replace(base.data, urls=train_urls, resolution=d.resolution, num_workers=d.num_workers)
    job = dataclasses.replace(
        base, run_dir=stage_dir(cfg, "autoencoders", name), data=_with_endpoint(data, d.endpoint_url),
        preset=a.vq_preset if name == "vq_gan" else a.kl_preset, latent_channels=a.latent_channels,
        batch_per_rank=a.batch_size, total_samples=a.total_samples, warmup_samples=a.warmup_samples,
        disc_start_samples=a.disc_start_samples, lpips_net=a.lpips_net, lpips_weights=a.lpips_weights,
        log_every_samples=a.log_every_samples, checkpoint_every_samples=a.checkpoint_every_samples, seed=cfg.seed,
        wandb="disabled")
    job = _sub_config(AutoencoderJob, section, job, a.overrides)
    if job.objective != name:
        raise config_lib.ConfigError(f"{key}: its objective is {job.objective}, the lab needs {name}")
    return job


def cache_job(cfg: LabJob, vae: str, space: str) -> CacheJob:
    """The CacheJob that encodes the training images with `vae` into the cache of `space`."""
    d, c = cfg.data, cfg.cache
    data = ImageData(urls=train_urls(cfg), resolution=d.resolution, num_workers=d.num_workers)
    job = CacheJob(data=_with_endpoint(data, d.endpoint_url), out_url=stage_dir(cfg, "latents", space), vae=vae,
                   text_encoder=c.text_encoder, batch_size=c.batch_size, precision=c.precision)
    return _sub_config(CacheJob, "cache", job, [])


def unet_job(cfg: LabJob, space: str, cache_url: str) -> UNetJob:
    """The UNetJob of `space`: the same settings in every space, only the cache differs."""
    u, defaults = cfg.unet, UNetJob()
    job = dataclasses.replace(
        defaults, run_dir=stage_dir(cfg, "unets", space),
        data=dataclasses.replace(defaults.data, urls=cache_url, num_workers=cfg.data.num_workers), model=u.model,
        batch_per_rank=u.batch_size, total_samples=u.total_samples, lr=u.lr, warmup_samples=u.warmup_samples,
        ema_halflife_samples=u.ema_halflife_samples, zero_stage=u.zero_stage, log_every_samples=u.log_every_samples,
        checkpoint_every_samples=u.checkpoint_every_samples, seed=cfg.seed, wandb="disabled")
    return _sub_config(UNetJob, "unet.overrides", job, u.overrides)


def train_urls(cfg: LabJob) -> str:
    return cfg.data.urls or stage_dir(cfg, "data", "train")


def heldout_urls(cfg: LabJob) -> str:
    return cfg.data.heldout_urls or stage_dir(cfg, "data", "heldout")
