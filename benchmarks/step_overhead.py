"""What the framework's UNet step costs beyond the model's own work: its real step, side by side with a
plain PyTorch step of the same UNet, objective and batch (benchmarks/reference_step.py), on one rank.

    .venv/bin/python benchmarks/step_overhead.py                 # make bench settings, about a minute
    .venv/bin/python benchmarks/step_overhead.py --stages 0 --steps 3 --json runs/bench/step_overhead.json

The framework side is one iteration of the UNet loop's body (trainer/unet/train.py): set_lr,
trainer.unet.step.train_step on the job's DeepSpeed engine, the loop's device tally and the EMA update.
The reference is autocast, fused AdamW, foreach clipping and EMA, no DeepSpeed. For each ZeRO stage:

- operators dispatched in one step (a TorchDispatchMode sees every aten operator, the same on a CPU
  as on a GPU; each non-view operator is at least one kernel launch there), and those that are not
  views (view, detach, t, ... launch nothing on a GPU);
- host reads: `_local_scalar_dense`, which `.item()`, `float(t)`, `int(t)` and a tensor's truth value
  dispatch (on a GPU each waits for every kernel queued before it; a `.cpu()` or `.tolist()` cannot
  be told from a CPU copy here, and neither side has one in its step);
- time per step: the two steps alternate, --steps each after --warmup, the median of each.

Targets of issue #26 (CPU, an SD 1.5-shaped UNet): operators <= 1.10x and time <= 1.05x the reference,
at most 2 host reads per step, at ZeRO-0 and ZeRO-2. The last line:
`step overhead: zero0 ops R time R syncs N; zero2 ops R time R syncs N`.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from common import cache_batches, header, started, unet_trainer, write_json  # benchmarks/common.py
from reference_step import ReferenceStep
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.core import dist
from trainer.core.ema import EMA
from trainer.core.engine import set_lr
from trainer.core.metrics import StepTally
from trainer.unet.job import UNetJob
from trainer.unet.pretrained import build_model
from trainer.unet.step import prepare_unet, train_step

TARGETS = {"ops": 1.10, "time": 1.05, "syncs": 2}  # issue #26
# Operators that only make a new view of a tensor's storage: no kernel on a GPU.
VIEWS = {"view", "_unsafe_view", "detach", "t", "transpose", "slice", "select", "expand", "permute", "alias",
         "as_strided", "unsqueeze", "squeeze", "reshape", "split", "split_with_sizes", "unbind", "chunk", "narrow",
         "view_as", "_reshape_alias", "lift_fresh"}


class OpCounter(TorchDispatchMode):
    """Counts every aten operator dispatched inside the `with` block, by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def launches(self) -> int:
        return sum(n for name, n in self.counts.items() if name not in VIEWS)

    @property
    def host_reads(self) -> int:
        return self.counts["_local_scalar_dense"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15_narrow", help="UNet preset of both steps")
    p.add_argument("--stages", default="0,2", help="comma list of ZeRO stages for the framework's step")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="bf16: autocast on both sides")
    p.add_argument("--batch", type=int, default=4, help="samples per step")
    p.add_argument("--latent", type=int, default=8, help="latent side (4 channels)")
    p.add_argument("--context", default="77x64", help="text embedding shape, TOKENSxWIDTH")
    p.add_argument("--steps", type=int, default=8, help="timed steps of each side per stage")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each side first")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings on a shared machine)")
    p.add_argument("--json", default="", help="also write the figures here")
    args = p.parse_args(argv)
    args.stages = [int(s) for s in args.stages.split(",") if s.strip()]
    if any(s not in (0, 1, 2, 3) for s in args.stages):
        p.error(f"--stages takes ZeRO stages 0-3, got {args.stages}")
    parts = args.context.lower().split("x")
    args.context = tuple(int(v) for v in parts) if all(v.isdigit() for v in parts) else ()
    if len(args.context) != 2 or min(args.context) <= 0:
        p.error("--context must be TOKENSxWIDTH, e.g. 77x64")
    if min(args.batch, args.latent, args.steps) <= 0 or args.warmup < 0:
        p.error("--batch, --latent and --steps must be positive, --warmup >= 0")
    return args


def sides(args, stage: int) -> tuple:
    """(framework step, reference step): callables of the step index, each returning its loss tensor."""
    job = UNetJob(model=args.model, batch_per_rank=args.batch, zero_stage=stage, precision=args.precision, lr=1e-4,
                  grad_clip=1.0, ema_halflife_samples=10_000, ema_rampup_ratio=0.0)
    latent_shape = (4, args.latent, args.latent)
    engine, setup = unet_trainer(job, latent_shape, args.context)
    batch = cache_batches(1, args.batch, latent_shape, args.context, device=setup.device)[0]
    ema, tally = EMA(engine.module, job.ema_halflife_samples, job.ema_rampup_ratio), StepTally(setup.device)
    decay = ema.decay(args.batch, args.batch)

    def framework(i: int) -> torch.Tensor:  # the loop's body, as trainer/unet/train.py runs it
        set_lr(engine, job.lr)
        result = train_step(engine, iter([batch]), i, setup)
        tally.add(result.loss, result.applied)
        ema.update((i + 1) * args.batch, args.batch, result.applied)
        return result.loss

    unet = prepare_unet(build_model(job, *latent_shape[:2], args.context[1]), job)
    ref = ReferenceStep(unet, setup, lr=job.lr, betas=job.betas, weight_decay=job.weight_decay,
                        grad_clip=job.grad_clip, ema_decay=decay, bf16=args.precision == "bf16")
    return framework, (lambda i: ref.step(batch, i)), sum(1 for _ in unet.parameters())


def measure(step, i: int) -> OpCounter:
    with OpCounter() as ops:
        step(i)
    return ops


def compare(args, stage: int) -> dict:
    framework, reference, tensors = sides(args, stage)
    i = 0
    for _ in range(args.warmup):
        framework(i), reference(i)
        i += 1
    counted = {"framework": measure(framework, i), "reference": measure(reference, i)}
    times = {"framework": [], "reference": []}
    for k in range(args.steps):
        i += 1
        order = (("framework", framework), ("reference", reference))
        for name, step in order if k % 2 == 0 else reversed(order):  # alternate who goes first
            t0 = time.perf_counter()
            step(i)
            times[name].append(time.perf_counter() - t0)
    row = {"stage": stage, "parameter_tensors": tensors}
    for name, ops in counted.items():
        row[name] = {"ops": ops.total, "launches": ops.launches, "host_reads": ops.host_reads,
                     "step_ms": statistics.median(times[name]) * 1e3, "step_ms_values": [t * 1e3 for t in times[name]],
                     "top_ops": ops.counts.most_common(8)}
    f, r = row["framework"], row["reference"]
    row.update(ops_ratio=f["ops"] / r["ops"], launch_ratio=f["launches"] / r["launches"],
               time_ratio=f["step_ms"] / r["step_ms"], syncs=f["host_reads"])
    row["met"] = (row["ops_ratio"] <= TARGETS["ops"] and row["time_ratio"] <= TARGETS["time"]
                  and row["syncs"] <= TARGETS["syncs"])
    return row


def main(argv=None) -> None:
    args = parse_args(argv)
    start = started()
    torch.set_num_threads(args.threads)
    dist.init()
    header("Step overhead: the framework's UNet step against a plain PyTorch step (issue #26)", start,
           software=f"torch {torch.__version__}")
    print(f"model {args.model}, batch {args.batch}, latents 4x{args.latent}x{args.latent}, context "
          f"{args.context[0]}x{args.context[1]}, {args.precision}, {args.threads} torch thread(s), one rank; "
          f"median of {args.steps} alternating steps after {args.warmup}")
    rows = []
    for stage in args.stages:
        row = compare(args, stage)
        rows.append(row)
        f, r = row["framework"], row["reference"]
        print(f"ZeRO-{stage} ({row['parameter_tensors']} parameter tensors):")
        for name, side in (("framework", f), ("reference", r)):
            print(f"  {name:9}  {side['ops']:6d} ops ({side['launches']:6d} not views)  {side['host_reads']:4d} host "
                  f"reads  {side['step_ms']:7.1f} ms/step")
            print(f"             top: {', '.join(f'{k} {n}' for k, n in side['top_ops'])}")
        print(f"  ratio      ops {row['ops_ratio']:.2f}x (target <= {TARGETS['ops']}), not views "
              f"{row['launch_ratio']:.2f}x, time {row['time_ratio']:.2f}x (<= {TARGETS['time']}), host reads "
              f"{row['syncs']} (<= {TARGETS['syncs']}): {'met' if row['met'] else 'NOT met'}")
    write_json(args.json, "step_overhead", start, {"settings": {k: v for k, v in vars(args).items() if k != "json"},
                                                    "targets": TARGETS, "rows": rows})
    print("step overhead: " + "; ".join(f"zero{r['stage']} ops {r['ops_ratio']:.2f} time {r['time_ratio']:.2f} "
                                        f"syncs {r['syncs']}" for r in rows))


if __name__ == "__main__":
    main()
