"""Loader throughput on one core: image shards versus latent shards, side by side; and the headroom
of the latent loader over the UNet training step that consumes it.

    .venv/bin/python benchmarks/loader_throughput.py
    .venv/bin/python benchmarks/loader_throughput.py --images 's3://bucket/laion/{000000..000099}.tar' --resolution 64
    .venv/bin/python benchmarks/loader_throughput.py --workers 1 --latent-shape 4x8x8 --text-emb 32x64 \
        --batch 64 --headroom demo --json runs/bench/loader.json      # item 2: loader headroom, demo UNet

The training input path as the trainers build it (`ShardBatches` behind `make_loader`'s DataLoader)
reads (a) image shards decoded by trainer.autoencoder.train.decode_image_sample at --resolution
(what the autoencoder and the cache job read) and (b) latent shards decoded by
data_pipeline.latents.decode_sample (what UNet training reads), each with num_workers 0 (all in
this process) and 1 (one worker process hands collated batches over through shared memory). torch
runs one thread and decoding is single-threaded, so the loader uses one core. After a warm-up,
--repeats consecutive windows of --seconds on the same running loader give the median and spread.
"cores": CPU time the loader got per wall second (~1.00 flat out); "other": cores the rest of the
machine used meanwhile (Linux /proc/stat), at most. MB/s counts the shard bytes read.

By default both data sets are synthetic, in a temporary directory: the embedded data set's shapes
drawn at --draw-size px (--unique distinct drawings repeated; flat-colour PNGs decode faster than
photos: --images measures real WebDataset shards), and latent samples in the cache job's format
with random fp16 moments of --latent-shape and text_emb of --text-emb (4x64x64 + 77x1024: a 512-px
SD 2.x cache, about 222 KB per sample). The ratio latent/image is the figure to quote.

--headroom PRESET also times trainer.unet.step.train_step of that UNet preset in the job's engine
(ZeRO-2, fp32, one rank) on --batch random cache batches in memory, with torch's default threads
(--step-threads sets another; `make bench` passes 1: on 2 cores the worker has the other one), and
prints latent samples/s on one worker / samples/s the step consumes (target >= 10: a rank needs a
tenth of a worker). Its range pairs the slowest loader window with the fastest step window and the
reverse. This is a benchmark, not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import tempfile
import time

import torch
from common import (TICK, Stepper, header, image_shards, latent_shards, machine_busy_seconds,  # benchmarks/
                    noisy_note, started, usable_cpus, write_json)

from data_pipeline.latents import decode_sample
from data_pipeline.loader import ShardBatches, make_loader
from data_pipeline.quarantine import Quarantine
from data_pipeline.storage import expand_shards
from trainer.autoencoder.train import decode_image_sample

HEADROOM_TARGET = 10.0


def _proc_cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of process `pid` (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return None


def measure(urls: list[str], decode, batch: int, workers: int, counts: list[int] | None, *,
            warmup_s: float, seconds: float, repeats: int, quarantine_path: str) -> dict:
    """Warm up, then time `repeats` consecutive windows of `seconds` on one running loader."""
    dataset = ShardBatches(urls, decode, batch, seed=0, num_workers=workers, counts=counts,
                           quarantine=Quarantine(quarantine_path))
    loader = iter(make_loader(dataset))
    t0, n = time.perf_counter(), 0
    while n < 3 or time.perf_counter() - t0 < warmup_s:
        next(loader)
        n += 1
    procs = getattr(loader._iter, "_workers", []) if workers else []  # the DataLoader's worker processes

    def cpu():  # the loader's CPU seconds: its worker's, or this process's without workers
        if not workers:
            return time.process_time()
        values = [_proc_cpu_seconds(p.pid) for p in procs]
        return None if not values or None in values else sum(values)
    windows = []
    for _ in range(repeats):
        samples = nbytes = 0
        m0, own0 = machine_busy_seconds(), time.process_time()
        c0, start = cpu(), time.perf_counter()
        while True:
            b = next(loader)
            samples += next(len(v) for v in b.values() if isinstance(v, torch.Tensor) and v.ndim > 0)
            nbytes += b["bytes"]
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        c1 = cpu()
        own, m1 = time.process_time() - own0, machine_busy_seconds()
        loader_cpu = None if c0 is None or c1 is None else c1 - c0
        if workers and loader_cpu is not None:
            own += loader_cpu  # this process receives the batches, the worker loads them
        windows.append({"samples_s": samples / elapsed, "mb_s": nbytes / elapsed / 1e6,
                        "cores": None if loader_cpu is None else loader_cpu / elapsed,
                        "other": None if m0 is None or m1 is None or loader_cpu is None
                        else max(0.0, (m1 - m0 - own) / elapsed)})
    shutdown = getattr(loader._iter, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    with open(quarantine_path) if os.path.exists(quarantine_path) else contextlib.nullcontext([]) as f:
        quarantined = sum(1 for line in f if line.strip())  # the workers' quarantine records
    rates = [w["samples_s"] for w in windows]
    cores = [w["cores"] for w in windows if w["cores"] is not None]
    other = [w["other"] for w in windows if w["other"] is not None]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "mb_s": statistics.median(w["mb_s"] for w in windows), "cores": statistics.median(cores) if cores else None,
            "other": max(other) if other else None, "quarantined": quarantined}


def time_train_step(preset: str, latent_shape, text_emb, batch: int, *, seconds: float, repeats: int) -> dict:
    """samples/s of the UNet job's own step for UNet `preset` on random fp16 cache batches in memory:
    what a training process asks of its loader, without the loader's cost."""
    from trainer.core import dist
    from trainer.unet.job import UNetJob

    w = dist.init()
    job = UNetJob(model=preset, batch_per_rank=batch, zero_stage=2, precision="fp32", lr=1e-3)
    s = Stepper(job, latent_shape, text_emb, world_size=w.size, rank=w.rank)
    s.step(2)  # warm-up
    windows = [s.window(seconds, min_steps=3) for _ in range(repeats)]
    rates = [batch * n / cpu.wall for n, cpu in windows]
    others = [cpu.other for _, cpu in windows if cpu.other is not None]
    med = statistics.median(rates)
    return {"preset": preset, "params": s.params, "threads": torch.get_num_threads(), "batch": batch,
            "median": med, "min": min(rates), "max": max(rates), "spread": (max(rates) - min(rates)) / med,
            "values": rates, "ms_per_step": statistics.median(cpu.wall / n for n, cpu in windows) * 1e3,
            "cores": statistics.median(cpu.own / cpu.wall for _, cpu in windows),
            "other": max(others) if others else None}


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 4x64x64, got {text!r}") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=None, help="real image shards (dir, glob, brace pattern, URL); "
                   "default: synthetic shapes generated in a temporary directory")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for --images")
    p.add_argument("--num", type=int, default=2000, help="synthetic images and latent samples to generate")
    p.add_argument("--per-shard", type=int, default=250, help="samples per generated shard")
    p.add_argument("--resolution", type=int, default=256, help="crop size images are decoded to")
    p.add_argument("--draw-size", type=int, default=384, help="side of the synthetic images (resized to --resolution)")
    p.add_argument("--unique", type=int, default=128, help="distinct synthetic drawings (repeated up to --num)")
    p.add_argument("--latent-shape", type=_shape, default=(4, 64, 64), help="C x H x W of the fp16 mean/std")
    p.add_argument("--text-emb", type=_shape, default=(77, 1024), help="tokens x width of the fp16 text_emb")
    p.add_argument("--batch", type=int, default=32, help="samples per batch")
    p.add_argument("--seconds", type=float, default=4.0, help="length of each timed window")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before timing (at least 3 batches)")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per measurement")
    p.add_argument("--workers", default="0,1", help="DataLoader num_workers values to measure, comma-separated")
    p.add_argument("--headroom", default="", metavar="PRESET",
                   help="also time the training step of this UNet preset (e.g. demo) on these latents and print the "
                        "loader headroom: latent samples/s on one worker / samples/s the step consumes")
    p.add_argument("--step-threads", type=int, default=0,
                   help="torch threads for the --headroom step (0: torch's default, all cores)")
    p.add_argument("--json", default="", metavar="OUT", help="also write the figures to this JSON file")
    args = p.parse_args()
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        p.error(f"--workers takes comma-separated integers, got {args.workers!r}")
    if args.num < args.batch or min(workers) < 0 or args.repeats < 1:
        p.error("--num must be at least --batch, --workers non-negative, --repeats positive")
    if args.headroom:
        from models.unet import PRESETS as UNET_PRESETS
        if args.headroom not in UNET_PRESETS:
            p.error(f"--headroom: unknown UNet preset {args.headroom!r}; choose from {', '.join(UNET_PRESETS)}")
        if 1 not in workers:
            p.error("--headroom compares with the loader on one worker: include 1 in --workers")
        if len(args.latent_shape) != 3 or len(args.text_emb) != 2:
            p.error("--headroom needs a C x H x W --latent-shape and a tokens x width --text-emb")
    if args.step_threads < 0:
        p.error("--step-threads must be non-negative")
    default_threads = torch.get_num_threads()

    torch.set_num_threads(1)
    start = started()
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        t = time.perf_counter()
        if args.images:
            img_urls = expand_shards(args.images, args.endpoint_url)
            img_desc = f"{args.images} ({len(img_urls)} shards)"
        else:
            img_urls, _, img_bytes = image_shards(os.path.join(tmp, "images"), args.num, args.per_shard,
                                                  args.draw_size, unique=args.unique)
            img_desc = (f"synthetic shapes (data_pipeline.synthetic), {args.num} PNG {args.draw_size}px RGB in "
                        f"{len(img_urls)} shards, {args.unique} distinct drawings repeated, "
                        f"{img_bytes / args.num / 1e3:.1f} KB/sample")
        lat_urls, lat_counts, lat_bytes = latent_shards(os.path.join(tmp, "latents"), args.num, args.per_shard,
                                                        args.latent_shape, args.text_emb)
        setup_s = time.perf_counter() - t
        lat_desc = (f"synthetic, written directly with safetensors (not VAE-encoded): {args.num} samples in "
                    f"{len(lat_urls)} shards, mean/std {'x'.join(map(str, args.latent_shape))} fp16 + text_emb "
                    f"{'x'.join(map(str, args.text_emb))} fp16 (+ .txt, .json), {lat_bytes / args.num / 1e3:.1f} KB/sample")

        pipelines = [
            # Counts as the trainers pass them: none for image shards (train_autoencoder), the
            # manifest's for a latent cache (train_unet).
            ("image", f"image -> {args.resolution}px tensor", img_urls, None,
             functools.partial(decode_image_sample, resolution=args.resolution)),
            ("latent", "latent (safetensors)", lat_urls, lat_counts, decode_sample),
        ]
        results = {}
        for name, _, urls, counts, decode in pipelines:
            for w in workers:
                results[name, w] = measure(urls, decode, args.batch, w, counts, warmup_s=args.warmup,
                                           seconds=args.seconds, repeats=args.repeats,
                                           quarantine_path=os.path.join(tmp, f"quarantine-{name}-{w}.jsonl"))
        step = None
        if args.headroom:
            torch.set_num_threads(args.step_threads or default_threads)
            step = time_train_step(args.headroom, args.latent_shape, args.text_emb, args.batch,
                                   seconds=args.seconds, repeats=args.repeats)
            torch.set_num_threads(1)
    if args.images:  # the shards' size per sample, as read
        r = results["image", workers[0]]
        img_desc += f", {r['mb_s'] * 1e3 / r['median']:.1f} KB/sample read"

    # --- the report ------------------------------------------------------------------------
    avail = usable_cpus()
    header("Loader throughput, one core (benchmarks/loader_throughput.py)", start,
           software=f"torch {torch.__version__}, torch threads {torch.get_num_threads()}")
    print(f"images:   {img_desc}")
    print(f"latents:  {lat_desc}")
    print(f"settings: batch {args.batch}, shuffle buffer 1000, warm-up >= {args.warmup:g}s, {args.repeats} windows "
          f"x {args.seconds:g}s per row; data set-up took {setup_s:.1f}s")
    print()
    head = f"{'pipeline':<26} {'workers':>7} {'samples/s':>10} {'min-max':>17} {'spread':>7} {'MB/s':>8} {'cores':>6} {'other':>6}"
    print(head)
    print("-" * len(head))
    for name, label, *_ in pipelines:
        for w in workers:
            r = results[name, w]
            spread = (r["max"] - r["min"]) / r["median"] * 100
            cores = "n/a" if r["cores"] is None else f"{r['cores']:.2f}"
            other = "n/a" if r["other"] is None else f"{r['other']:.2f}"
            rng = f"{r['min']:.0f}-{r['max']:.0f}"
            print(f"{label:<26} {w:>7} {r['median']:>10.0f} {rng:>17} {spread:>6.1f}% {r['mb_s']:>8.1f} "
                  f"{cores:>6} {other:>6}")
    print("(samples/s: median of the windows; cores: CPU time the loader got per second; other: cores the "
          "rest of the machine used meanwhile, at most, over the windows)")
    print()
    for w in workers:
        ratio = results["latent", w]["median"] / results["image", w]["median"]
        print(f"ratio latent/image samples/s, num_workers={w}: {ratio:.1f}x")
    print(f"(images decoded to {args.resolution}px; latents {'x'.join(map(str, args.latent_shape))} + text_emb "
          f"{'x'.join(map(str, args.text_emb))}: for a matched scale pass --latent-shape 4x"
          f"{args.resolution // 8}x{args.resolution // 8})")
    for (name, w), r in results.items():
        if r["quarantined"]:
            print(f"note: {r['quarantined']} {name} samples failed to decode and were quarantined (num_workers={w})")
    noisy = sum(1 for r in results.values() if (r["max"] - r["min"]) / r["median"] > 0.10
                or (r["cores"] is not None and r["cores"] < 0.9))
    busy = max((r["other"] for r in results.values() if r["other"] is not None), default=0.0)
    noisy_note(([f"spread > 10% or < 0.9 cores in {noisy} of {len(results)} rows"] if noisy else [])
               + ([f"other processes used up to {busy:.1f} of {avail} cores"] if busy > 0.5 else []),
               "the side-by-side ratio is the more robust figure")

    headroom = None
    if step is not None:
        loader = results["latent", 1]
        headroom = {"median": loader["median"] / step["median"], "min": loader["min"] / step["max"],
                    "max": loader["max"] / step["min"], "target": HEADROOM_TARGET}
        headroom["spread"] = (headroom["max"] - headroom["min"]) / headroom["median"]
        print()
        other = "n/a" if step["other"] is None else f"{step['other']:.2f}"
        print(f"training step, UNet {args.headroom} ({step['params'] / 1e6:.2f}M params) on "
              f"{'x'.join(map(str, args.latent_shape))} latents, batch {args.batch}, DeepSpeed ZeRO-2 fp32, "
              f"{step['threads']} torch threads: {step['median']:.0f} samples/s ({step['min']:.0f}-{step['max']:.0f}, "
              f"spread {step['spread'] * 100:.1f}%; {step['ms_per_step']:.0f} ms/step; cores {step['cores']:.2f}, "
              f"other {other})")
        verdict = "meets" if headroom["median"] >= HEADROOM_TARGET else "MISSES"
        print(f"loader headroom: {headroom['median']:.1f}x  {verdict} the >= {HEADROOM_TARGET:g} target  (latent samples/s "
              f"on one worker {loader['median']:.0f} / samples/s the step consumes {step['median']:.0f}; range "
              f"{headroom['min']:.1f}-{headroom['max']:.1f})")

    write_json(args.json, "loader_throughput", start, {
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()},
        "loader": [{"pipeline": name, "workers": w, "samples_per_s": {k: results[name, w][k] for k in ("median", "min", "max")},
                    "spread": (results[name, w]["max"] - results[name, w]["min"]) / results[name, w]["median"],
                    **{k: results[name, w][k] for k in ("mb_s", "cores", "other")}} for name, *_ in pipelines for w in workers],
        "ratio_latent_over_image": {str(w): results["latent", w]["median"] / results["image", w]["median"] for w in workers},
        "train_step": step, "headroom": headroom})


if __name__ == "__main__":
    main()
