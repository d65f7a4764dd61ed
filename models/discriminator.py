"""A PatchGAN discriminator (Isola et al. 2017, pix2pix), as used on autoencoders by taming
transformers (Esser et al. 2021) and latent diffusion (Rombach et al. 2022).

It scores overlapping patches rather than the whole image: each output logit sees one
receptive field (70x70 pixels at three layers), so it judges texture and local realism, which
is exactly what a pixel loss averages away, and leaves global structure to the
reconstruction terms. It is trained beside the autoencoder and is never part of its export.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

NORMS = ("batch", "group", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":  # pix2pix and taming use BatchNorm
        return nn.BatchNorm2d(channels)
    if kind == "group":  # per-sample statistics: independent of batch size and composition
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """`layers` stride-2 convolutions (4x4) with norm + LeakyReLU(0.2), one stride-1 block,
    and a stride-1 convolution to one logit per patch: (B, C, H, W) -> (B, 1, H', W')."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"discriminator norm must be one of {', '.join(NORMS)}, got {norm!r}")
        bias = norm == "none"  # a bias before a normalisation is cancelled by it
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1  # the last block keeps the resolution
            blocks += [nn.Conv2d(width, out, 4, stride, 1, bias=bias), _norm(norm, out), nn.LeakyReLU(0.2, True)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def patch_grid(resolution: int, layers: int) -> int:
    """Side of the logit grid for a square input; < 1 means the input is too small."""
    size = resolution
    for _ in range(layers):  # 4x4, stride 2, padding 1
        size = (size + 2 - 4) // 2 + 1
    return size - 2  # two 4x4 stride-1 convolutions, padding 1


def build_discriminator(channels: int = 64, layers: int = 3, norm: str = "batch", in_channels: int = 3,
                        seed: int = 0) -> PatchDiscriminator:
    """A PatchDiscriminator initialised as in pix2pix/taming (weights N(0, 0.02), norm scales
    N(1, 0.02)), deterministic by seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PatchDiscriminator(in_channels, channels, layers, norm)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)
    return model


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Use the discriminator as a fixed function (the generator's step): no gradients for its
    parameters, and BatchNorm normalises with the batch's statistics (as in training) without
    updating its running averages, which belong to the discriminator's own step."""
    flags = [p.requires_grad for p in model.parameters()]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracking = [m.track_running_stats for m in norms]
    model.requires_grad_(False)
    for m in norms:
        m.track_running_stats = False  # in train mode: batch statistics, running buffers untouched
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        for m, flag in zip(norms, tracking):
            m.track_running_stats = flag
