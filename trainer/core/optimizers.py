"""The optimizers a job trains with (#29), each handed to DeepSpeed as its client optimizer.

- adamw: torch's AdamW (Loshchilov & Hutter 2019), one fused kernel for all tensors.
- adamw8bit: bitsandbytes' AdamW whose two moments are stored in 8 bits, quantised block-wise (Dettmers et
  al. 2022, "8-bit Optimizers via Block-wise Quantization"): 2 bytes of optimizer state per weight instead of
  8. bitsandbytes runs it on CPUs too (0.45 and newer), so it is tested here.
- prodigy: prodigyopt's Prodigy (Mishchenko & Defazio 2023) estimates its own step size d; `lr` multiplies
  that estimate (1.0, as its authors advise), and the job's warm-up and schedule still scale it. Bias
  correction is on (its README's advice for diffusion models) and so is the safeguard during warm-up.
- adafactor: transformers' Adafactor (Shazeer & Stern 2018) keeps each weight matrix's second moment as a
  row and a column vector and no first moment; with an external learning rate (its own relative step and
  parameter scaling off), the way LoRA users run it in kohya's and diffusers' scripts.

ZeRO-1/2/3 do not hand the optimizer the weights but each rank's flat 1-D slice of all of them. AdamW's and
8-bit AdamW's updates are element-wise, so a slice is as good as the weights. Two are not:
- Adafactor factors a matrix's second moment by its rows and columns, which a flat slice no longer has: it
  runs at zero_stage=0 only.
- Prodigy's estimate of d sums over every weight; over slices each rank would estimate its own d. Its
  `fsdp_in_use` adds the ranks' sums together, through a CUDA tensor: ZeRO-1/2/3 on GPUs, ZeRO-0 on CPUs
  (where every rank holds every weight and gradient, so every rank finds the same d).
"""
from __future__ import annotations

import contextlib
import io

import torch

from trainer.core.errors import ConfigError

NAMES = ("adamw", "adamw8bit", "prodigy", "adafactor")
DEEPSPEED_TESTED = ("adamw",)  # DeepSpeed's ZeRO optimizers list AdamW as tested; the others need its allow flag


def check(name: str, *, zero_stage: int, lr: float, elastic_resume: bool) -> None:
    """Refuse, in one line, what cannot work whatever the machine (run by the job's validate and --dry-run)."""
    if name not in NAMES:
        raise ConfigError(f"optimizer must be one of {', '.join(NAMES)}, got {name!r}")
    if name == "adafactor" and zero_stage > 0:
        raise ConfigError(f"optimizer=adafactor runs at zero_stage=0 (got {zero_stage}): it factors each weight "
                          "matrix's second moment by rows and columns, and ZeRO hands the optimizer flat 1-D slices "
                          "of the weights; use adamw8bit for small optimizer state under ZeRO")
    if name == "prodigy" and lr < 0.1:
        raise ConfigError(f"optimizer=prodigy estimates its own step size and lr multiplies it: use lr=1.0 (its "
                          f"authors' advice; 0.5-1 is usual), got lr={lr:g}, which would barely train")
    if name != "adamw" and elastic_resume and zero_stage > 0:
        raise ConfigError(f"elastic_resume at zero_stage={zero_stage} reshards Adam's moments (exp_avg, exp_avg_sq) "
                          f"through DeepSpeed's universal checkpoint; optimizer={name} keeps other state: use "
                          "zero_stage=0, whose checkpoints load at any world size, or optimizer=adamw")
    if name == "adamw8bit":
        _bitsandbytes()


def _bitsandbytes():
    try:
        import bitsandbytes
    except Exception as e:  # ImportError, or a build for another CUDA that fails as it loads
        raise ConfigError(f"optimizer=adamw8bit needs bitsandbytes, which did not import "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    return bitsandbytes


def build(name: str, params: list, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
          zero_stage: int, world_size: int, warmup: bool) -> torch.optim.Optimizer:
    """The optimizer `name` over `params` (the trainable weights, or at ZeRO-1/2/3 DeepSpeed's slices of them
    once it wraps it). `warmup`: the job warms the learning rate up (Prodigy then keeps its safeguard)."""
    if name == "adamw":
        kwargs = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        try:  # one kernel for all tensors (CPU and CUDA); foreach where this torch has no fused kernel
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(params, foreach=True, **kwargs)
    if name == "adamw8bit":
        return _bitsandbytes().optim.AdamW8bit(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if name == "prodigy":
        from prodigyopt import Prodigy

        summed = zero_stage > 0 and world_size > 1  # each rank holds a slice: d's sums are added across ranks
        if summed and not torch.cuda.is_available():
            raise ConfigError(f"optimizer=prodigy at zero_stage={zero_stage} on {world_size} CPU ranks: prodigyopt adds "
                              "the ranks' step-size sums through a CUDA tensor; use zero_stage=0 on CPUs")
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay" on every rank
            return Prodigy(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, decouple=True,
                           use_bias_correction=True, safeguard_warmup=warmup, fsdp_in_use=summed)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                         warmup_init=False, beta1=None)
    raise ConfigError(f"optimizer must be one of {', '.join(NAMES)}, got {name!r}")
