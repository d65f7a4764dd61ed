"""The one place that builds the DeepSpeed engine and moves weights in and out of it."""
from __future__ import annotations

import contextlib
import logging

import torch


def _deepspeed():
    """DeepSpeed, imported on first use: importing it prints its accelerator choice to stdout,
    and the config classes that import this module are also read by launch/submit.py, whose
    stdout is the batch script (`submit.py --dry-run > job.sbatch`)."""
    import deepspeed

    # DeepSpeed logs its whole config and every save at INFO on every rank; keep warnings.
    deepspeed.utils.logger.setLevel(logging.WARNING)
    if not torch.cuda.is_available():
        # On CPU its communication backend compiles a shared-memory C++ op on first use (28 s
        # with gcc here; a machine without a compiler fails) and loads it in every rank, for
        # inference_all_reduce only, which training never calls: marked incompatible, it is
        # skipped and collectives stay with torch.distributed (gloo).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def resolve_precision(precision: str) -> str:
    """`auto` means bf16 where the GPU has it, fp32 otherwise (CPUs: fp32 is faster and exact)."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return precision


def deepspeed_config(*, batch_per_rank: int, grad_accum: int, world_size: int, zero_stage: int,
                     precision: str, lr: float, betas: tuple[float, float], weight_decay: float,
                     grad_clip: float, offload_optimizer: bool = False, load_universal: bool = False) -> dict:
    zero = {"stage": zero_stage}
    adam = {"lr": lr, "betas": list(betas), "eps": 1e-8, "weight_decay": weight_decay}
    on_gpu = torch.cuda.is_available()
    if offload_optimizer:
        # ZeRO-Offload (Ren et al. 2021): fp32 master weights and Adam moments live in host
        # memory and the update runs on the CPU. On GPUs DeepSpeed's vectorised CPU Adam does
        # the update (built on first use); without one, torch's AdamW.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    # torch's AdamW where DeepSpeed's fused ops are not built (CPU), or offloaded without a GPU.
    adam["torch_adam"] = not (on_gpu and offload_optimizer)
    return {
        "train_micro_batch_size_per_gpu": batch_per_rank,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": batch_per_rank * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": on_gpu,
        # A non-finite gradient skips the step (optimizer state untouched) instead of
        # writing NaN into the weights; fp16 also adjusts its loss scale.
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
        "optimizer": {"type": "AdamW", "params": adam},
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, ds_config: dict):
    engine, *_ = _deepspeed().initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_config)
    _keep_grad_norm(engine)
    return engine


def _keep_grad_norm(engine) -> None:
    """ZeRO-0 in fp32 with torch's optimizer: DeepSpeed clips the gradients but drops their
    norm, so get_global_grad_norm() stays None; clip the same way here and keep it. (With
    gradient_clipping 0 DeepSpeed computes no norm at all there, and none is logged.)"""
    if engine.zero_optimization_stage() != 0 or engine.fp16_enabled() or engine.bfloat16_enabled():
        return

    def clip_and_keep() -> None:
        norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(), engine.gradient_clipping())
        engine._global_grad_norm = float(norm)

    engine.clip_fp32_gradients = clip_and_keep


def global_grad_norm(engine) -> float | None:
    """The gradient norm of the last optimizer step (before clipping), or None where
    DeepSpeed computes none."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def skipped_steps(engine) -> int:
    """Optimizer steps DeepSpeed discarded for non-finite gradients (and fp16 loss-scale overflow)."""
    return int(getattr(engine, "skipped_steps", 0))


def drop_nonfinite_grads(engine) -> bool:
    """Before the last engine.step() of an optimizer step: where DeepSpeed itself does not
    check gradients (ZeRO-0 with a plain torch optimizer), make that step a no-op when any
    gradient is not finite, so weights and optimizer state stay as they were. Returns True
    when it did. Gradients are averaged across ranks by now, so every rank decides alike.

    The gradients are zeroed (DeepSpeed's clipping still runs on them) and the optimizer's
    next step() alone is replaced by one that does nothing: Adam with zero gradients would
    still decay its moments and count a step.
    """
    if engine.zero_optimization_stage() != 0 or not type(engine.optimizer).__module__.startswith("torch.optim"):
        return False
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
        return False
    for g in grads:
        g.zero_()
    optimizer = engine.optimizer

    def skip(*args, **kwargs):
        del optimizer.step  # the class's step() again from the next step on

    optimizer.step = skip
    return True


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
        with _deepspeed().zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield engine.module
    else:
        yield engine.module
