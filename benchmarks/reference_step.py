"""The plain PyTorch training step that issue #26 measures the framework's step against.

The same UNet, objective and batch as trainer/unet/step.py (the same `micro_inputs` and
`training_loss`, the same seeds), written as a single-device PyTorch user would write it when
the step must be fast: autocast (bf16) around the UNet over fp32 weights, one fused AdamW kernel,
foreach gradient clipping, one foreach lerp for the EMA, the loss left on the device. No
DeepSpeed, no per-parameter Python, no host reads. benchmarks/step_overhead.py steps it beside
the framework's real step and compares what each dispatches and how long each takes.
"""
from __future__ import annotations

import torch

from models.diffusion import training_loss
from trainer.unet.step import StepSetup, micro_inputs, micro_seed


class _Autocast(torch.nn.Module):
    """The UNet called under autocast, as DeepSpeed's torch_autocast runs the engine's forward:
    only the model, not the loss around it."""

    def __init__(self, unet: torch.nn.Module, enabled: bool):
        super().__init__()
        self.unet, self.enabled = unet, enabled

    def forward(self, *args, **kwargs):
        with torch.autocast(next(self.unet.parameters()).device.type, torch.bfloat16, enabled=self.enabled):
            return self.unet(*args, **kwargs)


class ReferenceStep:
    """`step(batch, step)` trains `unet` one optimizer step on one micro batch (grad_accum 1)."""

    def __init__(self, unet: torch.nn.Module, setup: StepSetup, *, lr: float, betas: tuple[float, float],
                 weight_decay: float, grad_clip: float, ema_decay: float, bf16: bool):
        if setup.grad_accum != 1:
            raise ValueError("the reference step takes one micro batch per optimizer step")
        self.setup, self.grad_clip, self.ema_decay = setup, grad_clip, ema_decay
        self.model = _Autocast(unet.to(setup.device), bf16)
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
        self.shadow = [p.detach().clone() for p in self.params]

    def step(self, batch: dict, step: int) -> torch.Tensor:
        s = self.setup
        gen = torch.Generator(s.device).manual_seed(micro_seed(s.seed, s.rank, step))
        z0, context, added, mask = micro_inputs(batch, gen, s)
        loss = training_loss(self.model, z0, context, s.schedule, gen, min_snr_gamma=s.min_snr_gamma,
                             offset_noise=s.offset_noise, added_cond=added, sample_weight=batch.get("loss_weight"),
                             loss_mask=mask)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, self.params, 1.0 - self.ema_decay)
        return loss.detach()
