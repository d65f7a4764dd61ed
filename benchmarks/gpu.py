"""UNet training throughput and MFU on a CUDA GPU, through the trainer's own engine.

    python benchmarks/gpu.py                          # sd15 and sd21 at 256 and 512 px, every option
    python benchmarks/gpu.py --presets sd21 --resolutions 512 --batch 32 --json gpu.json
    python benchmarks/gpu.py --presets sdxl --resolutions 1024 --batch 4 --checkpointing on

Each configuration builds the UNet job's engine (trainer.unet.step.build_unet_engine: SDPA attention,
channels-last, gradient checkpointing, torch.compile; bf16, ZeRO-2, one process) and steps it with
the job's own train_step on random fp16 cache batches held on the GPU (latent draw, caption
dropout, loss, backward, optimizer step, loss.item()).
Images/s is the median over the timed steps; TFLOP/s uses the model FLOPs per image from
torch.utils.flop_counter; MFU divides by the device's dense bf16 peak (trainer/core/flops.py).
Published points printed beside: MLPerf Training v4.0 Stable Diffusion (about 110 images/s
per H100 at 512 px, about 23% MFU) and mosaicml/diffusion (290 images/s on 8 A100 at 512 px).
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import torch

REFERENCES = [
    ("MLPerf Training v4.0 SD, H100, 512 px", "about 110 images/s per GPU, about 23% MFU"),
    ("mosaicml/diffusion SD2, 8x A100, 512 px", "290 images/s in all (36 per GPU)"),
]
CONTEXT = {"sd15": 768, "sd21": 1024, "sdxl": 2048}  # cross-attention width
POOLED = {"sdxl": 1280}  # SDXL's pooled text embedding (with the six size/crop numbers: text_time)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="sd15,sd21", help="comma list of UNet presets")
    p.add_argument("--resolutions", default="256,512", help="comma list of pixel resolutions (latents are 1/8)")
    p.add_argument("--batch", type=int, default=16, help="images per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--compile", default="off,on", help="torch.compile settings to try: off,on")
    p.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings to try: off,on")
    p.add_argument("--channels-last", default="on", help="NHWC input layout settings to try: off,on")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="override the device's dense bf16 peak")
    p.add_argument("--profile", type=int, default=0,
                   help="after the timed steps, profile this many more and print the top ops by CPU and GPU time")
    p.add_argument("--json", default="", help="also write the figures here")
    args = p.parse_args(argv)
    for key in ("presets", "resolutions", "compile", "checkpointing", "channels_last"):
        setattr(args, key, [v.strip() for v in getattr(args, key).split(",") if v.strip()])
    bad = [v for v in args.presets if v not in CONTEXT]
    if bad:
        p.error(f"--presets: unknown {bad[0]!r}; choose from {', '.join(CONTEXT)}")
    for key in ("compile", "checkpointing", "channels_last"):
        if any(v not in ("on", "off") for v in getattr(args, key)):
            p.error(f"--{key} takes on/off values, got {getattr(args, key)}")
    if any(not r.isdigit() or int(r) % 8 for r in args.resolutions):
        p.error(f"--resolutions must be multiples of 8, got {args.resolutions}")
    return args


def bench_one(preset: str, resolution: int, compiled: bool, checkpointing: bool, nhwc: bool, args, peak) -> dict:
    from common import Stepper  # benchmarks/common.py: imported here so tests can load this file by path
    from models.unet import build_unet
    from trainer.core.flops import Throughput, peak_memory_gb, unet_train_flops_per_sample
    from trainer.unet.job import UNetJob

    side, ctx, pooled = resolution // 8, CONTEXT[preset], POOLED.get(preset, 0)
    with torch.device("meta"):
        flops = unet_train_flops_per_sample(build_unet(preset, 4, side, ctx, pooled_dim=pooled), (4, side, side),
                                            (77, ctx), batch_size=1)
    job = UNetJob(model=preset, batch_per_rank=args.batch, zero_stage=2, precision="bf16", lr=1e-5, channels_last=nhwc,
                  attention="sdpa", gradient_checkpointing=checkpointing, compile=compiled)
    # Batches already on the GPU: the step's copies to the device are no-ops, nothing is read.
    stepper = Stepper(job, (4, side, side), (77, ctx), pooled_dim=pooled)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        stepper.step()
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    if args.profile:
        profile_steps(stepper, args.profile)
    images_per_s, tp = args.batch / step_s, Throughput(flops, peak)
    row = dict(preset=preset, resolution=resolution, compile=compiled, checkpointing=checkpointing, channels_last=nhwc,
               batch=args.batch,
               step_ms=step_s * 1e3, step_ms_spread=(max(times) - min(times)) / step_s, images_per_s=images_per_s,
               tflops=tp.tflops(images_per_s), mfu=tp.mfu(images_per_s), gflop_per_image=flops / 1e9,
               peak_memory_gb=peak_memory_gb())
    del stepper
    torch.cuda.empty_cache()
    return row


def profile_steps(stepper, steps: int) -> None:
    """Where a step's time goes: host-bound (CPU total near the step time, GPU idle between kernels) or
    device-bound. The first H200 run measured about 440 ms per step whatever the resolution and preset,
    which only a host-side cost explains; this table is how to find it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            stepper.step()
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=15))
    print(table.table(sort_by="self_device_time_total", row_limit=10))


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/gpu.py needs a CUDA GPU (none visible); the CPU benchmarks are the other scripts")
    from common import started, write_json  # benchmarks/common.py
    from trainer.core import dist
    from trainer.core.flops import device_peak_tflops

    start = started()
    dist.init()
    peak = device_peak_tflops("bf16", args.peak_tflops)
    name = torch.cuda.get_device_name()
    print(f"device: {name}, dense bf16 peak {peak or 'unknown'} TFLOP/s; torch {torch.__version__}; batch {args.batch}")
    rows = []
    for preset, res, comp, ckpt, nhwc in itertools.product(args.presets, map(int, args.resolutions), args.compile,
                                                           args.checkpointing, args.channels_last):
        try:
            row = bench_one(preset, res, comp == "on", ckpt == "on", nhwc == "on", args, peak)
        except torch.cuda.OutOfMemoryError:
            row = dict(preset=preset, resolution=res, compile=comp == "on", checkpointing=ckpt == "on",
                       channels_last=nhwc == "on", error="OOM")
            torch.cuda.empty_cache()
        rows.append(row)
        if "error" in row:
            print(f"{preset} {res}px compile={comp} ckpt={ckpt} nhwc={nhwc}: out of memory at batch {args.batch}")
        else:
            mfu = f"{row['mfu']:.1%}" if row["mfu"] else "n/a"
            print(f"{preset} {res}px compile={comp:3} ckpt={ckpt:3} nhwc={nhwc:3}: {row['images_per_s']:7.1f} img/s  "
                  f"{row['tflops']:6.1f} TFLOP/s  MFU {mfu:>6}  {row['step_ms']:.1f} ms/step "
                  f"(spread {row['step_ms_spread']:.0%})  peak {row['peak_memory_gb']:.1f} GB")
    print("published reference points:")
    for what, figure in REFERENCES:
        print(f"  {what}: {figure}")
    write_json(args.json, "gpu", start, {"device": name, "peak_tflops": peak, "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
