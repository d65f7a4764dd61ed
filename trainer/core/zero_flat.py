"""ZeRO-1/2 gradients reach DeepSpeed's flat partitions a bucket at a time, not a tensor at a time (issue #26).

DeepSpeed's DeepSpeedZeroOptimizer moves each gradient tensor on its own: a hook per parameter copies
it into a reduction bucket; after the bucket's all-reduce, a second copy per tensor moves this rank's
share into the partition buffer; the step then flattens those again. That is about 13 operators per
tensor, 8,900 on an SD UNet, and each is a kernel launch on a GPU. Here the parameters' order in
DeepSpeed's flat weight buffer is cut once, at start-up, into buckets of at most `reduce_bucket_size`
elements. A bucket is reduced once all its gradients are there:

1. One `torch._chunk_cat` copies the bucket's gradients into one flat tensor, laid out as the flat
   weight buffer is (zeros fill the alignment padding). The gradients are then freed.
2. On several ranks the bucket is divided by the world size and all-reduced in its communication
   dtype. DeepSpeed's reduce-scatter path does the same: divide, then all-reduce the bucket.
3. The part that falls in this rank's partition is copied, or added, into one flat fp32 gradient of
   the partition. DeepSpeed's step takes that as its `flat_partition`, its own path for a
   pre-flattened gradient, and zero_lean's foreach norm reads it as one tensor.

At ZeRO-2 a post-accumulate-grad hook on each parameter counts its bucket's gradients during
backward. The hook is Python only and dispatches no operator. So buckets are reduced and freed while
backward runs, as in DeepSpeed: backward goes roughly in reverse parameter order, so the buckets at
the end of the layout fill first. The epilogue finishes two cases:
- Buckets still incomplete when backward ends, because a parameter was unused. Its gradient counts
  as zeros, as in DeepSpeed's `set_none_gradients_to_zero`.
- A gradient accumulated after its bucket had gone. That bucket is reduced again, which is correct
  because the reduction is linear.

At ZeRO-1 the gradients stay on the parameters through accumulation, and every bucket is reduced at
the boundary, as DeepSpeed's `reduce_gradients` does.

Each bucket has one communication dtype. DeepSpeed under torch autocast sends each gradient in its
parameter's communication dtype: bf16 for the layers autocast lowers, fp32 for the rest. A bucket
here goes in the dtype of most of its elements, as one FSDP `reduce_dtype` covers every parameter.
On one rank nothing is communicated, so the gradients stay fp32.
"""
from __future__ import annotations

import collections
import types

import torch

_NEEDS = ("bit16_groups_flat", "round_robin_bit16_groups", "round_robin_bit16_offsets", "round_robin_bit16_padding",
          "partition_size", "averaged_gradients", "dp_process_group", "_grad_acc_hooks", "partition_gradients",
          "reduce_scatter", "gradient_average", "reduce_bucket_size", "_get_preflattened_grad_partition",
          "independent_gradient_partition_epilogue", "reduce_gradients", "get_param_comm_dtype", "cpu_offload")


class _Bucket:
    """A run of consecutive parameters of one group's flat layout, with the padding after each."""

    def __init__(self, group: int, start: int):
        self.group, self.start, self.numel = group, start, 0
        self.params: list[torch.nn.Parameter] = []
        self.fills: list[torch.Tensor | None] = []  # the zeros after each parameter (alignment padding)
        self.comm_dtype = torch.float32
        self.ready = 0  # gradients accumulated in this backward (ZeRO-2 hooks)
        self.reduced = False  # reduced in this backward
        self.written = False  # its share of the partition gradient holds a value in this accumulation


def _applies(opt) -> bool:
    from deepspeed.runtime.zero import stage_1_and_2

    if not (hasattr(torch, "_chunk_cat") and hasattr(torch.Tensor, "register_post_accumulate_grad_hook")
            and hasattr(stage_1_and_2, "GradPartitionBufferGroup") and all(hasattr(opt, a) for a in _NEEDS)):
        return False
    muon = getattr(opt, "_is_muon_group", lambda g: False)
    return (getattr(opt, "dtype", None) == torch.float32 and not opt.cpu_offload and opt.reduce_scatter
            and not getattr(opt, "has_moe_layers", False) and not getattr(opt, "zenflow", False)
            and not getattr(opt, "use_grad_accum_attribute", False) and not getattr(opt, "overlap_comm", False)
            and getattr(opt, "sequence_parallel_size", 1) == 1
            and all(p.dtype == torch.float32 for g in opt.bit16_groups for p in g)
            and not any(muon(g) for g in opt.bit16_groups if g))


def _buckets(opt, world: int) -> list[_Bucket] | None:
    """The buckets of every group, or None where the flat buffers are not laid out as expected."""
    out = []
    for i, flat in enumerate(opt.bit16_groups_flat):
        params, offsets, pads = (opt.round_robin_bit16_groups[i], opt.round_robin_bit16_offsets[i],
                                 opt.round_robin_bit16_padding[i])
        if int(opt.partition_size[i]) * world != flat.numel() or len({len(params), len(offsets), len(pads)}) != 1:
            return None
        end = 0
        for p, offset, pad in zip(params, offsets, pads):
            if offset != end:
                return None
            end += p.numel() + pad
        if end > flat.numel():
            return None
        zeros = torch.zeros(max([*pads, 0]) + flat.numel() - end, dtype=flat.dtype, device=flat.device)
        bucket = None
        for k, (p, pad) in enumerate(zip(params, pads)):
            if bucket is None or (bucket.numel and bucket.numel + p.numel() + pad > opt.reduce_bucket_size):
                bucket = _Bucket(i, offsets[k])
                out.append(bucket)
            bucket.params.append(p)
            bucket.fills.append(zeros[:pad] if pad else None)
            bucket.numel += p.numel() + pad
        if bucket is None:  # an empty group: its padding alone
            continue
        tail = flat.numel() - end
        if tail:
            bucket.fills[-1] = zeros[:tail] if bucket.fills[-1] is None else \
                zeros[:bucket.fills[-1].numel() + tail]
            bucket.numel += tail
    for b in out:  # one communication dtype per bucket: that of most of its elements
        counts = collections.Counter()
        for p in b.params:
            counts[opt.get_param_comm_dtype(p)] += p.numel()
        b.comm_dtype = counts.most_common(1)[0][0] if counts else torch.float32
    return out


def install(opt) -> bool:
    """Route opt's gradients through flat buckets; False (DeepSpeed's own path kept) where it does not apply."""
    import deepspeed.comm as ds_dist

    if not _applies(opt):
        return False
    world, rank = ds_dist.get_world_size(group=opt.dp_process_group), ds_dist.get_rank(group=opt.dp_process_group)
    buckets = _buckets(opt, world)
    if buckets is None:
        return False
    for handle in opt._grad_acc_hooks:  # DeepSpeed's per-parameter hooks
        handle.remove()
    opt._grad_acc_hooks = []
    flat = _FlatGradients(opt, buckets, world, rank)
    if opt.partition_gradients:  # ZeRO-2: reduce each bucket as soon as backward has filled it
        for b in buckets:
            for p in b.params:
                opt._grad_acc_hooks.append(p.register_post_accumulate_grad_hook(flat.hook(b)))
    plain_step = opt.step

    def step(*args, **kwargs):
        try:
            return plain_step(*args, **kwargs)
        finally:  # the gradients were taken (or dropped on overflow): the next accumulation starts afresh
            flat.restart()

    opt.independent_gradient_partition_epilogue = flat.epilogue  # ZeRO-2, after every backward
    opt.reduce_gradients = types.MethodType(lambda self, pipeline_parallel=False: flat.epilogue(), opt)  # ZeRO-1
    opt.step, opt.flat_gradients = step, flat
    return True


class _FlatGradients:
    def __init__(self, opt, buckets: list[_Bucket], world: int, rank: int):
        self.opt, self.buckets, self.world, self.rank = opt, buckets, world, rank
        self.partition = {}  # group -> this accumulation's flat fp32 gradient of this rank's partition
        from deepspeed.runtime.zero.stage_1_and_2 import GradPartitionBufferGroup
        self._group_of = GradPartitionBufferGroup

    def hook(self, bucket: _Bucket):
        def accumulated(_param):
            bucket.ready += 1
            if bucket.ready == len(bucket.params) and not bucket.reduced:
                self.reduce(bucket)
        return accumulated

    def restart(self) -> None:
        self.partition = {}
        for b in self.buckets:
            b.written = False

    @torch.no_grad()
    def reduce(self, b: _Bucket) -> None:
        import deepspeed.comm as ds_dist

        parts = []
        for p, fill in zip(b.params, b.fills):
            parts.append(p.grad if p.grad is not None else torch.zeros_like(p))  # unused this step: zeros
            if fill is not None:
                parts.append(fill)
        flat = torch._chunk_cat(parts, 0, 1).view(-1)
        for p in b.params:
            p.grad = None
        b.reduced = True
        if self.world > 1:
            if self.opt.gradient_average:
                flat.div_(self.world)
            if b.comm_dtype != flat.dtype:
                flat = flat.to(b.comm_dtype)
            ds_dist.all_reduce(flat, group=self.opt.dp_process_group)
        size = int(self.opt.partition_size[b.group])
        first, last = self.rank * size, (self.rank + 1) * size
        lo, hi = max(b.start, first), min(b.start + b.numel, last)
        if hi <= lo:
            return
        src = flat if (lo, hi) == (b.start, b.start + b.numel) else flat[lo - b.start:hi - b.start]
        partition = self.partition.get(b.group)
        if partition is None:
            partition = self.partition[b.group] = torch.empty(size, dtype=torch.float32, device=flat.device)
        dst = partition if (lo, hi) == (first, last) else partition[lo - first:hi - first]
        if b.written:
            dst.add_(src)
        else:
            dst.copy_(src)
            b.written = True

    def epilogue(self) -> None:
        """After backward (ZeRO-2) or at the boundary (ZeRO-1): reduce what the hooks left, hand DeepSpeed the
        partition gradients."""
        for b in self.buckets:
            if not b.reduced or any(p.grad is not None for p in b.params):
                self.reduce(b)
            b.ready, b.reduced = 0, False
        for group in range(len(self.opt.bit16_groups_flat)):
            partition = self.partition.get(group)
            if partition is None:  # no bucket of this group: nothing here to step on but its zeros
                partition = self.partition[group] = torch.zeros(int(self.opt.partition_size[group]),
                                                                device=self.opt.bit16_groups_flat[group].device)
            self.opt.averaged_gradients[group] = self._group_of([partition], partition)
