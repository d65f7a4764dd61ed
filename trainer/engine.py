"""The one place that builds the DeepSpeed engine and moves weights in and out of it."""
from __future__ import annotations

import contextlib
import logging

import deepspeed
import torch

# DeepSpeed logs its whole config and every save at INFO on every rank; keep warnings.
deepspeed.utils.logger.setLevel(logging.WARNING)


def resolve_precision(precision: str) -> str:
    """`auto` means bf16 where the GPU has it, fp32 otherwise (CPUs: fp32 is faster and exact)."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return precision


def deepspeed_config(*, batch_per_rank: int, grad_accum: int, world_size: int, zero_stage: int,
                     precision: str, lr: float, betas: tuple[float, float], weight_decay: float,
                     grad_clip: float) -> dict:
    return {
        "train_micro_batch_size_per_gpu": batch_per_rank,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": batch_per_rank * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        # torch's AdamW: DeepSpeed's fused Adam ops are not built for every platform (CPU).
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(betas), "eps": 1e-8,
                                                   "weight_decay": weight_decay, "torch_adam": True}},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, ds_config: dict):
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_config)
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


@contextlib.contextmanager
def full_weights(engine):
    """Inside the block `engine.module` holds every full parameter on every rank.

    Under ZeRO-3 parameters are partitioned and a plain state_dict() has empty tensors
    (DeepSpeed #2056); they are gathered here. Every rank must enter the block.
    """
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield engine.module
    else:
        yield engine.module
