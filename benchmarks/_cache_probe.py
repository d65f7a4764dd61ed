"""The job half of benchmarks/cache_throughput.py: the real cache job run with timing wrappers
around the names trainer/cache/job.py looks up, and the CPU its runs used (see that script)."""
from __future__ import annotations

import contextlib
import io
import time

import trainer.cache.job as cache_mod
from common import CpuWindow  # benchmarks/common.py
from trainer.cache.job import CacheJob, cache_latents
from trainer.cache.manifest import Manifest
from trainer.core.data import ImageData


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

        def timed(key):  # a function wrapped to add its time to probe.<key>
            def wrap(fn):
                def wrapped(*a, **k):
                    t = time.perf_counter()
                    try:
                        return fn(*a, **k)
                    finally:
                        setattr(probe, key, getattr(probe, key) + time.perf_counter() - t)
                return wrapped
            return wrap

        def encoder(orig):
            class Encoder(orig):  # the job calls the instance: its class's __call__ is timed
                __call__ = timed("vae")(orig.__call__)
            return Encoder

        def text_loader(orig):
            def wrapped(*a, **k):
                te = orig(*a, **k)
                te.encode = timed("text")(te.encode)
                return te
            return wrapped

        self._patch("shard_images_loader", loader)
        self._patch("tqdm", bar)
        self._patch("LatentEncoder", encoder)
        self._patch("load_text_encoder", text_loader)
        self._patch("_sha256", timed("sha"))
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
        cache_latents(cfg)
        t_end = time.perf_counter()
    written = Manifest.read(cfg.out_url, cfg.out_endpoint_url).num_samples
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
