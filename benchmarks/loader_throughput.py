"""Loader throughput on one core: image shards versus latent shards, measured side by side.

    .venv/bin/python benchmarks/loader_throughput.py
    .venv/bin/python benchmarks/loader_throughput.py --images /data/twemoji64 --resolution 64
    .venv/bin/python benchmarks/loader_throughput.py --images 's3://bucket/laion/{000000..000099}.tar'
    .venv/bin/python benchmarks/loader_throughput.py --workers 1 --latent-shape 4x8x8 --text-emb 32x64 \
        --batch 64 --headroom demo --json runs/bench/loader.json      # item 2: loader headroom, demo UNet

What is measured
----------------
The training input path exactly as the trainers build it: `ShardBatches` (tar parsing,
shuffle buffer, batching, `default_collate`) behind `make_loader`'s DataLoader, with

(a) image shards decoded by `trainer.autoencoder.train.decode_image_sample` at `--resolution`
    (image decode, EXIF/alpha handling, resize of the shorter side + centre crop, to a
    float tensor): what the autoencoder and the latent-cache job read;
(b) latent shards decoded by `trainer.unet.decode_latent_sample` (safetensors -> fp16
    `mean`, `std`, `text_emb` tensors): what UNet training reads.

Each pipeline runs twice: with `num_workers=0` (everything in this process) and with
`num_workers=1` (one DataLoader worker process does the loading and hands each collated
batch over through shared memory, as in training; this process only receives them).
`torch.set_num_threads(1)` is set here and the DataLoader sets it in its worker, and the
decoding is single-threaded, so the loader uses one core. The "cores" column is the CPU
time the loader actually got per wall second (the worker process's, or this process's
for num_workers=0): about 1.00 when it ran flat out on one core; with num_workers=1 a few
percent more, the worker's queue feeder thread that pickles batches for the hand-over. The "other" column is the CPU the rest of the machine used meanwhile (Linux
/proc/stat, in cores, the highest window): other jobs competing with the loader.

Each measurement warms up first (worker start, first shuffle-buffer fill), then times
`--repeats` consecutive windows of `--seconds` each on the same running loader (steady
state, epochs roll over as in training) and prints the median and the spread
((max - min) / median) of the windows. MB/s counts the shard bytes read (the `bytes`
the loader reports per batch), not the decoded tensors.

By default the data is generated in a temporary directory and deleted afterwards:

* image shards: the embedded data set's generator (`data_pipeline.synthetic`, as in
  launch/make_synthetic.py), drawn at `--draw-size` px so that the resize to
  `--resolution` runs as it does for real images (which are larger than the crop). To keep
  set-up short only `--unique` distinct images are drawn and repeated under new keys;
  decoding cost does not depend on that. These flat-colour PNGs compress to a few KB,
  far smaller than photos, so their MB/s is low and their decode is on the cheap side:
  `--images` measures real shards (a directory, glob, brace pattern or s3:// URL of
  WebDataset .tar shards with an image and a .txt caption per sample).
* latent shards: synthetic samples in the cache format of trainer/cache/job.py
  (`KEY.safetensors` with fp16 `mean`/`std` of `--latent-shape` and fp16 `text_emb` of
  `--text-emb`, plus `KEY.txt`, `KEY.json` and `KEY.sha256`), written directly with safetensors, not
  VAE-encoded. The default 4x64x64 + 77x1024 is what a 512-px Stable Diffusion 2.x cache
  holds (about 222 KB per sample, mostly the text embedding), whatever `--resolution` is.

How to read it
--------------
samples/s with num_workers=1 is what one DataLoader worker delivers to a training
process: a rank needs about (samples per step / step time) / that figure workers to keep
its GPU fed. The ratio latent/image says how much cheaper reading the latent cache is
than decoding images on the same machine, in the same run; it is the figure to quote,
since absolute rates depend on the CPU and on what else runs. A spread above ~10%, a
"cores" value well below 1.00 or an "other" value near the number of spare cores means
the machine was busy and the absolute figures are noisy (the script says so). This is a benchmark, not a test: it asserts nothing.

Loader headroom (--headroom PRESET)
-----------------------------------
After the loader rows, the same run times the training step that consumes these latents:
the PRESET UNet (models.unet.build_unet on --latent-shape latents and --text-emb context)
stepped as trainer/unet/train.py steps it, through trainer.core.engine's DeepSpeed engine (ZeRO-2, fp32,
one rank, AdamW, clipping 1.0): z ~ N(mean, std^2) from fp16 moments, caption dropout 0.1,
training_loss, engine.backward, engine.step, loss.item(), on a batch of --batch random fp16
samples held in memory. The step runs with torch's default threads (all cores, what a training
process gets; --step-threads sets another: `make bench` passes 1, since on a 2-core machine the
worker has the other core, and two threads that share their cores with other processes slow down
several-fold), timed over --repeats windows of at least --seconds after a warm-up. The headroom is

    latent samples/s that one DataLoader worker delivers / samples/s the training step consumes

(median over median), target >= 10: a rank then needs a tenth of a worker to stay fed, so
the loader can absorb slower storage, bigger text embeddings or a faster step before the
step waits for data. The range printed beside it pairs the slowest loader window with the
fastest step window and the reverse.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import cpu_model, machine_busy_seconds, write_json  # noqa: E402  (benchmarks/common.py)
from safetensors.torch import save as st_save  # noqa: E402

from data_pipeline import synthetic  # noqa: E402
from data_pipeline.latents import sample_digest  # noqa: E402
from data_pipeline.loader import ShardBatches, make_loader  # noqa: E402
from data_pipeline.quarantine import Quarantine  # noqa: E402
from data_pipeline.shards import write_shards  # noqa: E402
from data_pipeline.storage import expand_shards  # noqa: E402
from trainer.autoencoder.train import decode_image_sample  # noqa: E402
from trainer.unet.train import decode_latent_sample  # noqa: E402


# --- data --------------------------------------------------------------------------------
def synthetic_images(num: int, draw_size: int, unique: int, seed: int = 0):
    """`num` samples of the embedded data set; `unique` distinct drawings, repeated under new keys."""
    pool = [synthetic.sample(seed, i, draw_size) for i in range(min(num, unique))]
    for i in range(num):
        s = dict(pool[i % len(pool)])
        s["__key__"] = f"{i:08d}"
        yield s


def synthetic_latents(num: int, latent_shape: tuple[int, ...], text_emb_shape: tuple[int, ...], seed: int = 0):
    """`num` latent-cache samples in trainer/cache/job.py's format, with random fp16 contents."""
    rng = np.random.default_rng(seed)
    n_lat, n_emb = int(np.prod(latent_shape)), int(np.prod(text_emb_shape))
    # One random pool, sliced at random offsets: distinct samples without drawing ~10^8 normals.
    pool = torch.from_numpy(rng.standard_normal(4 * (2 * n_lat + n_emb), dtype=np.float32)).half()
    for i in range(num):
        o = rng.integers(0, len(pool) - 2 * n_lat - n_emb, size=3)
        tensors = {
            "mean": pool[o[0]:o[0] + n_lat].reshape(latent_shape).clone(),
            "std": pool[o[1]:o[1] + n_lat].abs().add(0.01).reshape(latent_shape).clone(),
            "text_emb": pool[o[2]:o[2] + n_emb].reshape(text_emb_shape).clone(),
        }
        sample = {"__key__": f"{i:08d}", "safetensors": st_save(tensors),
                  "txt": synthetic.caption(synthetic.attributes(seed, i)).encode(),
                  "json": json.dumps({"original_size": [512, 512]}).encode()}
        sample["sha256"] = sample_digest(sample).encode()  # the cache format's per-sample check
        yield sample


def write_counted(samples, out: str, per_shard: int, prefix: str) -> tuple[list[str], list[int], int]:
    """Write shards; returns (urls, samples per shard, total bytes of the sample fields)."""
    seen = {"samples": 0, "bytes": 0}

    def tally(it):
        for s in it:
            seen["samples"] += 1
            seen["bytes"] += sum(len(v) for k, v in s.items() if not k.startswith("__"))
            yield s
    urls = write_shards(tally(samples), out, per_shard, prefix=prefix)
    counts = [per_shard] * (len(urls) - 1) + [seen["samples"] - per_shard * (len(urls) - 1)]
    return urls, counts, seen["bytes"]


# --- measurement -------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of process `pid` (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return None


def _batch_size(batch: dict) -> int:
    return next(len(v) for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim > 0)


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
    warmup = time.perf_counter() - t0
    if workers:
        procs = getattr(loader._iter, "_workers", [])  # the DataLoader's worker processes
        cpu = (lambda: _sum_or_none(_proc_cpu_seconds(p.pid) for p in procs)) if procs else (lambda: None)
    else:
        cpu = time.process_time
    windows = []
    for _ in range(repeats):
        samples = nbytes = 0
        m0, own0 = machine_busy_seconds(), time.process_time()
        c0, start = cpu(), time.perf_counter()
        while True:
            b = next(loader)
            samples += _batch_size(b)
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
                        # CPU the rest of the machine used meanwhile: other jobs competing with the loader
                        "other": None if m0 is None or m1 is None or loader_cpu is None
                        else max(0.0, (m1 - m0 - own) / elapsed)})
    shutdown = getattr(loader._iter, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    rates = [w["samples_s"] for w in windows]
    cores = [w["cores"] for w in windows if w["cores"] is not None]
    other = [w["other"] for w in windows if w["other"] is not None]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "mb_s": statistics.median(w["mb_s"] for w in windows),
            "cores": statistics.median(cores) if cores else None,
            "other": max(other) if other else None, "warmup_s": warmup}


HEADROOM_TARGET = 10.0


def time_train_step(preset: str, latent_shape: tuple[int, ...], text_emb: tuple[int, ...], batch: int, *,
                    seconds: float, repeats: int, warmup_steps: int = 2) -> dict:
    """samples/s of trainer/unet/train.py's step for UNet `preset` on random fp16 cache samples in memory.

    The step is the trainer's (latent draw, caption dropout, training_loss, DeepSpeed backward and
    step), so the rate is what a training process asks of its loader, without the loader's own cost.
    """
    from models.diffusion import draw_latents, noise_schedule, training_loss
    from models.unet import build_unet
    from trainer.core import dist
    from trainer.core.engine import build_engine, deepspeed_config

    w = dist.init()
    channels, size, _ = latent_shape
    unet = build_unet(preset, channels, size, text_emb[1])
    params = sum(q.numel() for q in unet.parameters())
    engine = build_engine(unet, deepspeed_config(
        batch_per_rank=batch, grad_accum=1, world_size=w.size, zero_stage=2, precision="fp32", lr=1e-3,
        betas=(0.9, 0.999), weight_decay=0.01, grad_clip=1.0))
    schedule = noise_schedule("epsilon")
    g = torch.Generator().manual_seed(0)
    mean = torch.randn((batch, *latent_shape), generator=g).half()
    std = (torch.rand((batch, *latent_shape), generator=g) * 0.1 + 0.01).half()
    emb = torch.randn((batch, *text_emb), generator=g).half()
    empty = torch.zeros(text_emb)

    def one(i: int) -> None:
        gen = torch.Generator().manual_seed(i)
        z0 = draw_latents(mean, std, gen) * 0.18215
        context = emb.float()
        drop = torch.rand(batch, generator=gen) < 0.1
        context = torch.where(drop[:, None, None], empty, context)
        loss = training_loss(engine, z0, context, schedule, gen)
        engine.backward(loss)
        engine.step()
        loss.item()

    for i in range(warmup_steps):
        one(i)
    windows, step_s, i = [], [], warmup_steps
    for _ in range(repeats):
        n, m0, c0 = 0, machine_busy_seconds(), time.process_time()
        t0 = time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < seconds:
            one(i)
            i, n = i + 1, n + 1
        wall, cpu, m1 = time.perf_counter() - t0, time.process_time() - c0, machine_busy_seconds()
        windows.append((batch * n / wall, cpu / wall, None if m0 is None or m1 is None else max(0.0, (m1 - m0 - cpu) / wall)))
        step_s.append(wall / n)
    rates = [r for r, _, _ in windows]
    others = [o for _, _, o in windows if o is not None]
    med = statistics.median(rates)
    return {"preset": preset, "params": params, "threads": torch.get_num_threads(), "batch": batch,
            "median": med, "min": min(rates), "max": max(rates), "spread": (max(rates) - min(rates)) / med,
            "values": rates, "ms_per_step": statistics.median(step_s) * 1e3,
            "cores": statistics.median(c for _, c, _ in windows), "other": max(others) if others else None}


def _sum_or_none(values):
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


# --- report ------------------------------------------------------------------------------


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
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = datetime.datetime.now().astimezone()
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        t = time.perf_counter()
        if args.images:
            img_urls = expand_shards(args.images, args.endpoint_url)
            img_desc = f"{args.images} ({len(img_urls)} shards)"
        else:
            img_urls, _, img_bytes = write_counted(
                synthetic_images(args.num, args.draw_size, args.unique), os.path.join(tmp, "images"),
                args.per_shard, "shapes")
            img_desc = (f"synthetic shapes (data_pipeline.synthetic), {args.num} PNG {args.draw_size}px RGB in "
                        f"{len(img_urls)} shards, {args.unique} distinct drawings repeated, "
                        f"{img_bytes / args.num / 1e3:.1f} KB/sample")
        lat_urls, lat_counts, lat_bytes = write_counted(
            synthetic_latents(args.num, args.latent_shape, args.text_emb), os.path.join(tmp, "latents"),
            args.per_shard, "latents")
        setup_s = time.perf_counter() - t
        lat_desc = (f"synthetic, written directly with safetensors (not VAE-encoded): {args.num} samples in "
                    f"{len(lat_urls)} shards, mean/std {'x'.join(map(str, args.latent_shape))} fp16 + text_emb "
                    f"{'x'.join(map(str, args.text_emb))} fp16 (+ .txt, .json), {lat_bytes / args.num / 1e3:.1f} KB/sample")

        pipelines = [
            # Counts as the trainers pass them: none for image shards (train_autoencoder), the
            # manifest's for a latent cache (train_unet).
            ("image", f"image -> {args.resolution}px tensor", img_urls, None,
             functools.partial(decode_image_sample, resolution=args.resolution)),
            ("latent", "latent (safetensors)", lat_urls, lat_counts, decode_latent_sample),
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
        quarantined = {}
        for name, *_ in pipelines:
            for w in workers:
                path = os.path.join(tmp, f"quarantine-{name}-{w}.jsonl")
                if os.path.exists(path):
                    with open(path) as f:
                        quarantined[name, w] = sum(1 for line in f if line.strip())
    if args.images:  # the shards' size per sample, as read
        r = results["image", workers[0]]
        img_desc += f", {r['mb_s'] * 1e3 / r['median']:.1f} KB/sample read"

    # --- the report ------------------------------------------------------------------------
    ncpu = os.cpu_count()
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else ncpu
    print("Loader throughput, one core (benchmarks/loader_throughput.py)")
    print(f"date:     {started.isoformat(timespec='seconds')}")
    print(f"machine:  {cpu_model()}, {ncpu} logical CPUs ({avail} usable), {platform.system()} {platform.machine()}")
    print(f"software: python {platform.python_version()}, torch {torch.__version__}, torch threads "
          f"{torch.get_num_threads()}")
    if load0 is not None:
        print(f"load avg: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} (1/5/15 min, before the run)")
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
    for (name, w), n in sorted(quarantined.items()):
        print(f"note: {n} {name} samples failed to decode and were quarantined (num_workers={w})")
    noisy = sum(1 for r in results.values() if (r["max"] - r["min"]) / r["median"] > 0.10
                or (r["cores"] is not None and r["cores"] < 0.9))
    others = [r["other"] for r in results.values() if r["other"] is not None]
    if noisy or (others and max(others) > 0.5):
        why = ([f"spread > 10% or < 0.9 cores in {noisy} of {len(results)} rows"] if noisy else []) + (
            [f"other processes used up to {max(others):.1f} of {avail} cores"] if others and max(others) > 0.5 else [])
        print(f"note: noisy figures ({'; '.join(why)}): take the absolute rates as rough; "
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

    if args.json:
        write_json(args.json, {"benchmark": "loader_throughput", "date": started.isoformat(timespec="seconds"),
                               "machine": {"cpu": cpu_model(), "logical_cpus": ncpu, "usable_cpus": avail,
                                           "torch": torch.__version__},
                               "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()},
                               "loader": [{"pipeline": name, "workers": w, "samples_per_s": {
                                   k: results[name, w][k] for k in ("median", "min", "max")},
                                   "spread": (results[name, w]["max"] - results[name, w]["min"]) / results[name, w]["median"],
                                   **{k: results[name, w][k] for k in ("mb_s", "cores", "other")}}
                                   for name, *_ in pipelines for w in workers],
                               "ratio_latent_over_image": {str(w): results["latent", w]["median"] / results["image", w]["median"]
                                                           for w in workers},
                               "train_step": step, "headroom": headroom})
        print(f"figures written to {args.json}")

if __name__ == "__main__":
    main()
