"""The one place that builds the DeepSpeed engine and moves weights in and out of it."""
from __future__ import annotations

import contextlib
import logging
import os

import torch

from trainer.core import optimizers, zero_lean


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
                     grad_clip: float, offload_optimizer: bool = False, load_universal: bool = False,
                     optimizer: str = "adamw", warmup: bool = True) -> dict:
    """`optimizer`: one of trainer/core/optimizers.py's (`warmup`: the job warms the learning rate up)."""
    zero = {"stage": zero_stage}
    adam = {"lr": lr, "betas": list(betas), "eps": 1e-8, "weight_decay": weight_decay}
    on_gpu = torch.cuda.is_available()
    ours = optimizer not in optimizers.DEEPSPEED_TESTED
    if offload_optimizer:
        # ZeRO-Offload (Ren et al. 2021): fp32 master weights and Adam moments live in host
        # memory and the update runs on the CPU. On GPUs DeepSpeed's vectorised CPU Adam does
        # the update (built on first use); without one, torch's AdamW.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    # torch's AdamW (build_engine makes it the fused one) unless DeepSpeed's CPU Adam does an offloaded update.
    adam["torch_adam"] = not (on_gpu and offload_optimizer) or ours
    return {
        "train_micro_batch_size_per_gpu": batch_per_rank,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": batch_per_rank * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": on_gpu and not ours,
        # DeepSpeed's ZeRO refuses a client optimizer it has not tested unless told: ours are checked in
        # tests/test_optimizers.py (and the ones that cannot work on flat slices refused, optimizers.check).
        "zero_allow_untested_optimizer": ours,
        # bf16 is torch autocast over fp32 weights (mixed precision as torch AMP does it): matmuls and
        # convolutions in bf16, weights, gradients and optimizer in fp32; ZeRO-1/2 gradients are
        # all-reduced in bf16 (DeepSpeed's comm_dtype; zero_flat.py). DeepSpeed's own bf16 mode
        # (bf16 weights, fp32 master copy) checked every gradient tensor for overflow each step (about
        # 8,900 kernel launches and a host sync on an SD UNet, issue #26) where bf16 needs no loss scale,
        # and at ZeRO-0 stepped an unfused, per-tensor optimizer.
        "bf16": {"enabled": False},
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16"},
        # fp16 keeps DeepSpeed's fp16 weights with dynamic loss scaling (a non-finite step is skipped
        # and the scale lowered).
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
        "optimizer": {"type": "AdamW", "params": adam, "client": optimizer, "warmup": warmup},
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # The throughput timer synchronises the device at every step's start and end (its default).
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }


def build_engine(model: torch.nn.Module, ds_config: dict):
    params = [p for p in model.parameters() if p.requires_grad]
    config, optimizer = dict(ds_config), None
    spec = dict(config["optimizer"])
    name, warmup = spec.pop("client", "adamw"), spec.pop("warmup", True)
    config["optimizer"] = spec
    if spec["params"].get("torch_adam"):  # ours, handed to DeepSpeed as the client optimizer
        hyper = config.pop("optimizer")["params"]
        optimizer = optimizers.build(name, params, lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"],
                                     weight_decay=hyper["weight_decay"], zero_stage=config["zero_optimization"]["stage"],
                                     world_size=config["train_batch_size"] // (config["train_micro_batch_size_per_gpu"]
                                                                               * config["gradient_accumulation_steps"]),
                                     warmup=warmup)
    engine, *_ = _deepspeed().initialize(model=model, model_parameters=params, optimizer=optimizer, config=config)
    if engine.zero_optimization_stage() == 0 and not engine.fp16_enabled():
        _lean_zero0(engine, params)
    else:
        zero_lean.install(engine)
    _either_zero_file_prefix(engine)
    return engine


def _either_zero_file_prefix(engine) -> None:
    """ZeRO checkpoints written in DeepSpeed's bf16 mode (bf16 before #26) name their optimizer files
    `bf16_zero_pp_rank_*`. DeepSpeed means to fall back to the other prefix when its own is missing,
    but its lookup returns the names whether or not they exist; here a list none of whose files
    exist counts as not found, so the fallback happens and such a run resumes."""
    lookup = getattr(engine, "_get_all_zero_checkpoint_names", None)
    if lookup is None:
        return

    def either(load_dir, tag, bf16_mode):
        names = lookup(load_dir, tag, bf16_mode)
        return names if names is None or any(os.path.exists(n) for n in names) else None

    engine._get_all_zero_checkpoint_names = either


def _lean_zero0(engine, params: list) -> None:
    """ZeRO-0 without per-tensor host work (issue #26): DeepSpeed steps the torch optimizer itself
    there, so the gradient norm, clipping and the non-finite guard are done here, all on the device.

    - norm and clipping with foreach ops (a few launches, no host read; DeepSpeed's clipping is one
      norm and one multiply per tensor), the norm kept for logging;
    - a non-finite norm makes the fused AdamW skip the update inside its kernel (`found_inf`, as
      torch's GradScaler drives it): weights, moments and step counts stay as they were, and the
      step's `applied` flag stays on the device. Without a fused kernel the decision is read on the host;
    - one rank: no gradient all-reduce (DeepSpeed flattens and copies every gradient for it).
    """
    optimizer, max_norm = engine.optimizer, engine.gradient_clipping()
    engine.clip_fp32_gradients = lambda: None  # clipped in guarded_step, before the update
    if engine.dp_world_size == 1:
        engine.enable_backward_allreduce = False
    else:
        _lean_allreduce(engine)
    plain_step, plain_load = optimizer.step, optimizer.load_state_dict

    def guarded_step(*args, **kwargs):
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            engine._step_finite = torch.ones((), dtype=torch.bool, device=params[0].device)
            return plain_step(*args, **kwargs)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if max_norm > 0:
            torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        engine._global_grad_norm, engine._step_finite = norm, torch.isfinite(norm)
        if optimizer.param_groups[0].get("fused"):
            optimizer.found_inf = (~engine._step_finite).float()
        else:  # foreach AdamW takes no found_inf (and asserts there is none): skip on the host
            optimizer.found_inf = None
            if not bool(engine._step_finite):
                return None
        return plain_step(*args, **kwargs)

    def load_state_dict(state: dict) -> None:
        """Also an optimizer state written before #26: at ZeRO-0 with bf16, DeepSpeed's fp16 optimizer
        wrapped it, beside its fp32 master weights, which the module (loaded from its bf16 copy just
        before) takes back, so that a resumed run continues from the exact weights."""
        if "optimizer_state_dict" in state and "fp32_groups" in state:
            with torch.no_grad():
                for group, saved in zip(optimizer.param_groups, state["fp32_groups"]):
                    for p, w in zip(group["params"], saved, strict=True):
                        p.copy_(w)
            state = state["optimizer_state_dict"]
        fused = [g.get("fused") for g in optimizer.param_groups]
        plain_load(state)
        if isinstance(optimizer, torch.optim.AdamW):  # torch takes the saved group's flags: keep ours
            for group, was in zip(optimizer.param_groups, fused):
                group["fused"], group["foreach"] = was, None if was else group.get("foreach")

    optimizer.step, optimizer.load_state_dict = guarded_step, load_state_dict


def _lean_allreduce(engine) -> None:
    """ZeRO-0 on several ranks: each bucket of gradients all-reduced through one flat copy made by one
    `torch._chunk_cat` (as FSDP2 copies gradients in) and copied back with one foreach copy, instead of
    DeepSpeed's flatten, unflatten and a copy per tensor (a kernel each on a GPU). Only where DeepSpeed
    would plainly average in the gradients' own dtype; elsewhere its own method stays."""
    import deepspeed.comm as ds_dist

    if not hasattr(torch, "_chunk_cat") or engine.gradient_predivide_factor() != 1.0 or not engine.gradient_average:
        return
    postscale = engine.postscale_gradients()  # DeepSpeed's default: sum, then divide
    plain = engine.allreduce_and_copy

    def allreduce_and_copy(small_bucket, dp_group, dp_world_size=None):
        if len({t.dtype for t in small_bucket}) != 1 or engine.communication_data_type != small_bucket[0].dtype:
            return plain(small_bucket, dp_group, dp_world_size)
        flat = torch._chunk_cat(small_bucket, 0, 1).view(-1)
        scale = 1.0 / (dp_world_size or ds_dist.get_world_size(group=dp_group))
        if not postscale:
            flat.mul_(scale)
        ds_dist.all_reduce(flat, group=dp_group)
        if postscale:
            flat.mul_(scale)
        parts = torch.split_with_sizes(flat, [t.numel() for t in small_bucket])
        torch._foreach_copy_(small_bucket, [p.view(t.shape) for p, t in zip(parts, small_bucket)])

    allreduce_and_copy.flat = True  # for tests: the framework's, not DeepSpeed's
    engine.allreduce_and_copy = allreduce_and_copy


def global_grad_norm(engine) -> float | None:
    """The gradient norm of the last optimizer step (before clipping), or None where
    DeepSpeed computes none. A host read: call it when logging."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def skipped_steps(engine) -> int:
    """Optimizer steps DeepSpeed discarded for non-finite gradients (and fp16 loss-scale overflow)."""
    return int(getattr(engine, "skipped_steps", 0))


def step_applied(engine, skipped_before: int) -> torch.Tensor:
    """Whether the optimizer step just taken changed the weights, as a bool tensor. At ZeRO-0 it
    stays on the device (the fused update skipped itself on a non-finite gradient norm); the ZeRO
    optimizers have already decided on the host and counted a skip in `skipped_steps`."""
    finite = getattr(engine, "_step_finite", None)
    if finite is not None:
        return finite
    return torch.tensor(skipped_steps(engine) == skipped_before)


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
