"""LoRA fine-tuning of a pretrained UNet (Hu et al. 2021), through peft as diffusers does it.

The pretrained weights are frozen and low-rank adapters are added to the attention
projections (`lora_targets`; diffusers' text-to-image LoRA example adapts the same four).
Only the adapters train, so the optimizer, the EMA and the checkpoints hold only them: a
checkpoint's `unet/` and `ema_unet/` folders hold the adapter weights under the UNet's own
parameter names, and the frozen base is always read again from `pretrained`. Export writes
diffusers' LoRA file, which `pipe.load_lora_weights(DIR)` loads, or with `merge` folds the
adapter into a full UNet: W + (alpha / r) B A for each adapted layer.
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

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
    """diffusers' LoRA file of the adapted `unet` in `out` (what load_lora_weights reads)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    config = lora_config(cfg)
    metadata = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata,
                                              safe_serialization=True)
    return os.path.join(out, "pytorch_lora_weights.safetensors")


KOHYA_FILE = "lora_kohya.safetensors"  # the adapter in kohya's layout, inside an export folder


def save_kohya_lora(unet, out: str, cfg) -> str:
    """The adapted `unet`'s adapters in kohya's sd-scripts layout, the LoRA file A1111 and ComfyUI load (and
    diffusers' load_lora_weights converts): per adapted module `lora_unet_<its diffusers name, '.' as '_'>`
    with `.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha`, the update being alpha / rank * B A."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = lora_config(cfg)
    state = {}
    for key, value in get_peft_model_state_dict(unet).items():
        module, _, which = key.rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        state[f"{name}.{'lora_down' if which.startswith('A') else 'lora_up'}.weight"] = value.detach().float().cpu().contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(config.lora_alpha))
    path = os.path.join(out, KOHYA_FILE)
    save_file(state, path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(config.r),
                                     "ss_network_alpha": str(config.lora_alpha), "ss_base_model": str(cfg.pretrained)})
    return path


def merged(unet):
    """The adapted UNet with its adapters folded into the weights: a plain UNet2DConditionModel."""
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    return unet
