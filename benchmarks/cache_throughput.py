"""Latent-cache job throughput as a ratio to a bare `vae.encode` loop, measured side by side.

    .venv/bin/python benchmarks/cache_throughput.py
    .venv/bin/python benchmarks/cache_throughput.py --vae demo --resolution 64 --num 512
    .venv/bin/python benchmarks/cache_throughput.py --vae /models/sd-vae-ft-mse --resolution 256 --num 256
    .venv/bin/python benchmarks/cache_throughput.py --num 1024 --repeats 3 --json runs/bench/precompute.json

What is measured
----------------
(a)  the real job, `trainer.cache.job.cache_latents(CacheJob(...))`, end to end, into a fresh
     output directory each time: tar reading and image decoding in `--workers` DataLoader
     worker processes (`data.num_workers`), VAE encoding and caption encoding in this
     process, then safetensors serialisation, tar writing, the sha256 of each shard, the
     sidecars and manifest.json. Model loading is not part of the encode phase: the job's
     own call to `shard_images_loader` (made right after both models are loaded and the
     shards listed) is wrapped to note the time, and

         job img/s = N / (time cache_latents returns - time its loader is created).

     So the encode phase includes everything the job does per image plus its fixed costs
     after loading: starting the worker processes, the first batch's latency, and the
     manifest. Two more readings of the same runs are printed: "steady" counts only from
     the first to the last progress-bar update (the job's tqdm, wrapped to note times: no
     start-up, no first batch, no manifest), and "total" is the whole call including model
     loading. As a cross-check that needs no wrapping, the job is rerun once on its
     finished output (every shard has its sidecar, so it loads the models, starts and ends
     its workers and rewrites the manifest, but encodes nothing): "total - that" is the job
     with every fixed cost subtracted.
(b)  a bare loop over the same N images, decoded beforehand into tensors in memory:
     `vae.encode(x).latent_dist` in batches of `--batch`, same VAE, device and dtype as
     the job (`precision`: auto = fp32 on CPU, fp16 on GPU). Nothing else.
(b') the same loop plus `text_encoder.encode(captions)` per batch, with the job's text
     encoder: the job encodes captions too, in the same process, so (b') is the ceiling
     the job itself could reach if reading, decoding and writing cost nothing.

The three run alternately (order reversed every other repeat) `--repeats` times after
one warm-up each (the job's warm-up runs on a separate small shard); each row prints the
median, min-max and spread ((max - min) / median). "cores" is the CPU time the
measurement used per wall second (this process plus its DataLoader workers); "other" is
the CPU the rest of the machine used meanwhile (Linux /proc/stat, the highest repeat):
other jobs competing for the same cores.

torch uses its default number of threads here (all cores), which is what a user of the
job gets; `--threads` sets another number for this process (DataLoader workers always
run torch with one thread). The data is generated in a temporary directory and deleted
afterwards: the embedded data set's coloured shapes (`data_pipeline.synthetic`, as
launch/make_synthetic.py writes them) drawn at `--draw-size` px so that the resize to
`--resolution` runs as it does for real images. These flat-colour PNGs decode faster
than photos; the decode cost per image is printed so it can be compared.

Why the ratio matters, and how to read it
-----------------------------------------
The job's work that is not encoding (tar reads, image decoding, serialising and writing
the cache) should be hidden behind the encoder: decoding runs in worker processes while
this process encodes, and writing is cheap next to a VAE forward pass. Then the job runs
at the encoder's speed, and job/(b) is close to 1; the issue's target is >= 0.9 on CPU.
A lower ratio says the encoder waits for something, and the breakdown printed below the
ratios says what: the seconds the main process spent waiting for decoded batches, in the
VAE, in the text encoder, hashing shards, and the rest (stacking, stats, safetensors and
tar writing, sidecars, manifest). The waiting is split in two: until the first batch
arrives (worker start and pipeline fill: nothing can overlap the first batch's decoding),
and afterwards (receiving the later batches, which were decoded while the encoder ran:
what is left is the cost of handing them over between processes). On a CPU, the workers' decoding also competes
with the encoder's threads for the same cores: compare the workers' CPU seconds with the
wall time. job/(b') separates the text encoder, which the job must run, from overhead.
The ratios, not the absolute rates, are the figures to quote: absolute rates depend on
the CPU and on what else runs. This is a benchmark, not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from common import cpu_model, machine_busy_seconds, write_json  # noqa: E402  (benchmarks/common.py)

import trainer.cache.job as cache_mod  # noqa: E402
from data_pipeline import synthetic  # noqa: E402
from data_pipeline.images import image_and_caption  # noqa: E402
from data_pipeline.shards import iter_samples, write_shards  # noqa: E402
from models.autoencoder import PRESETS, downsample_factor, load_autoencoder  # noqa: E402
from models.text_encoder import load_text_encoder  # noqa: E402
from trainer.core import dist  # noqa: E402
from trainer.cache.job import CacheJob, cache_latents  # noqa: E402
from trainer.core.data import ImageData  # noqa: E402

TARGET = 0.9


# --- data --------------------------------------------------------------------------------
def write_images(out: str, num: int, per_shard: int, draw_size: int, seed: int = 0) -> tuple[list[str], int]:
    """`num` distinct samples of the embedded data set in shards; returns (urls, bytes of the PNGs)."""
    seen = {"bytes": 0}

    def samples():
        for i in range(num):
            s = synthetic.sample(seed, i, draw_size)
            seen["bytes"] += len(s["png"])
            yield s
    return write_shards(samples(), out, per_shard, prefix="shapes"), seen["bytes"]


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


# --- CPU accounting ----------------------------------------------------------------------


def _cpu() -> tuple[float, float]:
    """(this process's, its reaped children's) user + system CPU seconds. DataLoader workers
    are joined when the job's loader is exhausted, so they count as children afterwards."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime


class CpuWindow:
    def __enter__(self):
        self.m0, (self.s0, self.c0) = machine_busy_seconds(), _cpu()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        s1, c1 = _cpu()
        m1 = machine_busy_seconds()
        self.own, self.children = s1 - self.s0, c1 - self.c0
        used = self.own + self.children
        self.cores = used / self.wall
        self.other = None if self.m0 is None or m1 is None else max(0.0, (m1 - self.m0 - used) / self.wall)


# --- (a) the job, with timing hooks ------------------------------------------------------
class Probe:
    """Timing wrappers around the names trainer/cache/job.py looks up in its module: nothing
    else changes. A name the module no longer has is left alone and reported as n/a."""

    def __init__(self):
        self.t_loader = None
        self.updates: list[tuple[float, int]] = []
        self.wait = self.vae = self.text = self.sha = 0.0
        self.wait_fill = None  # of self.wait, the part until the first batch arrived
        self.found: set[str] = set()
        self._saved: dict[str, object] = {}

    def _patch(self, name: str, make):
        if hasattr(cache_mod, name):
            self._saved[name] = getattr(cache_mod, name)
            setattr(cache_mod, name, make(self._saved[name]))
            self.found.add(name)

    def __enter__(self):
        probe = self

        def loader(orig):
            def wrapped(*a, **k):
                probe.t_loader = time.perf_counter()
                return _TimedIterable(orig(*a, **k), probe)
            return wrapped

        def bar(orig):
            class Bar(orig):
                def __init__(self, *a, **k):
                    k["disable"] = True  # no progress bar in the benchmark's output
                    super().__init__(*a, **k)

                def update(self, n=1):
                    probe.updates.append((time.perf_counter(), n))
                    return super().update(n)
            return Bar

        def encoder(orig):
            class Encoder(orig):
                def __call__(self, x):
                    t = time.perf_counter()
                    try:
                        return super().__call__(x)
                    finally:
                        probe.vae += time.perf_counter() - t
            return Encoder

        def text_loader(orig):
            def wrapped(*a, **k):
                te = orig(*a, **k)
                encode = te.encode

                def timed(captions):
                    t = time.perf_counter()
                    try:
                        return encode(captions)
                    finally:
                        probe.text += time.perf_counter() - t
                te.encode = timed
                return te
            return wrapped

        def sha(orig):
            def wrapped(*a, **k):
                t = time.perf_counter()
                try:
                    return orig(*a, **k)
                finally:
                    probe.sha += time.perf_counter() - t
            return wrapped

        self._patch("shard_images_loader", loader)
        self._patch("tqdm", bar)
        self._patch("LatentEncoder", encoder)
        self._patch("load_text_encoder", text_loader)
        self._patch("_sha256", sha)
        return self

    def __exit__(self, *exc):
        for name, value in self._saved.items():
            setattr(cache_mod, name, value)


class _TimedIterable:
    """The job's DataLoader, with the time spent waiting in next() added to probe.wait."""

    def __init__(self, loader, probe: Probe):
        self.loader, self.probe = loader, probe

    def __iter__(self):
        it = iter(self.loader)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.probe.wait += time.perf_counter() - t
                return
            self.probe.wait += time.perf_counter() - t
            # The job encodes each batch as it arrives, so the wait for the first one is the
            # pipeline filling up (worker start, first shard opened and decoded).
            if self.probe.wait_fill is None:
                self.probe.wait_fill = self.probe.wait
            yield item


def job_config(urls: str, out: str, args) -> CacheJob:
    return CacheJob(data=ImageData(urls=urls, resolution=args.resolution, num_workers=args.workers),
                    out_url=out, vae=args.vae_spec, text_encoder=args.text_encoder, batch_size=args.batch,
                    precision=args.precision)


def run_job(cfg: CacheJob, expect: int | None) -> dict:
    log = io.StringIO()
    with Probe() as probe, CpuWindow() as cpu, contextlib.redirect_stdout(log):
        t0 = time.perf_counter()
        manifest_url = cache_latents(cfg)
        t_end = time.perf_counter()
    with open(manifest_url) as f:
        written = json.load(f)["num_samples"]
    if expect is not None and written != expect:
        raise SystemExit(f"the job cached {written} samples, expected {expect}; its output:\n{log.getvalue()}")
    r = {"total_s": t_end - t0, "cpu": cpu, "written": written, "log": log.getvalue(),
         "wait": probe.wait, "wait_fill": probe.wait_fill, "vae": probe.vae, "text": probe.text, "sha": probe.sha, "found": probe.found}
    if probe.t_loader is not None:
        r["startup_s"] = probe.t_loader - t0
        r["phase_s"] = t_end - probe.t_loader
    if len(probe.updates) >= 2:
        (t_first, n_first), (t_last, _) = probe.updates[0], probe.updates[-1]
        r["steady_rate"] = (sum(n for _, n in probe.updates) - n_first) / max(1e-9, t_last - t_first)
        r["first_batch_s"] = t_first - probe.t_loader if probe.t_loader is not None else None
    return r


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


# --- report ------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict:
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / med if med else 0.0}


def _dtype(precision: str, device: torch.device) -> torch.dtype:
    """The job's rule (trainer/cache/job.py): auto is fp16 on a GPU, fp32 on the CPU."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


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

    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = datetime.datetime.now().astimezone()
    device = dist.device()
    dtype = _dtype(args.precision, device)

    with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmp:
        # --- data and models for the bare loops --------------------------------------------
        t = time.perf_counter()
        urls, png_bytes = write_images(os.path.join(tmp, "images"), args.num, args.per_shard, args.draw_size)
        write_images(os.path.join(tmp, "warmup"), 2 * args.batch, 2 * args.batch, args.draw_size, seed=1)
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
    ncpu = os.cpu_count()
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else ncpu
    hooked = "phase_s" in jobs[0]
    job_rates = [args.num / j["phase_s"] for j in jobs] if hooked else [args.num / (j["total_s"] - fixed) for j in jobs]
    rows = [
        ("(a)  job, encode phase" if hooked else "(a)  job, total - fixed cost", _stats(job_rates),
         [j["cpu"] for j in jobs]),
    ]
    if all("steady_rate" in j for j in jobs):
        rows.append(("(a)  job, steady (1st->last batch)", _stats([j["steady_rate"] for j in jobs]), None))
    rows.append(("(a)  job, total incl. model loading", _stats([args.num / j["total_s"] for j in jobs]), None))
    if hooked:
        rows.append(("(a)  job, total - fixed cost", _stats([args.num / max(1e-9, j["total_s"] - fixed) for j in jobs]),
                     None))
    rows += [("(b)  bare vae.encode", _stats(bare), bare_cpu),
             ("(b') bare vae.encode + text encoder", _stats(bare_te), bare_te_cpu)]

    te_shape = f"{text_encoder.context_length}x{text_encoder.width}"
    size = args.resolution // factor
    print("Latent-cache throughput: the job versus a bare encode loop (benchmarks/cache_throughput.py)")
    print(f"date:     {started.isoformat(timespec='seconds')}")
    print(f"machine:  {cpu_model()}, {ncpu} logical CPUs ({avail} usable), {platform.system()} {platform.machine()}; "
          f"encoders on {device}")
    print(f"software: python {platform.python_version()}, torch {torch.__version__}, torch threads "
          f"{torch.get_num_threads()} in this process ({'set by --threads' if args.threads else 'the default: all cores, what a user gets'}); "
          f"1 in each DataLoader worker; tensor sharing strategy {torch.multiprocessing.get_sharing_strategy()}")
    if load0 is not None:
        print(f"load avg: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} (1/5/15 min, before the run)")
    print(f"images:   synthetic shapes (data_pipeline.synthetic), {args.num} PNG {args.draw_size}px RGB in {len(urls)} "
          f"shards of {args.per_shard}, {png_bytes / args.num / 1e3:.1f} KB/image, decoded to {args.resolution}px; "
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
        ratios[name] = {**_stats(per), "per_repeat": per,
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
    if noisy or (others and max(others) > 0.5):
        why = ([f"spread > 10% in {len(noisy)} of {len(rows)} rows"] if noisy else []) + (
            [f"other processes used up to {max(others):.1f} of {avail} cores"] if others and max(others) > 0.5 else [])
        print(f"note: noisy figures ({'; '.join(why)}): take the absolute rates as rough; the per-repeat "
              "side-by-side ratios are the more robust figure")

    if args.json:
        write_json(args.json, {"benchmark": "cache_throughput", "date": started.isoformat(timespec="seconds"),
                               "machine": {"cpu": cpu_model(), "logical_cpus": ncpu, "usable_cpus": avail, "device": str(device),
                                           "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
                               "settings": {**{k: v for k, v in vars(args).items()}, "dtype": str(dtype)},
                               "rows": [{"label": label, "images_per_s": st} for label, st, _ in rows],
                               "ratio_job_over_bare": ratios["(b)"], "ratio_job_over_bare_with_text": ratios["(b')"],
                               "target": TARGET, "fixed_cost_s": fixed, "cache_kb_per_sample": sample_kb,
                               "breakdown": breakdown, "worker_cpu_s": worker, "ceiling_on_cpu": ceiling,
                               "noisy": bool(noisy or (others and max(others) > 0.5)),
                               "other_cores_max": max(others) if others else None})
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
