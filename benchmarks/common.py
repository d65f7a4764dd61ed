"""What the benchmarks share: the machine and how busy it was, repeated measurements, the report's
header and JSON, synthetic shards written by the data pipeline's own functions, and the UNet
job's training step built by the trainer's own functions (trainer/unet/step.py), never a copy."""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --- the machine ---------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_busy_seconds() -> float | None:
    """CPU seconds all CPUs spent busy (or stolen by the hypervisor) since boot (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...: everything but idle and iowait
        return (sum(v[:8]) - v[3] - v[4]) / TICK
    except (OSError, IndexError, ValueError):
        return None


class CpuWindow:
    """The CPU a `with` block used: `wall` seconds, `own` and `children` CPU seconds (this process's,
    its reaped children's: DataLoader workers once joined, launched ranks), `cores` (both per wall
    second) and `other`, the cores the rest of the machine used meanwhile (None off Linux)."""

    @staticmethod
    def _cpu() -> tuple[float, float]:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime

    def __enter__(self):
        self.m0, (self.s0, self.c0), self.t0 = machine_busy_seconds(), self._cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        (s1, c1), m1 = self._cpu(), machine_busy_seconds()
        self.own, self.children = s1 - self.s0, c1 - self.c0
        used = self.own + self.children
        self.cores = used / self.wall
        self.other = None if self.m0 is None or m1 is None else max(0.0, (m1 - self.m0 - used) / self.wall)


def run_group(cmd: list[str], timeout_s: int, **kwargs) -> tuple[int | None, str, str]:
    """(status, stdout, stderr) of `cmd` in its own process group; past the timeout the whole group
    (DataLoader workers, DeepSpeed ranks) is killed and the status is None."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout_s)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, f"{err}\ntimed out after {timeout_s}s (--timeout)"


# --- the report ----------------------------------------------------------------------------------
def stats(values: list[float]) -> dict:
    """Median, min, max, spread ((max - min) / median) and the values of repeated measurements."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / med if med else 0.0, "values": values}


def started() -> tuple:
    """(when the run started, the load average before it or None): taken first thing."""
    return datetime.datetime.now().astimezone(), os.getloadavg() if hasattr(os, "getloadavg") else None


def header(title: str, start: tuple, *, machine: str = "", software: str = "") -> None:
    """The lines every report starts with: what ran, when, on what, with what, how busy the machine was."""
    when, load = start
    print(title)
    print(f"date:     {when.isoformat(timespec='seconds')}")
    print(f"machine:  {cpu_model()}, {os.cpu_count()} logical CPUs ({usable_cpus()} usable), {platform.system()} "
          f"{platform.machine()}{machine}")
    print(f"software: python {platform.python_version()}, {software}")
    if load is not None:
        print(f"load avg: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min, before the run)")


def write_json(path: str, benchmark: str, start: tuple, figures: dict, **machine) -> None:
    """A benchmark's figures for `--json` (read by run_all.py), with its name, date and machine; nothing
    without a path."""
    if not path:
        return
    import torch

    out = {"benchmark": benchmark, "date": start[0].isoformat(timespec="seconds"),
           "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": usable_cpus(),
                       "torch": torch.__version__, "torch_threads": torch.get_num_threads(), **machine}, **figures}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"figures written to {path}")


def noisy_note(reasons: list[str], robust: str) -> None:
    """The line a report prints when its figures are noisy (spread, other processes on the cores)."""
    if reasons:
        print(f"note: noisy figures ({'; '.join(reasons)}): take the absolute rates as rough; {robust}")


# --- synthetic shards ----------------------------------------------------------------------------
def _write_counted(samples, out: str, per_shard: int, prefix: str) -> tuple[list[str], list[int], int]:
    """data_pipeline.shards.write_shards; (urls, samples per shard, bytes of the sample fields)."""
    from data_pipeline.shards import write_shards

    seen = {"samples": 0, "bytes": 0}

    def tally(it):
        for s in it:
            seen["samples"] += 1
            seen["bytes"] += sum(len(v) for k, v in s.items() if not k.startswith("__"))
            yield s
    urls = write_shards(tally(samples), out, per_shard, prefix=prefix)
    counts = [per_shard] * (len(urls) - 1) + [seen["samples"] - per_shard * (len(urls) - 1)]
    return urls, counts, seen["bytes"]


def image_shards(out: str, num: int, per_shard: int, draw_size: int, *, unique: int = 0, seed: int = 0):
    """`num` samples of the embedded data set (data_pipeline.synthetic, as launch/make_synthetic.py
    writes them) in shards; with `unique`, only that many distinct drawings, repeated under new keys
    (decoding costs the same). (urls, samples per shard, bytes)."""
    from data_pipeline import synthetic

    pool = [synthetic.sample(seed, i, draw_size) for i in range(min(num, unique))] if unique else None

    def samples():
        for i in range(num):
            yield {**pool[i % len(pool)], "__key__": f"{i:08d}"} if pool else synthetic.sample(seed, i, draw_size)
    return _write_counted(samples(), out, per_shard, "shapes")


def latent_shards(out: str, num: int, per_shard: int, latent_shape, text_emb_shape, seed: int = 0):
    """`num` latent-cache samples (data_pipeline.latents.encode_sample: the cache job's format) with
    random fp16 moments and text embeddings, not VAE-encoded. (urls, samples per shard, bytes)."""
    import numpy as np
    import torch

    from data_pipeline import synthetic
    from data_pipeline.latents import encode_sample

    rng = np.random.default_rng(seed)
    n_lat, n_emb = int(np.prod(latent_shape)), int(np.prod(text_emb_shape))
    # One random pool, sliced at random offsets: distinct samples without drawing ~10^8 normals.
    pool = torch.from_numpy(rng.standard_normal(4 * (2 * n_lat + n_emb), dtype=np.float32)).half()

    def samples():
        for i in range(num):
            o = rng.integers(0, len(pool) - 2 * n_lat - n_emb, size=3)
            tensors = {"mean": pool[o[0]:o[0] + n_lat].reshape(latent_shape).clone(),  # slices share the pool
                       "std": pool[o[1]:o[1] + n_lat].abs().add(0.01).reshape(latent_shape),
                       "text_emb": pool[o[2]:o[2] + n_emb].reshape(text_emb_shape).clone()}
            yield encode_sample(f"{i:08d}", tensors, synthetic.caption(synthetic.attributes(seed, i)),
                                {"original_size": [512, 512]})
    return _write_counted(samples(), out, per_shard, "latents")


# --- the UNet job's training step, on batches held in memory ------------------------------------
def cache_batches(count: int, batch: int, latent_shape, text_emb_shape, *, seed: int = 0, device="cpu",
                  pooled_dim: int = 0) -> list[dict]:
    """`count` batches shaped as the UNet job's loader hands them over from a latent cache: fp16
    posterior moments `mean`, `std` and text embeddings `text_emb`, random; `bytes` 0 (nothing read).
    With `pooled_dim` (SDXL) also the pooled embedding and time_ids of square, uncropped images."""
    import torch

    g = torch.Generator().manual_seed(seed)
    side = latent_shape[-1] * 8
    out = []
    for _ in range(count):
        b = {"mean": torch.randn((batch, *latent_shape), generator=g).half().to(device),
             "std": (torch.rand((batch, *latent_shape), generator=g) * 0.1 + 0.01).half().to(device),
             "text_emb": torch.randn((batch, *text_emb_shape), generator=g).half().to(device), "bytes": 0}
        if pooled_dim:
            b["pooled"] = torch.randn((batch, pooled_dim), generator=g).half().to(device)
            b["time_ids"] = torch.tensor([[side, side, 0, 0, side, side]] * batch, dtype=torch.float32, device=device)
        out.append(b)
    return out


def unet_trainer(job, latent_shape, text_emb_shape, *, world_size: int = 1, rank: int = 0, scale: float = 1.0,
                 text_encoder=None, ds_config: dict | None = None, pooled_dim: int = 0):
    """(engine, step set-up) of the UNet job `job` (a trainer.unet.job.UNetJob) on `latent_shape` latents
    with `text_emb_shape` context, built by the trainer's own functions: pass them to
    trainer.unet.step.train_step. The normalisation is shift 0 and `scale` (the VAE's factor where
    there is a VAE; its value does not change the cost); the empty caption is zeros."""
    import torch

    from trainer.core import dist
    from trainer.core.engine import resolve_precision
    from trainer.unet.step import DTYPES, build_unet_engine, step_setup, unet_ds_config

    precision = resolve_precision(job.precision)
    channels, size, _ = latent_shape
    engine = build_unet_engine(job, channels, size, text_emb_shape[-1],
                               ds_config or unet_ds_config(job, world_size, precision), pooled_dim)
    device, dtype = dist.device(), DTYPES[precision]
    setup = step_setup(job, rank=rank, device=device, dtype=dtype, shift=torch.zeros((), device=device),
                       scale=torch.tensor(scale, device=device),
                       empty=torch.zeros(text_emb_shape, device=device, dtype=dtype), text_encoder=text_encoder,
                       empty_pooled=torch.zeros(pooled_dim, device=device, dtype=dtype) if pooled_dim else None)
    return engine, setup


class Stepper:
    """The UNet job's engine (`unet_trainer`) stepped by trainer.unet.step.train_step on `count`
    random cache batches held on its device (`cache_batches`), cycled."""

    def __init__(self, job, latent_shape, text_emb_shape, *, count: int = 1, seed: int = 0, **trainer):
        import itertools

        from trainer.unet.step import train_step

        self.train_step = train_step
        self.engine, self.setup = unet_trainer(job, latent_shape, text_emb_shape, **trainer)
        self.batch, self.i = job.batch_per_rank, 0
        self.params = sum(p.numel() for p in self.engine.module.parameters())
        self.batches = itertools.cycle(cache_batches(count, self.batch, latent_shape, text_emb_shape, seed=seed,
                                                     device=self.setup.device,
                                                     pooled_dim=trainer.get("pooled_dim", 0)))

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.train_step(self.engine, self.batches, self.i, self.setup)
            self.i += 1

    def window(self, seconds: float, min_steps: int = 1) -> tuple[int, CpuWindow]:
        """(steps, their CpuWindow): at least `min_steps` steps and `seconds` seconds."""
        n = 0
        with CpuWindow() as cpu:
            while n < min_steps or time.perf_counter() - cpu.t0 < seconds:
                self.step()
                n += 1
        return n, cpu
