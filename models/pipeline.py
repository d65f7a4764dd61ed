"""The parts of a diffusers Stable Diffusion pipeline folder (or hub id) that jobs start from.

A pipeline folder is what `StableDiffusionPipeline.save_pretrained` writes and what the hub
holds for runwayml/stable-diffusion-v1-5 or stabilityai/stable-diffusion-2-1:
model_index.json and one subfolder per component (unet/, vae/, text_encoder/, tokenizer/,
scheduler/). Jobs name it with `pretrained=`; each reads the parts it needs from here, and a
missing file is one line naming it, before anything is loaded.
"""
from __future__ import annotations

import json
import os

import torch

from models.pipeline_checks import check_part

# The files each part must have (one of the weight files where several are listed).
_PARTS = {
    "unet": (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    "vae": (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    "text_encoder": (("config.json",), ("model.safetensors", "pytorch_model.bin")),
    "tokenizer": (("tokenizer_config.json",),),
    # SDXL's second text encoder (OpenCLIP bigG with its pooled projection) and its tokenizer.
    "text_encoder_2": (("config.json",), ("model.safetensors", "pytorch_model.bin")),
    "tokenizer_2": (("tokenizer_config.json",),),
    "scheduler": (("scheduler_config.json",),),
    # SD3's and Flux's denoiser, and SD3's third text encoder (T5) with its tokenizer (#30).
    "transformer": (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                                       "diffusion_pytorch_model.safetensors.index.json")),
    "text_encoder_3": (("config.json",), ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")),
    "tokenizer_3": (("tokenizer_config.json",),),
}


def is_local(pretrained: str) -> bool:
    """A local folder (it must exist), not a hub id ORG/NAME."""
    return os.path.isabs(pretrained) or pretrained.startswith(".") or os.path.exists(pretrained) \
        or pretrained.count("/") != 1


def check_folder(pretrained: str, parts: tuple[str, ...], key: str = "pretrained") -> None:
    """A local pipeline folder must hold model_index.json and, for each of `parts`, its files;
    a hub id is checked by the loaders (there may be no network here)."""
    if not is_local(pretrained):
        return
    if not os.path.isdir(pretrained):
        raise FileNotFoundError(f"{key}={pretrained}: no such folder (expected a diffusers pipeline folder with "
                                "model_index.json, or a hub id ORG/NAME)")
    if not os.path.exists(os.path.join(pretrained, "model_index.json")):
        raise FileNotFoundError(f"{key}={pretrained} is not a diffusers pipeline folder: it has no model_index.json")
    for part in parts:
        for alternatives in _PARTS[part]:
            if not any(os.path.exists(os.path.join(pretrained, part, name)) for name in alternatives):
                raise FileNotFoundError(f"{key}={pretrained}: the pipeline folder has no {part}/{alternatives[0]}")
        check_part(pretrained, part, key)


def part_spec(pretrained: str, part: str) -> str:
    """How the loaders name one part: a local subfolder, or ORG/NAME::PART for a hub id
    (models.autoencoder.load_autoencoder's form)."""
    if is_local(pretrained):
        return os.path.join(os.path.abspath(pretrained), part)
    return f"{pretrained}::{part}"


def _read_json(pretrained: str, rel: str) -> dict:
    path = os.path.join(pretrained, rel)
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot read {path}: {str(e).splitlines()[0][:120]}") from None
    if not isinstance(value, dict):
        raise FileNotFoundError(f"{path} must hold a JSON object")
    return value


def model_index(pretrained: str) -> dict:
    """The folder's model_index.json (which parts it has, and their classes)."""
    if is_local(pretrained):
        check_folder(pretrained, ())
        return _read_json(pretrained, "model_index.json")
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(pretrained))
    except Exception as e:
        raise FileNotFoundError(f"cannot read model_index.json of '{pretrained}' from the hub or its local cache "
                                f"({type(e).__name__}); download the pipeline and name the local folder") from None


def has_two_text_encoders(pretrained: str) -> bool:
    """An SDXL-style pipeline: text_encoder_2/ beside text_encoder/ (model_index names a class for it)."""
    entry = model_index(pretrained).get("text_encoder_2")
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def flow_family(pretrained: str) -> str | None:
    """"sd3" or "flux" for a rectified-flow transformer pipeline (model_index's class), else None (#30)."""
    name = str(model_index(pretrained).get("_class_name", ""))
    return "sd3" if name.startswith("StableDiffusion3") else "flux" if name.startswith("Flux") else None


def scheduler_config(pretrained: str) -> dict:
    """The folder's scheduler config (its noise schedule and prediction type)."""
    if is_local(pretrained):
        check_folder(pretrained, ("scheduler",))
        return _read_json(pretrained, "scheduler/scheduler_config.json")
    from diffusers import DDPMScheduler

    try:
        return dict(DDPMScheduler.load_config(pretrained, subfolder="scheduler"))
    except Exception as e:
        raise FileNotFoundError(f"cannot read the scheduler of '{pretrained}' from the hub or its local cache "
                                f"({type(e).__name__}); download the pipeline and name the local folder") from None


def unet_config(pretrained: str) -> dict:
    """The folder's UNet config.json (architecture only; nothing is loaded)."""
    if is_local(pretrained):
        check_folder(pretrained, ("unet",))
        return _read_json(pretrained, "unet/config.json")
    from diffusers import UNet2DConditionModel

    try:
        return dict(UNet2DConditionModel.load_config(pretrained, subfolder="unet"))
    except Exception as e:
        raise FileNotFoundError(f"cannot read the UNet config of '{pretrained}' from the hub or its local cache "
                                f"({type(e).__name__}); download the pipeline and name the local folder") from None


def load_unet(pretrained: str):
    """The folder's UNet2DConditionModel with its weights, in fp32 (the trainer casts)."""
    from diffusers import UNet2DConditionModel

    check_folder(pretrained, ("unet",))
    try:
        return UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", torch_dtype=torch.float32)
    except Exception as e:
        raise FileNotFoundError(f"cannot load the UNet of '{pretrained}': {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:160]}") from None


def transformer_config(pretrained: str) -> dict:
    """An SD3 or Flux folder's transformer/config.json."""
    if is_local(pretrained):
        check_folder(pretrained, ("transformer",))
        return _read_json(pretrained, "transformer/config.json")
    from diffusers import SD3Transformer2DModel

    return dict(SD3Transformer2DModel.load_config(pretrained, subfolder="transformer"))


def load_transformer(pretrained: str):
    """The folder's SD3Transformer2DModel or FluxTransformer2DModel (as model_index names it), in fp32."""
    import diffusers

    family = flow_family(pretrained)
    cls = getattr(diffusers, {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}[family])
    check_folder(pretrained, ("transformer",))
    try:
        return cls.from_pretrained(pretrained, subfolder="transformer", torch_dtype=torch.float32)
    except Exception as e:
        raise FileNotFoundError(f"cannot load the transformer of '{pretrained}': {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:160]}") from None

