"""Latent-cache job throughput as a ratio to a bare `vae.encode` loop, measured side by side.

    .venv/bin/python benchmarks/cache_throughput.py
    .venv/bin/python benchmarks/cache_throughput.py --vae /models/sd-vae-ft-mse --resolution 256 --num 256
    .venv/bin/python benchmarks/cache_throughput.py --num 1024 --repeats 3 --json runs/bench/precompute.json

(a)  The real job, trainer.cache.job.cache_latents, end to end into a fresh directory each time
     (decoding in --workers DataLoader workers; VAE and caption encoding, serialisation, tar
     writing, sha256, sidecars and manifest here). Its encode phase runs from the job's call to
     shard_images_loader (after both models are loaded; wrapped to note the time) to its return.
     Also printed: "steady" (first to last progress update), "total" (model loading included) and
     "total - fixed cost", the fixed cost being the job rerun on its finished output (it loads,
     starts and stops its workers, rewrites the manifest, encodes nothing).
(b)  A bare loop of vae.encode(x).latent_dist over the same images decoded beforehand into memory,
     same VAE, device and dtype as the job. (b') The same plus the job's text encoder on the
     captions: the ceiling the job could reach if reading, decoding and writing cost nothing.
They alternate (order reversed every other repeat) --repeats times after a warm-up each; "cores"
is the CPU the measurement used per wall second (workers included), "other" what the rest of the
machine used. The data is the embedded data set's shapes drawn at --draw-size px.

The job's non-encoding work should hide behind the encoder (decoding in workers, writing cheap), so
job/(b) should be near 1 (target >= 0.9 on CPU). The breakdown below the ratios says what the encoder
waited for: decoded batches (until the first batch, then the hand-over of the later ones), the VAE,
the text encoder, hashing, the rest. On a CPU the workers' decoding also competes with the
encoder's threads for the cores. This is a benchmark, not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from _cache_probe import job_config, run_job  # benchmarks/
from common import CpuWindow, header, image_shards, noisy_note, started, stats, usable_cpus, write_json

from data_pipeline.images import image_and_caption
from data_pipeline.shards import iter_samples
from models.autoencoder import PRESETS, downsample_factor, load_autoencoder
from models.text_encoder import load_text_encoder
from trainer.cache.job import encoder_dtype as job_dtype  # the job's rule: auto is fp16 on a GPU, fp32 on the CPU
from trainer.core import dist
from trainer.core.data import ImageData

TARGET = 0.9


def decode_in_memory(urls: list[str], options: dict, batch: int) -> tuple[list[torch.Tensor], list[list[str]], float]:
    """The images of `urls` decoded as the job decodes them, in batches; (batches, captions, seconds)."""
    t = time.perf_counter()
    xs, caps = [], []
    for url in urls:
        for sample in iter_samples(url):
            x, caption, _ = image_and_caption(sample, **options)
            xs.append(x)
            caps.append(caption)
    seconds = time.perf_counter() - t
    batches = [torch.stack(xs[i:i + batch]) for i in range(0, len(xs), batch)]
    captions = [caps[i:i + batch] for i in range(0, len(caps), batch)]
    return batches, captions, seconds


# --- (b), (b') the bare loops -------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def bare_loop(vae, text_encoder, batches, captions, device, dtype) -> float:
    """Seconds for `vae.encode(x).latent_dist` over all batches (+ the captions if text_encoder)."""
    _sync(device)
    t = time.perf_counter()
    for x, caps in zip(batches, captions):
        vae.encode(x.to(device, dtype)).latent_dist
        if text_encoder is not None:
            text_encoder.encode(caps)
    _sync(device)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default="f8", help=f"autoencoder preset ({', '.join(PRESETS)}; random weights) or a "
                   "diffusers AutoencoderKL folder / hub id, as the job's vae= takes it")
    p.add_argument("--text-encoder", default="tiny", help="the job's text_encoder= (tiny, or OpenCLIP MODEL:PRETRAINED)")
    p.add_argument("--num", type=int, default=1024, help="images to generate and cache")
    p.add_argument("--per-shard", type=int, default=256, help="images per generated input shard")
    p.add_argument("--resolution", type=int, default=64, help="crop size the images are decoded to (data.resolution)")
    p.add_argument("--draw-size", type=int, default=0, help="side of the generated PNGs (default 1.5 x resolution)")
    p.add_argument("--batch", type=int, default=64, help="images per encoder call (the job's batch_size)")
    p.add_argument("--workers", type=int, default=1, help="decoding DataLoader workers (data.num_workers)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="encoder dtype")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement, alternating")
    p.add_argument("--threads", type=int, default=0, help="torch threads in this process (0: torch's default, all cores)")
    p.add_argument("--json", default="", metavar="OUT", help="also write the figures to this JSON file")
    args = p.parse_args()
    if args.num < args.batch or args.repeats < 1 or args.workers < 0 or args.per_shard < 1:
        p.error("--num must be at least --batch, --repeats and --per-shard positive, --workers non-negative")
    args.draw_size = args.draw_size or (args.resolution * 3) // 2
    args.vae_spec = f"preset:{args.vae}" if args.vae in PRESETS else args.vae
    if args.threads:
        torch.set_num_threads(args.threads)

    start = started()
    device = dist.device()
    dtype = job_dtype(args.precision)

    with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmp:
        # --- data and models for the bare loops --------------------------------------------
        t = time.perf_counter()
        urls, _, shard_bytes = image_shards(os.path.join(tmp, "images"), args.num, args.per_shard, args.draw_size)
        image_shards(os.path.join(tmp, "warmup"), 2 * args.batch, 2 * args.batch, args.draw_size, seed=1)
        gen_s = time.perf_counter() - t
        options = ImageData(resolution=args.resolution).decode_options()
        batches, captions, decode_s = decode_in_memory(urls, options, args.batch)

        vae = load_autoencoder(args.vae_spec).to(device)
        if dtype != torch.float32:
            vae.to(dtype)
        factor = downsample_factor(vae)
        if args.resolution % factor:
            p.error(f"--resolution {args.resolution} is not a multiple of the autoencoder's factor {factor}")
        text_encoder = load_text_encoder(args.text_encoder).to(device)

        # --- warm-up: imports, allocator, kernel selection, fork ----------------------------
        bare_loop(vae, text_encoder, batches[:2], captions[:2], device, dtype)
        run_job(job_config(os.path.join(tmp, "warmup"), os.path.join(tmp, "out-warmup"), args), 2 * args.batch)

        # --- the measurements, alternating ---------------------------------------------------
        jobs, bare, bare_te = [], [], []
        bare_cpu, bare_te_cpu = [], []

        def measure_job(k):
            jobs.append(run_job(job_config(os.path.join(tmp, "images"), os.path.join(tmp, f"out-{k}"), args),
                                args.num))

        def measure_bare(k, with_text):
            with CpuWindow() as cpu:
                s = bare_loop(vae, text_encoder if with_text else None, batches, captions, device, dtype)
            (bare_te if with_text else bare).append(args.num / s)
            (bare_te_cpu if with_text else bare_cpu).append(cpu)

        steps = [measure_job, lambda k: measure_bare(k, False), lambda k: measure_bare(k, True)]
        for k in range(args.repeats):
            for step in (steps if k % 2 == 0 else steps[::-1]):
                step(k)
        # Cross-check without the hooks' help: the job's fixed cost, rerun on a finished cache.
        fixed = run_job(job_config(os.path.join(tmp, "images"), os.path.join(tmp, f"out-{args.repeats - 1}"), args),
                        args.num)["total_s"]
        out0 = os.path.join(tmp, "out-0")
        tars = [f for f in os.listdir(out0) if f.endswith(".tar")]
        sample_kb = sum(os.path.getsize(os.path.join(out0, f)) for f in tars) / args.num / 1e3

    # --- the report ------------------------------------------------------------------------
    avail = usable_cpus()
    hooked = "phase_s" in jobs[0]
    job_rates = [args.num / j["phase_s"] for j in jobs] if hooked else [args.num / (j["total_s"] - fixed) for j in jobs]
    rows = [
        ("(a)  job, encode phase" if hooked else "(a)  job, total - fixed cost", stats(job_rates),
         [j["cpu"] for j in jobs]),
    ]
    if all("steady_rate" in j for j in jobs):
        rows.append(("(a)  job, steady (1st->last batch)", stats([j["steady_rate"] for j in jobs]), None))
    rows.append(("(a)  job, total incl. model loading", stats([args.num / j["total_s"] for j in jobs]), None))
    if hooked:
        rows.append(("(a)  job, total - fixed cost", stats([args.num / max(1e-9, j["total_s"] - fixed) for j in jobs]),
                     None))
    rows += [("(b)  bare vae.encode", stats(bare), bare_cpu),
             ("(b') bare vae.encode + text encoder", stats(bare_te), bare_te_cpu)]

    te_shape = f"{text_encoder.context_length}x{text_encoder.width}"
    size = args.resolution // factor
    header("Latent-cache throughput: the job versus a bare encode loop (benchmarks/cache_throughput.py)", start,
           machine=f"; encoders on {device}",
           software=f"torch {torch.__version__}, torch threads {torch.get_num_threads()} in this process "
                    f"({'set by --threads' if args.threads else 'the default: all cores, what a user gets'}); "
                    f"1 in each DataLoader worker; tensor sharing strategy {torch.multiprocessing.get_sharing_strategy()}")
    print(f"images:   synthetic shapes (data_pipeline.synthetic), {args.num} PNG {args.draw_size}px RGB in {len(urls)} "
          f"shards of {args.per_shard}, {shard_bytes / args.num / 1e3:.1f} KB/image in the shards, decoded to {args.resolution}px; "
          f"decode alone (tar read + image_and_caption, this process, one core): {args.num / decode_s:.0f} img/s "
          f"({decode_s / args.num * 1e3:.2f} ms/img)")
    print(f"encoders: vae {args.vae_spec} (f={factor}, latents {vae.config.latent_channels}x{size}x{size}), "
          f"{str(dtype).replace('torch.', '')}; text encoder {args.text_encoder} ({te_shape}); cache "
          f"{sample_kb:.1f} KB/sample")
    print(f"settings: batch {args.batch}, data.num_workers {args.workers}, {args.repeats} repeats of (a), (b), (b') "
          f"alternating (order reversed every other repeat) after one warm-up each; data set-up took {gen_s:.1f}s")
    print()
    head = f"{'measurement':<38} {'img/s':>8} {'min-max':>13} {'spread':>7} {'cores':>6} {'other':>6}"
    print(head)
    print("-" * len(head))
    for label, s, cpus in rows:
        rng = f"{s['min']:.0f}-{s['max']:.0f}"
        if cpus:
            cores = f"{statistics.median(c.cores for c in cpus):.2f}"
            others = [c.other for c in cpus if c.other is not None]
            other = f"{max(others):.2f}" if others else "n/a"
        else:
            cores = other = ""
        print(f"{label:<38} {s['median']:>8.0f} {rng:>13} {s['spread'] * 100:>6.1f}% {cores:>6} {other:>6}")
    print("(img/s: median over the repeats of N / seconds. encode phase: from the job's loader creation, after "
          "model loading, to its return; steady: first to last progress update; fixed cost: the job rerun on its "
          f"finished cache, {fixed:.2f}s = model loading + worker start/stop + manifest, no images)")
    print()
    # Each repeat's job run is divided by the bare runs next to it in time, and the median of
    # those paired ratios is the figure: drifts in machine speed over the run cancel out.
    ratios = {}
    for name, ref in (("(b)", bare), ("(b')", bare_te)):
        per = [jr / r for jr, r in zip(job_rates, ref)]
        ratio = statistics.median(per)
        ratios[name] = {**stats(per), "per_repeat": per,
                        "of_medians": rows[0][1]["median"] / statistics.median(ref)}
        verdict = "meets" if ratio >= TARGET else "MISSES"
        print(f"ratio job/{name}: {ratio:.2f}  {verdict} the >= {TARGET} target  (median of the per-repeat ratios "
              f"{', '.join(f'{v:.2f}' for v in per)}; ratio of the medians {rows[0][1]['median'] / statistics.median(ref):.2f})")
    if all("steady_rate" in j for j in jobs):
        steady = [j["steady_rate"] for j in jobs]
        print(f"steady state (first to last progress update): job/(b) "
              f"{statistics.median(a / b for a, b in zip(steady, bare)):.2f}, job/(b') "
              f"{statistics.median(a / b for a, b in zip(steady, bare_te)):.2f}")
    print()

    # --- where the job's time goes ---------------------------------------------------------
    breakdown, worker, ceiling = [], None, None
    if hooked:
        med = lambda key: statistics.median(j[key] for j in jobs)  # noqa: E731
        phase = med("phase_s")
        if all(j["wait_fill"] is not None for j in jobs):
            fill = med("wait_fill")
            parts = [("waiting for decoded batches: until the first batch (start, fill)", fill,
                      "shard_images_loader"),
                     ("waiting for decoded batches: afterwards (hand-over of the later batches)",
                      statistics.median(j["wait"] - j["wait_fill"] for j in jobs), "shard_images_loader")]
        else:
            parts = [("waiting for decoded batches (DataLoader next)", med("wait"), "shard_images_loader")]
        parts += [("VAE encode (LatentEncoder)", med("vae"), "LatentEncoder"),
                  ("text encode", med("text"), "load_text_encoder"),
                  ("sha256 of the written shards", med("sha"), "_sha256")]
        timed = {"shard_images_loader": "wait", "LatentEncoder": "vae", "load_text_encoder": "text", "_sha256": "sha"}
        rest = statistics.median(j["phase_s"] - sum(j[key] for name, key in timed.items() if name in j["found"])
                                 for j in jobs)
        parts.append(("the rest: stack, finite checks, stats, safetensors + tar writes, sidecars, manifest",
                      rest, None))
        print(f"where the job's encode phase goes (main process, medians; {phase:.2f}s for {args.num} images):")
        for label, v, name in parts:
            if name is not None and name not in jobs[0]["found"]:
                print(f"  {label:<86}    n/a (trainer.cache.{name} not found)")
            else:
                print(f"  {label:<86} {v:6.2f}s {v / phase * 100:5.1f}%")
                breakdown.append({"part": label, "seconds": v, "share": v / phase})
        worker = statistics.median(j["cpu"].children for j in jobs)
        own = statistics.median(j["cpu"].own for j in jobs)
        first = [j.get("first_batch_s") for j in jobs if j.get("first_batch_s") is not None]
        print(f"  CPU: main process {own:.2f}s over the whole call (incl. model loading, median "
              f"{statistics.median(j['startup_s'] for j in jobs):.2f}s wall), DataLoader workers {worker:.2f}s "
              f"({worker / args.num * 1e3:.2f} ms/img) on {avail} cores"
              + (f"; first batch written {statistics.median(first):.2f}s after the loader was created" if first else ""))
        bare_s = args.num / statistics.median(bare)
        print(f"  for comparison, (b) encodes the same images in {bare_s:.2f}s and (b') in "
              f"{args.num / statistics.median(bare_te):.2f}s")
        if device.type == "cpu":
            # Where the encoder itself keeps every core busy, CPU work the bare loop does not do
            # lengthens the job one for one: torch's parallel ops wait for whichever of their
            # threads a worker displaced (measured: the job's VAE calls are slower by about the
            # workers' CPU time). Decoding and the text encoder are work the job must do.
            ceiling = bare_s / (bare_s + worker + med("text"))
            print(f"  ceiling on this CPU: decoding in the workers ({worker:.2f}s of CPU) and the text encoder "
                  f"({med('text'):.2f}s), which the bare loop does not run, cap job/(b) at {ceiling:.2f} "
                  "before any cost of the job's own")
    quarantined = [line for j in jobs for line in j["log"].splitlines() if line.startswith("quarantined")]
    if quarantined:
        print(f"note: the job quarantined {len(quarantined)} samples, e.g. {quarantined[0]}")
    noisy = [label for label, s, _ in rows if s["spread"] > 0.10]
    others = [c.other for cpus in (bare_cpu, bare_te_cpu, [j["cpu"] for j in jobs]) for c in cpus if c.other is not None]
    busy = max(others, default=0.0)
    noisy_note(([f"spread > 10% in {len(noisy)} of {len(rows)} rows"] if noisy else [])
               + ([f"other processes used up to {busy:.1f} of {avail} cores"] if busy > 0.5 else []),
               "the per-repeat side-by-side ratios are the more robust figure")

    write_json(args.json, "cache_throughput", start, {
        "settings": {**vars(args), "dtype": str(dtype)}, "rows": [{"label": label, "images_per_s": st} for label, st, _ in rows],
        "ratio_job_over_bare": ratios["(b)"], "ratio_job_over_bare_with_text": ratios["(b')"], "target": TARGET,
        "fixed_cost_s": fixed, "cache_kb_per_sample": sample_kb, "breakdown": breakdown, "worker_cpu_s": worker,
        "ceiling_on_cpu": ceiling, "noisy": bool(noisy or busy > 0.5), "other_cores_max": max(others) if others else None},
        device=str(device))


if __name__ == "__main__":
    main()
