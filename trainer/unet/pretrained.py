"""Starting the UNet job from a Stable Diffusion pipeline folder (`pretrained=`): fine-tuning and
continued pretraining.

What comes from the folder: the UNet's architecture and weights (unet/; the EMA starts from
them, since it starts from whatever the engine holds), the noise schedule's betas and the
prediction type (scheduler/). What is checked against it: the latent cache's VAE and text
encoder must be the folder's, by identity (weights and configuration, not paths): a cache
made with other encoders trains without error into a model that no pipeline can use.
"""
from __future__ import annotations

import dataclasses

from models import pipeline
from models.autoencoder import autoencoder_identity, load_autoencoder
from models.diffusion import noise_schedule
from models.flow_model import CLASSES, build_preset
from models.text_encoder import load_text_encoder
from models.unet import build_unet, check_unet_fits

from trainer.cache.manifest import Manifest
from trainer.core.config import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction")
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # UNetJob's default: a UNet's attention projections
FLOW_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2")


def pipeline_flow_family(pretrained: str) -> str | None:
    """"sd3" or "flux" for an SD3 or Flux pipeline folder, None for a UNet one; one line where a local folder is
    unreadable. A hub id whose model_index.json cannot be had (no network: checked here without any) is taken for
    a UNet's, and its loader then names what is missing."""
    try:
        return pipeline.flow_family(pretrained)
    except FileNotFoundError as e:
        if not pipeline.is_local(pretrained):
            return None  # UNetJob.validate: prediction_type=flow names a hub id's kind offline
        raise ConfigError(f"pretrained={pretrained}: {e}") from None


def flow_family(cfg) -> str | None:
    """The transformer family the job trains ("sd3" or "flux": rectified flow), or None for a UNet."""
    from models.flow_model import PRESETS

    if cfg.pretrained:
        return pipeline_flow_family(cfg.pretrained)
    return PRESETS[cfg.model][0] if cfg.model in PRESETS else None


def denoiser_class(cfg):
    """The diffusers class of the job's denoiser: UNet2DConditionModel, or SD3's or Flux's transformer (#30)."""
    import diffusers

    family = flow_family(cfg)
    return getattr(diffusers, CLASSES[family] if family else "UNet2DConditionModel")


def folder_prediction_type(pretrained: str) -> str:
    value = pipeline.scheduler_config(pretrained).get("prediction_type", "epsilon")
    if value not in PREDICTION_TYPES:
        raise ConfigError(f"pretrained={pretrained}: its scheduler's prediction_type {value!r} is not one the trainer "
                          f"knows ({', '.join(PREDICTION_TYPES)})")
    return value


def prediction_type(cfg) -> str:
    """`auto`: the pretrained folder's scheduler's, else epsilon; flow for SD3/Flux transformers (only that)."""
    family = flow_family(cfg)
    if family is not None:
        if cfg.prediction_type not in ("auto", "flow"):
            raise ConfigError(f"prediction_type={cfg.prediction_type}: {cfg.pretrained or cfg.model} is an {family} "
                              "transformer, trained with rectified flow (prediction_type=flow or auto)")
        return "flow"
    if cfg.prediction_type == "flow":
        raise ConfigError("prediction_type=flow trains SD3 and Flux transformers (pretrained= such a folder, or "
                          f"model=tiny_sd3|tiny_flux); {cfg.pretrained or cfg.model}'s UNet predicts epsilon or v")
    if cfg.prediction_type != "auto":
        return cfg.prediction_type
    return folder_prediction_type(cfg.pretrained) if cfg.pretrained else "epsilon"


def resolve(cfg, say=print):
    """The config with `auto` resolved, as it is saved in the run directory: sampling and export
    then read what was trained, and a rerun of the same command compares equal. `say`: where a
    note goes (None: nowhere, e.g. on ranks other than 0)."""
    resolved = dataclasses.replace(cfg, prediction_type=prediction_type(cfg))
    if flow_family(cfg) is not None and list(cfg.lora_targets) == UNET_LORA_TARGETS:
        # SD3/Flux: the attention projections of both streams and the MLPs, as diffusers' DreamBooth LoRA scripts
        resolved = dataclasses.replace(resolved, lora_targets=list(FLOW_LORA_TARGETS))
    if cfg.pretrained and cfg.prediction_type != "auto" and say is not None:
        folder = folder_prediction_type(cfg.pretrained)
        if folder != cfg.prediction_type:
            say(f"note: prediction_type={cfg.prediction_type} is given explicitly and {cfg.pretrained} was trained "
                  f"with {folder}: the UNet is re-targeted, which takes many more samples than a fine-tune")
    return resolved


def training_schedule(cfg):
    """The DDPM schedule the job trains on: the folder's betas where pretrained is set, SD's otherwise. A flow
    transformer's: the folder's FlowMatchEulerDiscreteScheduler (SD3's shift 3, or Flux's resolution-dependent
    shift), flow_shift replacing the shift where set; from scratch, the same as SD3's or Flux's pipelines."""
    family = flow_family(cfg)
    if family is not None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        base = pipeline.scheduler_config(cfg.pretrained) if cfg.pretrained else \
            {"shift": 3.0} if family == "sd3" else {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                                                    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
        base = {k: v for k, v in base.items() if not k.startswith("_")}
        if cfg.flow_shift:
            base.update(shift=cfg.flow_shift, use_dynamic_shifting=False)
        return FlowMatchEulerDiscreteScheduler.from_config(base)
    base = pipeline.scheduler_config(cfg.pretrained) if cfg.pretrained else None
    try:
        return noise_schedule(prediction_type(cfg), zero_terminal_snr=cfg.zero_terminal_snr, base=base)
    except ValueError as e:
        raise ConfigError(f"pretrained={cfg.pretrained}: {e}") from None


def build_model(cfg, channels: int, size: int, context_dim: int, pooled_dim: int = 0):
    """The job's UNet before any training: the folder's weights (frozen, with LoRA adapters where
    lora_rank > 0), or a preset seeded by cfg.seed. `pooled_dim`: the cache's pooled text width (SDXL)."""
    family = flow_family(cfg)
    if not cfg.pretrained:
        if family is not None:
            return build_preset(cfg.model, channels, size, context_dim, pooled_dim, seed=cfg.seed)
        try:
            return build_unet(cfg.model, channels, size, context_dim, seed=cfg.seed, pooled_dim=pooled_dim)
        except ValueError as e:
            raise ConfigError(f"model={cfg.model}: {e}") from None
    unet = pipeline.load_transformer(cfg.pretrained) if family else pipeline.load_unet(cfg.pretrained)
    try:
        (check_transformer_fits if family else check_unet_fits)(dict(unet.config), channels, context_dim, pooled_dim)
    except ValueError as e:
        raise ConfigError(f"pretrained={cfg.pretrained}: {e}") from None
    if cfg.lora_rank:
        from trainer.unet.lora import add_lora

        add_lora(unet, cfg)
    return unet


def check_transformer_fits(config: dict, channels: int, context_dim: int, pooled_dim: int) -> None:
    """An SD3/Flux transformer takes the cache's latents (Flux: packed 2x2), T5 width and pooled width."""
    packed = config.get("patch_size", 2) == 1 and config.get("in_channels") == channels * 4  # Flux
    if config.get("in_channels") != channels and not packed:
        raise ValueError(f"its transformer takes {config.get('in_channels')} latent channels, the cache holds {channels}")
    for field, have in (("joint_attention_dim", context_dim), ("pooled_projection_dim", pooled_dim)):
        if config.get(field) != have:
            raise ValueError(f"its transformer's {field} is {config.get(field)}, the cache's text gives {have}")


def shapes_only(cfg, channels: int, size: int, context_dim: int, pooled_dim: int = 0):
    """The job's UNet architecture without weights (call under torch.device('meta'))."""
    family = flow_family(cfg)
    if family is not None:
        if not cfg.pretrained:
            return build_preset(cfg.model, channels, size, context_dim, pooled_dim)
        import diffusers

        config = pipeline.transformer_config(cfg.pretrained)
        return getattr(diffusers, CLASSES[family]).from_config(config)
    if not cfg.pretrained:
        try:
            return build_unet(cfg.model, channels, size, context_dim, pooled_dim=pooled_dim)
        except ValueError as e:
            raise ConfigError(f"model={cfg.model}: {e}") from None
    from diffusers import UNet2DConditionModel

    config = pipeline.unet_config(cfg.pretrained)
    try:  # before anything is built from it (flops.py ran this UNet on the cache's shapes: #27)
        check_unet_fits(config, channels, context_dim, pooled_dim)
    except ValueError as e:
        raise ConfigError(f"pretrained={cfg.pretrained}: {e}") from None
    return UNet2DConditionModel.from_config(config)


def cache_mismatch(cfg, manifest: Manifest, cache_url: str) -> str | None:
    """Why the cache was not made with the pretrained folder's VAE and text encoder, or None.
    (Hashing both models' weights takes seconds: one rank does it and tells the others.)"""
    if not cfg.pretrained:
        return None
    try:
        check_cache_encoders(cfg, manifest, cache_url)
    except (ConfigError, FileNotFoundError) as e:
        return str(e)
    return None


def check_cache_encoders(cfg, manifest: Manifest, cache_url: str) -> None:
    """The cache must have been made with the pretrained folder's VAE and text encoder."""
    if not cfg.pretrained:
        return
    vae = load_autoencoder(pipeline.part_spec(cfg.pretrained, "vae"))
    if autoencoder_identity(vae) != manifest.vae.identity:
        raise ConfigError(f"the cache {cache_url} was made with the VAE {manifest.vae.source}, not pretrained="
                          f"{cfg.pretrained}'s vae/: rebuild it with cache_latents pretrained={cfg.pretrained}")
    text_encoder = load_text_encoder(cfg.pretrained, manifest.text_encoder.layer, manifest.text_encoder.max_tokens)
    if text_encoder.identity() != manifest.text_encoder.identity:
        raise ConfigError(f"the cache {cache_url} was made with the text encoder {manifest.text_encoder.spec}, not "
                          f"pretrained={cfg.pretrained}'s text_encoder/ and tokenizer/: rebuild it with "
                          f"cache_latents pretrained={cfg.pretrained}")


def init_from_run(unet, cfg, say=print) -> str:
    """Load `cfg.init_from`'s weights into the job's fresh UNet (#29): a run folder (its newest complete
    checkpoint) or a checkpoint folder; the EMA weights where it kept them, else the trained ones. A full
    UNet takes a full UNet's weights, a LoRA run an adapter of the same rank and targets (on the same
    pretrained base: checked by its fingerprint). Anything else is a ConfigError naming the checkpoint."""
    import os

    from trainer.core import checkpoint
    from trainer.core.ema import EMA_DIR
    from trainer.core.errors import CheckpointError
    from trainer.unet.lora import check_base, load_adapter

    source = cfg.init_from
    try:
        ckpt = source if storage_exists_marker(source) else checkpoint.latest(checkpoint.default_root(source))
        if ckpt is None:
            raise ConfigError(f"init_from={source} holds no complete checkpoint (a run folder, or one of its "
                              "checkpoints/samples_N folders)")
        local = checkpoint.fetch(ckpt, parts=("unet", EMA_DIR))
        folder = os.path.join(local, EMA_DIR if os.path.isdir(os.path.join(local, EMA_DIR)) else "unet")
        if cfg.lora_rank:
            recorded = checkpoint.info(ckpt).get("lora_base")
            if recorded is None:
                raise ConfigError(f"init_from={source}: {ckpt} is not a LoRA run's checkpoint; this run trains "
                                  "LoRA adapters (lora_rank > 0)")
            check_base(unet, recorded if isinstance(recorded, str) else None, f"init_from={source}", cfg.pretrained)
            load_adapter(unet, folder)
        else:
            if checkpoint.info(ckpt).get("lora_base") is not None:
                raise ConfigError(f"init_from={source} is a LoRA run's checkpoint: a full UNet run cannot start from "
                                  "an adapter (export it with --merge and start from that pipeline folder)")
            # safetensors only: another user's run may hold a pickled .bin, which loading would execute
            state = denoiser_class(cfg).from_pretrained(folder, use_safetensors=True).state_dict()
            mine = unet.state_dict()
            bad = [k for k in mine if k not in state or state[k].shape != mine[k].shape]
            if bad or len(state) != len(mine):
                raise ConfigError(f"init_from={source}: {folder} holds another UNet architecture ({len(bad)} of "
                                  f"{len(mine)} weights missing or of another shape, e.g. {(bad or ['?'])[0]})")
            unet.load_state_dict(state)
    except (CheckpointError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"init_from={source}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    which = "EMA weights" if folder.endswith(EMA_DIR) else "trained weights"
    say(f"init_from: the {which} of {ckpt}; a fresh optimizer, schedule and EMA")
    return ckpt


def storage_exists_marker(path: str) -> bool:
    """Whether `path` is itself a complete checkpoint folder (it holds the completion marker)."""
    from data_pipeline import storage
    from trainer.core.checkpoint import MARKER

    return storage.exists(storage.join(path, MARKER))


def trained_model_notes(cfg) -> dict[str, str]:
    """What a run's saved config.yaml says beside `model` when the UNet is not `model`'s (#29: a fine-tune's
    config read `model: demo`): pretrained's unet/ and its architecture, and the run it started from."""
    if not cfg.pretrained:
        return {"init_from": "its weights start this run"} if cfg.init_from else {}
    what = f"LoRA adapters (rank {cfg.lora_rank}) on" if cfg.lora_rank else "all weights of"
    if pipeline.flow_family(cfg.pretrained):
        t = pipeline.transformer_config(cfg.pretrained)
        arch = (f"{t.get('_class_name')}, {t.get('num_layers')} + {t.get('num_single_layers', 0)} blocks, "
                f"{t.get('num_attention_heads')} heads of {t.get('attention_head_dim')}")
        return {"model": f"not used: this run trains {what} {cfg.pretrained}'s transformer/ ({arch})"}
    unet = pipeline.unet_config(cfg.pretrained)
    arch = (f"{unet.get('_class_name', 'UNet2DConditionModel')}, block_out_channels "
            f"{list(unet.get('block_out_channels', []))}, cross_attention_dim {unet.get('cross_attention_dim')}")
    return {"model": f"not used: this run trains {what} {cfg.pretrained}'s unet/ ({arch})"}

