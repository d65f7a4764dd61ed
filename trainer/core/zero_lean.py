"""DeepSpeed's ZeRO-1/2 optimizer without its per-tensor work in each step (issue #26).

On an SD UNet (686 parameter tensors) DeepSpeed's `DeepSpeedZeroOptimizer` dispatched about 15,000
operators per step where a plain PyTorch step dispatches about 6,000, each a kernel launch or a view
on a GPU. Three per-tensor paths are replaced; the optimizer, its flat fp32 partitions, its
checkpoint files and elastic resume stay DeepSpeed's:

- `get_grad_norm_direct` takes the norm of each gradient tensor in turn, after an fp64 copy of
  it (about 2,700 operators). Here: one foreach norm over the group's gradients (fp64
  accumulation, as DeepSpeed's `get_norm_dtype`), then the same all-reduce and the same
  inf/NaN -> -1 mask as DeepSpeed's.
- `_update_model_bit16_weights` points every parameter at its slice of the flat weight buffer
  again after every step (about 2,700 operators; "TODO: we probably don't need this? just to be
  safe" in DeepSpeed's source): the parameters already are those slices unless something
  replaced the buffer (a checkpoint load does, through the same method). Here it re-points only
  the groups whose parameters no longer sit where the flat buffer puts them, checked by address
  on the host, which dispatches nothing.

- Gradients reach the partitions bucket by bucket (trainer/core/zero_flat.py) instead of one copy
  into a bucket and one copy out of it per gradient tensor (about 8,900 operators).

Each is installed only on the optimizer class and attributes it was written against, and only
where its assumptions hold (L2 norm, no model or pipeline parallelism, no MoE); anywhere else
DeepSpeed's own methods stay. tests/test_zero_lean.py checks that each gives DeepSpeed's results.
"""
from __future__ import annotations

import types

import torch

from trainer.core import zero_flat

_NORM_ATTRS = ("get_grad_norm_direct", "dp_process_group", "model_parallel_group", "device")
_WEIGHT_ATTRS = ("_update_model_bit16_weights", "bit16_groups_flat", "round_robin_bit16_groups",
                 "round_robin_bit16_offsets", "round_robin_bit16_indices", "bit16_groups")


def install(engine) -> list[str]:
    """Replace what applies on `engine.optimizer` (a DeepSpeedZeroOptimizer); the names replaced."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if type(opt) is not DeepSpeedZeroOptimizer or getattr(opt, "has_moe_layers", False):
        return []
    done = []
    serial_model = getattr(opt, "model_parallel_group", "?") is None  # no mpu: data parallelism alone
    replicated = any(getattr(p, "ds_pipe_replicated", False) for g in opt.bit16_groups for p in g)
    if all(hasattr(opt, a) for a in _NORM_ATTRS) and serial_model and not replicated and not opt.cpu_offload:
        opt._deepspeed_grad_norm_direct = opt.get_grad_norm_direct
        opt.get_grad_norm_direct = types.MethodType(_grad_norm_direct, opt)
        done.append("get_grad_norm_direct")
    if all(hasattr(opt, a) for a in _WEIGHT_ATTRS):
        opt._deepspeed_update_model_bit16_weights = opt._update_model_bit16_weights
        opt._update_model_bit16_weights = types.MethodType(_update_model_bit16_weights, opt)
        done.append("_update_model_bit16_weights")
    if "get_grad_norm_direct" in done and zero_flat.install(opt):  # its norm takes one flat gradient
        done.append("flat gradients")
    return done


def _grad_norm_direct(self, gradients, params, norm_type=2):
    """DeepSpeed's get_grad_norm_direct for the L2 norm without model parallelism, foreach."""
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace
    from deepspeed.runtime.zero.utils import get_norm_dtype
    import deepspeed.comm as ds_dist

    if float(norm_type) != 2.0:
        return self._deepspeed_grad_norm_direct(gradients, params, norm_type)
    grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
    if grads:
        norms = torch._foreach_norm(grads, 2.0, dtype=get_norm_dtype())
        total = torch.stack(norms).pow(2).sum().float().to(self.device)
    else:
        total = torch.tensor(0.0, dtype=torch.float32, device=self.device)
    ds_dist.all_reduce(total, op=ds_dist.ReduceOp.SUM, group=self.dp_process_group)
    total = total.pow(0.5)
    mask_nan_or_inf_with_val_inplace(total, device=self.device)
    return total


def _aliased(self, i: int) -> bool:
    """Every parameter of group i is the view of the flat buffer that DeepSpeed's method would make."""
    flat = self.bit16_groups_flat[i]
    base, size = flat.data_ptr(), flat.element_size()
    reordered = self.round_robin_bit16_groups[i]
    if any(p.data_ptr() != base + off * size for p, off in zip(reordered, self.round_robin_bit16_offsets[i])):
        return False
    return all(p.data_ptr() == reordered[j].data_ptr() and p.shape == reordered[j].shape
               for p, j in zip(self.bit16_groups[i], self.round_robin_bit16_indices[i]))


def _update_model_bit16_weights(self, group_index):
    if not _aliased(self, group_index):
        self._deepspeed_update_model_bit16_weights(group_index)
