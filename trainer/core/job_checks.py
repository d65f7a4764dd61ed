"""Checks of the model specs in job configs (vae=, text_encoder=, model=), made when the config
is resolved, so that `--dry-run` and launch/submit.py refuse a bad one on the login node
instead of the job failing on the nodes after its wait in the queue.

Names come from the registries in models/ (their PRESETS, OpenCLIP's model list), never from
a copy here. A local path must exist; a hub id (`org/name`) cannot be checked without the
network and is left to the loader.
"""
from __future__ import annotations

import math
import os

from trainer.core.config import ConfigError, check_local_path, did_you_mean, looks_like_hub_id

_CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


def check_unet_model(model: str, key: str = "model") -> None:
    """A preset of models/unet.py or models/flow_model.py (SD3/Flux transformers), or a diffusers config.json
    that exists here."""
    from models.flow_model import PRESETS as FLOW_PRESETS
    from models.unet import PRESETS

    names = [*PRESETS, *FLOW_PRESETS]
    if model.endswith(".json"):
        check_local_path(key, model, "UNet config", kind="file")
    elif model not in names:
        raise ConfigError(f"{key} must be a UNet preset ({', '.join(PRESETS)}), a transformer preset "
                          f"({', '.join(FLOW_PRESETS)}) or a diffusers config.json, got {model!r}{did_you_mean(model, names)}")


def check_vae_spec(spec: str, key: str = "vae") -> None:
    """identity | preset:NAME | a local diffusers folder (must exist) | a hub id ORG/NAME[::SUBFOLDER]
    (models.autoencoder.load_autoencoder's forms)."""
    from models.autoencoder import IDENTITY, PRESETS

    if spec == IDENTITY:
        return
    if spec.startswith("preset:"):
        name = spec.split(":", 1)[1]
        if name not in PRESETS:
            raise ConfigError(f"{key}=preset:{name}: unknown autoencoder preset; presets: {', '.join(PRESETS)}"
                              f"{did_you_mean(name, PRESETS)}")
        return
    if os.path.isdir(spec) or looks_like_hub_id(spec):
        return
    raise ConfigError(f"{key}={spec}: autoencoder path does not exist (expected identity, preset:NAME, a diffusers "
                      "folder or a hub id ORG/NAME)")


def check_pretrained(spec: str, parts: tuple[str, ...], key: str = "pretrained") -> None:
    """A diffusers pipeline folder with model_index.json and the files of `parts`, or a hub id."""
    from models.pipeline import check_folder

    try:
        check_folder(spec, parts, key)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None


def check_text_encoder_spec(spec: str, key: str = "text_encoder") -> None:
    """tiny | tiny:FILE (must exist) | OpenCLIP MODEL[:PRETRAINED], PRETRAINED a tag OpenCLIP
    knows for MODEL or a checkpoint file that exists | a diffusers pipeline folder with
    text_encoder/ and tokenizer/, or a hub id ORG/NAME (models.text_encoder.load_text_encoder) | two
    OpenCLIP specs joined by '+' (SDXL's pair, from scratch)."""
    from models.text_encoder import is_pipeline_spec

    if is_pipeline_spec(spec):
        check_pretrained(spec, ("text_encoder", "tokenizer"), key)
        return
    if "+" in spec:
        parts = spec.split("+")
        if len(parts) != 2 or any(not p or is_pipeline_spec(p) for p in parts):
            raise ConfigError(f"{key}={spec}: a pair of text encoders is two OpenCLIP specs joined by '+', e.g. "
                              "ViT-L-14:/ckpt/l.bin+ViT-bigG-14:/ckpt/g.bin (an SDXL pipeline folder brings its own)")
        for part in parts:
            check_text_encoder_spec(part, key)
        return
    name, _, pretrained = spec.partition(":")
    if name == "tiny":
        if pretrained:
            check_local_path(key, spec, "text encoder weights", kind="file", path=pretrained)
        return
    import open_clip

    models = open_clip.list_models()
    if name not in models:
        raise ConfigError(f"{key}={spec}: unknown text encoder {name!r}; use tiny or an OpenCLIP model name "
                          f"(e.g. ViT-H-14){did_you_mean(name, models)}")
    if not pretrained:
        return
    if "/" in pretrained or os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES):
        check_local_path(key, spec, "OpenCLIP checkpoint", kind="file", path=pretrained)
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ConfigError(f"{key}={spec}: OpenCLIP has no pretrained tag {pretrained!r} for {name} "
                          f"({', '.join(tags) or 'none'}){did_you_mean(pretrained, tags)}")


def check_guidance(guidance: float, negative_prompt: str, guidance_name: str = "guidance",
                   negative_name: str = "negative prompt") -> None:
    """Refuse guidance settings that cannot mean what was asked: the scale must be a finite
    number >= 0 (0 samples the unconditional/negative side alone, 1 the prompt alone, > 1
    extrapolates away from the negative side); a negative prompt only acts at a scale > 1
    (at 1 it is ignored, below 1 the samples move towards it)."""
    if not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and guidance >= 0):
        raise ConfigError(f"{guidance_name} must be a finite number >= 0, got {guidance!r}")
    if negative_prompt and guidance <= 1:
        raise ConfigError(f"{negative_name} {negative_prompt!r} needs {guidance_name} > 1 (got {guidance}): "
                          "at 1 it is ignored, below 1 samples move towards it")
