"""The training step of diffusers' examples/text_to_image/train_text_to_image.py, as users run it today,
for the peer ratio of issue #26 (benchmarks/gpu.py): the same UNet, batch and schedule as the
framework's step.

What the script does each step, kept here: accelerate's Accelerator with mixed_precision bf16
(autocast around the prepared UNet, fp32 weights), latents sampled from the posterior and scaled,
epsilon noise, a uniform timestep, `noise_scheduler.add_noise`, the UNet, `F.mse_loss` in fp32,
`accelerator.gather(loss.repeat(batch)).mean().item()` for its progress bar, `accelerator.backward`,
`accelerator.clip_grad_norm_`, torch's AdamW as the script builds it (torch's default
implementation), `zero_grad`, and diffusers' EMAModel. What is left out, and only makes the script
slower than this: its VAE encode and text-encoder forward of every batch (it has no latent cache),
its DataLoader and its lr scheduler. So the ratio of the framework's images/s to this step's is a
lower bound of its ratio to the real script.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class DiffusersScriptStep:
    def __init__(self, unet: torch.nn.Module, schedule, device: torch.device, *, bf16: bool, lr: float = 1e-5,
                 grad_clip: float = 1.0, scaling_factor: float = 0.18215):
        from accelerate import Accelerator
        from diffusers.training_utils import EMAModel

        self.accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=device.type == "cpu")
        optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.unet, self.optimizer = self.accelerator.prepare(unet, optimizer)
        self.ema = EMAModel(self.accelerator.unwrap_model(self.unet).parameters())
        self.ema.to(self.accelerator.device)
        self.schedule, self.grad_clip, self.scaling_factor = schedule, grad_clip, scaling_factor
        self.train_loss = 0.0

    def step(self, batch: dict) -> float:
        device = self.accelerator.device
        mean, std = batch["mean"].to(device).float(), batch["std"].to(device).float()
        latents = (mean + std * torch.randn_like(mean)) * self.scaling_factor  # latent_dist.sample() * factor
        context = batch["text_emb"].to(device).float()
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, self.schedule.config.num_train_timesteps, (bsz,), device=device).long()
        noisy = self.schedule.add_noise(latents, noise, timesteps)
        pred = self.unet(noisy, timesteps, context, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        avg_loss = self.accelerator.gather(loss.repeat(bsz)).mean()
        self.train_loss += avg_loss.item()
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(self.unet.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.ema.step(self.unet.parameters())
        return float(loss)
