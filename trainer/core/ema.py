"""An exponential moving average of a model's weights that is correct under every ZeRO stage;
the one EMA of both trainers (the UNet's, and the autoencoder's with a fixed per-step decay).

Under ZeRO-3 `param.data` is an empty placeholder between forward passes and each rank
holds only `param.ds_tensor`, its flat slice of the parameter; an EMA of `param.data`
there averages empty tensors (DeepSpeed #2056, #6987). So each rank averages what it
actually holds: the whole parameter at stages 0-2, its own slice at stage 3. The EMA
is saved as one full set of weights in diffusers format (a checkpoint part, see
trainer/core/checkpoint.py, in its own folder: `ema_unet/` for the UNet), independent of the
world size and the stage: a checkpoint's EMA loads into any layout, and sampling and export
read it like any UNet.

The decay follows EDM (Karras et al. 2022, appendix C): a half-life in samples, so the
average spans the same amount of data whatever the global batch, ramped up early in
training to at most `rampup_ratio` of the samples seen (a long average of random
initial weights would otherwise dominate the first part of training). A fixed per-step decay
is the half-life `halflife_for_decay` gives, with the ramp-up off.
"""
from __future__ import annotations

import math
import os

import torch
import torch.distributed as tdist
from safetensors.torch import load_file, save_file

from trainer.core import dist
from trainer.core.checkpoint_trust import check_safetensors
from trainer.core.errors import CheckpointError

EMA_DIR = "ema_unet"  # the UNet's EMA folder in a checkpoint (sampling and export read it)


def halflife_for_decay(decay_per_step: float, global_batch: int) -> float:
    """The half-life in samples of a fixed per-step decay d at `global_batch` samples per step:
    d ** n = 0.5 after n = ln 0.5 / ln d steps, i.e. global_batch * ln 0.5 / ln d samples. With
    the ramp-up off, `EMA.decay` gives back d (to rounding: 0.5 ** (ln d / ln 0.5))."""
    if not 0.0 < decay_per_step < 1.0:
        raise ValueError(f"a per-step EMA decay must be in (0, 1), got {decay_per_step}")
    return global_batch * math.log(0.5) / math.log(decay_per_step)


def _partitioned(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor")


def _local(p: torch.nn.Parameter) -> torch.Tensor:
    """The part of a parameter this rank owns: its ZeRO-3 slice, else the whole tensor."""
    return p.ds_tensor if _partitioned(p) else p.data


def _slice_of(full: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's ZeRO-3 slice of a full tensor: the flat tensor cut into equal parts of
    ds_tensor's length (the last one zero-padded), as DeepSpeed partitions parameters."""
    size = p.ds_tensor.numel()
    start = size * tdist.get_rank(group=p.ds_process_group)
    flat = full.reshape(-1)
    out = torch.zeros(size, dtype=full.dtype, device=full.device)
    n = max(0, min(size, flat.numel() - start))
    out[:n] = flat[start:start + n]
    return out


def _persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a state_dict holds (not averaged: they do not train), whole on every rank under ZeRO."""
    out = {}
    for prefix, mod in module.named_modules():
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf.detach().cpu().clone()
    return out


class EMA:
    def __init__(self, module: torch.nn.Module, halflife_samples: float, rampup_ratio: float = 0.05,
                 folder: str = EMA_DIR, trainable_only: bool = False):
        self.module, self.halflife_samples, self.rampup_ratio = module, halflife_samples, rampup_ratio
        self.folder = folder  # its folder in a checkpoint
        # trainable_only: average (and save) only the weights that train, e.g. LoRA adapters on a frozen base.
        self.trainable_only = trainable_only
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        # fp32 whatever the training precision: a bf16 average cannot absorb updates
        # smaller than its 8-bit mantissa resolves.
        self.shadow = [_local(p).detach().float().clone() for p in self.params]
        # Whole fp32 parameters are averaged as they are, with no per-tensor copy (or .data view) per step.
        self._plain = all(p.dtype == torch.float32 and not _partitioned(p) for p in self.params)

    def decay(self, samples_seen: int, global_batch: int) -> float:
        halflife = self.halflife_samples
        if self.rampup_ratio > 0:
            halflife = min(halflife, samples_seen * self.rampup_ratio)
        return 0.5 ** (global_batch / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, samples_seen: int, global_batch: int, applied: bool | torch.Tensor = True) -> float:
        """Fold the current weights in after an optimizer step; `applied` False (a bool tensor may stay on
        the device) leaves the average as it was. One foreach lerp over every tensor: fp32 weights are
        averaged in place as they are, others (ZeRO-3 slices, fp16 weights) through an fp32 copy."""
        beta = self.decay(samples_seen, global_batch)
        weight = 1.0 - beta
        if isinstance(applied, torch.Tensor):  # a weight per tensor: the one-tensor overload reads it on the host
            weight = [applied.to(self.shadow[0].device, torch.float32) * weight] * len(self.shadow)
        elif not applied:
            return beta
        current = self.params if self._plain else [_local(p).float() for p in self.params]
        torch._foreach_lerp_(self.shadow, current, weight)
        return beta

    @torch.no_grad()
    def full_state(self) -> dict[str, torch.Tensor]:
        """Every parameter's full EMA, on every rank (collective under ZeRO-3)."""
        out = {}
        for name, p, s in zip(self.names, self.params, self.shadow):
            if _partitioned(p):
                group = p.ds_process_group
                parts = [torch.empty_like(s) for _ in range(tdist.get_world_size(group=group))]
                tdist.all_gather(parts, s, group=group)
                s = torch.cat(parts)[:p.ds_numel].view(p.ds_shape)
            out[name] = s.cpu()
        if not self.trainable_only:  # a whole model's saved buffers too (SD3's position table): loads strictly
            out.update(_persistent_buffers(self.module))
        return out

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA weights in {source} lack {missing[0]} ({len(missing)} parameters missing)")
        for i, (name, p) in enumerate(zip(self.names, self.params)):
            full = state[name].float().to(self.shadow[i].device)
            self.shadow[i] = _slice_of(full, p) if _partitioned(p) else full.reshape(self.shadow[i].shape).clone()

    def save(self, checkpoint_path: str) -> None:
        """Collective: write the full EMA as a diffusers model folder `self.folder` (rank 0)."""
        state = self.full_state()
        if dist.world().is_main:  # the layout save_pretrained writes, without building a second model
            folder = os.path.join(checkpoint_path, self.folder)
            os.makedirs(folder, exist_ok=True)
            if hasattr(self.module, "save_config"):
                self.module.save_config(folder)
            save_file({k: v.contiguous() for k, v in state.items()},
                      os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})

    def wants(self, rel: str) -> bool:
        return rel.split("/")[0] == self.folder

    def verify(self, checkpoint_path: str) -> None:
        path = os.path.join(checkpoint_path, self.folder, "diffusion_pytorch_model.safetensors")
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint {checkpoint_path} has no EMA weights ({path} is missing); it was "
                                  "written with the EMA off (ema_halflife_samples=0 or ema_decay=0)")
        check_safetensors(path, checkpoint_path)

    def load(self, checkpoint_path: str) -> None:
        self.verify(checkpoint_path)
        path = os.path.join(checkpoint_path, self.folder, "diffusion_pytorch_model.safetensors")
        self.load_full_state(load_file(path), path)
