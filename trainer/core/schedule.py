"""The learning-rate schedule of both trainers: linear warm-up, then cosine, linear or constant.

`lr_at` is unit-free: `t`, `warmup` and `total` are in the same unit, and each job keeps the
one it had, so that its learning rates are exactly what they were. The UNet job counts optimizer
steps of its plan (warm-up and length rounded up to whole steps of the global batch; at another
world size, an elastic resume, the step is the one at the same sample count). The autoencoder
counts samples seen (`warmup_samples`, `total_samples` as configured), with a cosine decay to
10% of the peak.
"""
from __future__ import annotations

import math

SHAPES = ("cosine", "linear", "constant")


def lr_at(t: float, peak: float, warmup: float, total: float, shape: str = "cosine",
          final_ratio: float = 0.1) -> float:
    """The learning rate at `t`: `peak * (t + 1) / warmup` during the warm-up (never 0 at the
    first step), then from `peak` down to `peak * final_ratio` at `total` along `shape`
    (constant: `peak` throughout)."""
    if t < warmup:
        return peak * (t + 1) / warmup
    if shape == "constant":
        return peak
    if shape not in SHAPES:
        raise ValueError(f"learning-rate schedule must be one of {', '.join(SHAPES)}, got {shape!r}")
    progress = min(1.0, (t - warmup) / max(1, total - warmup))
    fraction = 1 - progress if shape == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (final_ratio + (1 - final_ratio) * fraction)
