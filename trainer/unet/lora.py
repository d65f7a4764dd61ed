"""LoRA fine-tuning of a pretrained UNet (Hu et al. 2021), through peft as diffusers does it.

The pretrained weights are frozen and low-rank adapters are added to the attention
projections (`lora_targets`; diffusers' text-to-image LoRA example adapts the same four).
Only the adapters train, so the optimizer, the EMA and the checkpoints hold only them: a
checkpoint's `unet/` and `ema_unet/` folders hold the adapter weights under the UNet's own
parameter names, and the frozen base is always read again from `pretrained`. With
lora_text_encoder=true the text encoder(s) get adapters too, and ride on the UNet as one child
module, so that one engine, one EMA and one checkpoint hold both. Export writes diffusers' LoRA
file, which `pipe.load_lora_weights(DIR)` loads, kohya's, which A1111 and ComfyUI load, or with
`merge` folds the adapters into full weights: W + (alpha / r) B A for each adapted layer.
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from models.flow_model import family_of

WEIGHTS = "diffusion_pytorch_model.safetensors"  # the adapter's file in a checkpoint's unet/ and ema_unet/


def lora_config(cfg):
    from peft import LoraConfig

    # "gaussian": A ~ N(0, 1/r), B = 0, so the adapted UNet starts equal to the pretrained one.
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank, init_lora_weights="gaussian",
                      target_modules=list(cfg.lora_targets))


def add_lora(unet, cfg):
    """Freeze `unet` and add the job's adapters, their initial weights seeded by cfg.seed."""
    from trainer.core.config import ConfigError

    targets = list(cfg.lora_targets)
    sides = [min(getattr(m, "in_features", 0) or getattr(m, "in_channels", 0),
                 getattr(m, "out_features", 0) or getattr(m, "out_channels", 0))
             for n, m in unet.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]
    if sides and cfg.lora_rank > max(sides):  # checked before peft allocates rank x (in + out) per layer (#27)
        raise ConfigError(f"lora_rank={cfg.lora_rank} is above the smaller side of every adapted layer (at most "
                          f"{max(sides)} in {targets}): a larger rank adds nothing; use at most {max(sides)} "
                          "(LoRA ranks are usually 4-128)")
    unet.ldm_base_fingerprint = base_fingerprint(unet)  # before the adapters rename the layers they wrap
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            unet.add_adapter(lora_config(cfg))
        except ValueError as e:  # peft: "Target modules {...} not found in the base model"
            raise ConfigError(f"lora_targets={list(cfg.lora_targets)}: {str(e).splitlines()[0][:200]}") from None
    if not any(p.requires_grad for p in unet.parameters()):
        raise ConfigError(f"lora_targets={list(cfg.lora_targets)} matched no layer of the UNet")
    return unet


TEXT_ENCODER = "lora_text_encoder"  # where a run with lora_text_encoder=true hangs the adapted text encoder on the UNet
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's attention projections, as diffusers' DreamBooth
#   LoRA scripts adapt them


def clip_models(text_encoder) -> list[tuple[str, torch.nn.Module]]:
    """[(pipeline folder name, transformers CLIP model)]: one for SD 1.x/2.x, two for SDXL."""
    from trainer.core.config import ConfigError

    parts = [("text_encoder", text_encoder)] if not hasattr(text_encoder, "second") else \
        [("text_encoder", text_encoder.first), ("text_encoder_2", text_encoder.second)]
    for folder, part in parts:
        if not hasattr(part, "model") or not hasattr(part, "tokenizer"):
            raise ConfigError(f"lora_text_encoder=true adapts a pipeline folder's transformers CLIP text encoder; "
                              f"the cache's {folder} is {type(part).__name__} ({getattr(part, 'name', '?')})")
    return [(folder, part.model) for folder, part in parts]


def add_text_encoder_lora(unet, text_encoder, cfg):
    """Adapters of the job's rank on `text_encoder`'s attention projections (frozen otherwise), the encoder then
    hung on `unet` as the child TEXT_ENCODER: its adapters train, average and checkpoint with the UNet's (one
    engine, one EMA, one checkpoint), under names that start with TEXT_ENCODER. The UNet's forward never calls
    it; the training step encodes each batch's token ids with it."""
    from peft import LoraConfig, inject_adapter_in_model

    text_encoder.requires_grad_(False)
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank, init_lora_weights="gaussian",
                        target_modules=list(TEXT_TARGETS))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)  # not the UNet's adapters' draws
        for _, model in clip_models(text_encoder):  # peft's own injection: transformers' add_adapter asks for
            inject_adapter_in_model(config, model)  # a newer peft than diffusers' UNet adapters need
    unet.add_module(TEXT_ENCODER, text_encoder)
    return unet


def attached_text_encoder(unet):
    """The adapted text encoder a lora_text_encoder run hangs on its UNet, or None."""
    return unet._modules.get(TEXT_ENCODER)


def _unet_lora_state(unet) -> dict[str, torch.Tensor]:
    """peft's adapter weights of the UNet itself (not of an attached text encoder)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v for k, v in get_peft_model_state_dict(unet).items() if not k.startswith(TEXT_ENCODER + ".")}


def base_fingerprint(unet) -> str:
    """A short identity of the frozen base's weights: names, shapes and about 1,000 values per tensor. Two
    fine-tunes of one architecture differ in it (their weights all moved); recorded with every LoRA
    checkpoint and export, so that an adapter is never applied, silently, to a base it was not trained on."""
    import hashlib

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in unet.state_dict().items():
            flat = p.detach().reshape(-1)
            sample = flat[::max(1, flat.numel() // 1024)].float().cpu()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def check_base(unet, recorded: str | None, where: str, pretrained: str) -> None:
    """Refuse an adapter recorded as trained on another base than `unet`'s (None: recorded before #27)."""
    from trainer.core.config import ConfigError

    have = getattr(unet, "ldm_base_fingerprint", None)
    if recorded and have and recorded != have:
        raise ConfigError(f"{where} was trained on a base UNet whose weights differ from pretrained={pretrained}'s "
                          f"now (fingerprint {recorded}, now {have}): the adapter would be applied to another model; "
                          "point pretrained at the base it was trained on")


def trainable_state(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_adapter(unet, folder: str) -> None:
    """The adapter weights of a checkpoint folder (unet/ or ema_unet/) into an adapted UNet."""
    path = os.path.join(folder, WEIGHTS)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is this a checkpoint of a LoRA run?")
    state = load_file(path)
    want = {n for n, p in unet.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:
        raise FileNotFoundError(f"{path} does not hold this run's adapter: {len(missing)} weights missing "
                                f"({missing[:1]}), {len(unexpected)} unexpected ({unexpected[:1]})")
    unet.load_state_dict(state, strict=False)


def save_lora_weights(unet, out: str, cfg) -> str:
    """diffusers' LoRA file of the adapted `unet` (and its attached text encoder's adapters) in `out`: what
    load_lora_weights reads, for an SD pipeline or (two text encoders) an SDXL one."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    config = lora_config(cfg)
    meta = {"r": config.r, "lora_alpha": config.lora_alpha}
    family = family_of(unet)
    if family is not None:  # SD3 / Flux: the transformer's adapters, for their pipelines' load_lora_weights (#30)
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

        writer = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
        writer.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True,
                                 transformer_lora_adapter_metadata={**meta, "target_modules": sorted(config.target_modules)})
        return os.path.join(out, "pytorch_lora_weights.safetensors")
    kwargs = dict(unet_lora_layers=convert_state_dict_to_diffusers(_unet_lora_state(unet)),
                  unet_lora_adapter_metadata={**meta, "target_modules": sorted(config.target_modules)})
    text_encoder, writer = attached_text_encoder(unet), StableDiffusionPipeline
    if text_encoder is not None:
        for folder, model in clip_models(text_encoder):
            kwargs[f"{folder}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
            kwargs[f"{folder}_lora_adapter_metadata"] = {**meta, "target_modules": sorted(TEXT_TARGETS)}
        writer = StableDiffusionXLPipeline if "text_encoder_2_lora_layers" in kwargs else writer
    writer.save_lora_weights(out, safe_serialization=True, **kwargs)
    return os.path.join(out, "pytorch_lora_weights.safetensors")


KOHYA_FILE = "lora_kohya.safetensors"  # the adapter in kohya's layout, inside an export folder


def save_kohya_lora(unet, out: str, cfg) -> str:
    """The adapted `unet`'s adapters in kohya's sd-scripts layout, the LoRA file A1111 and ComfyUI load (and
    diffusers' load_lora_weights converts): per adapted module `lora_unet_<its diffusers name, '.' as '_'>`
    with `.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha`, the update being alpha / rank * B A."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = lora_config(cfg)
    layers = [("lora_unet_", _unet_lora_state(unet))]
    text_encoder = attached_text_encoder(unet)
    if text_encoder is not None:  # kohya's lora_te_ (SD) or lora_te1_ / lora_te2_ (SDXL), in transformers 4's
        models = clip_models(text_encoder)  # module names (text_model.encoder...), which A1111 and ComfyUI match
        for i, (_, model) in enumerate(models, 1):
            state = {k if k.startswith("text_model.") else "text_model." + k: v
                     for k, v in get_peft_model_state_dict(model).items()}
            layers.append((f"lora_te{i if len(models) > 1 else ''}_", state))
    state = {}
    for prefix, weights in layers:
        for key, value in weights.items():
            module, _, which = key.rpartition(".lora_")
            name = prefix + module.replace(".", "_")
            state[f"{name}.{'lora_down' if which.startswith('A') else 'lora_up'}.weight"] = \
                value.detach().float().cpu().contiguous()
            state[f"{name}.alpha"] = torch.tensor(float(config.lora_alpha))
    path = os.path.join(out, KOHYA_FILE)
    save_file(state, path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(config.r),
                                     "ss_network_alpha": str(config.lora_alpha), "ss_base_model": str(cfg.pretrained)})
    return path


def merged(unet):
    """The adapted UNet with its adapters folded into the weights: a plain UNet2DConditionModel. An attached
    text encoder is taken off it and its adapters folded in place too (the caller holds it as the run's)."""
    text_encoder = unet._modules.pop(TEXT_ENCODER, None)
    if text_encoder is not None:
        for _, model in clip_models(text_encoder):
            fold_adapters(model)
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    return unet


def fold_adapters(model) -> None:
    """Each peft LoRA layer of `model` merged into its base layer (W + alpha / r B A), which takes its place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
