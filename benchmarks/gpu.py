"""UNet training speed on one CUDA GPU, through the trainer's own step, beside the plain PyTorch step, the
diffusers example script's step and the cache job's encoders: the figures issue #26 asks for.

    python benchmarks/gpu.py --json docs/gpu/h100_DATE.json      # the whole table, one run of about 8 minutes
    python benchmarks/gpu.py --only sd15_512,reference,diffusers   # some rows
    python benchmarks/gpu.py --smoke                               # every row on the CPU at toy sizes (tests)

Rows (--only takes their names): SD 1.5 at 512 px batch 16 at ZeRO-0 eager (`sd15_512`), compiled
(`sd15_512_compiled`) and at ZeRO-2 (`sd15_512_zero2`); SD 1.5 at 256 px batch 64 (`sd15_256`, compiled);
SD 2.1 at 768 px (`sd21_768`); SDXL at 1024 px without and with gradient checkpointing, each at the
largest batch of its list that fits (`sdxl_1024`, `sdxl_1024_ckpt`); the plain PyTorch step
(benchmarks/reference_step.py, `reference`) and diffusers' train_text_to_image.py step
(benchmarks/peer_step.py, `diffusers`) on the SD 1.5 UNet at 512 px batch 16; the cache job's encoders
at 512 px (SD's VAE encoder and CLIP ViT-L text tower, bf16, batch 32, `cache`). Weights are random:
speed does not depend on their values. Each row's engine is released (and the memory left behind
recorded) before the next; peak memory is counted from what was allocated when the row started.
The JSON is rewritten after every row, so a run cut short keeps what it measured; rows past --budget-s
are skipped, not started. After the timed steps of `sd15_512`, two more are profiled: the top
kernels by GPU time and the host gap (wall time the GPU had no kernel to run).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time

import torch

TARGETS = {"sd15_512_images_per_s": 110.0, "sd15_256_images_per_s": 550.0, "sdxl_mfu": 0.35,
           "vs_diffusers": 1.4, "vs_reference_time": 1.05}  # issue #26, one H100
CONTEXT = {"sd15": 768, "sd21": 1024, "sdxl": 2048, "tiny": 32, "tiny_sdxl": 80}
POOLED = {"sdxl": 1280, "tiny_sdxl": 40}
SMOKE = {"sd15": "tiny", "sd21": "tiny", "sdxl": "tiny_sdxl"}  # --smoke: each preset's CPU-sized stand-in


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    kind: str  # framework | reference | diffusers | cache
    preset: str = "sd15"
    resolution: int = 512
    batches: tuple[int, ...] = (16,)  # tried in order until one fits
    compile: bool = False
    checkpointing: bool = False
    zero_stage: int = 0


ROWS = [Row("sd15_512", "framework"), Row("sd15_512_compiled", "framework", compile=True),
        Row("sd15_512_zero2", "framework", zero_stage=2),
        Row("sd15_256", "framework", resolution=256, batches=(64,), compile=True),
        Row("sd21_768", "framework", preset="sd21", resolution=768, batches=(16, 8)),
        Row("sdxl_1024", "framework", preset="sdxl", resolution=1024, batches=(16, 8, 4, 2), compile=True),
        Row("sdxl_1024_ckpt", "framework", preset="sdxl", resolution=1024, batches=(32, 16, 8), compile=True,
            checkpointing=True),
        Row("reference", "reference"), Row("diffusers", "diffusers"), Row("cache", "cache", batches=(32,))]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma list of row names (default: every row)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--budget-s", type=float, default=480.0, help="start no row after this many seconds")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="override the device's dense bf16 peak")
    p.add_argument("--smoke", action="store_true", help="every row on the CPU at toy sizes, compile with aot_eager")
    p.add_argument("--json", default="", help="write the figures here (after every row)")
    args = p.parse_args(argv)
    names = [r.name for r in ROWS]
    args.only = [v.strip() for v in args.only.split(",") if v.strip()] or names
    bad = [v for v in args.only if v not in names]
    if bad:
        p.error(f"--only: unknown row {bad[0]!r}; rows: {', '.join(names)}")
    if args.steps <= 0 or args.warmup < 0 or args.budget_s <= 0:
        p.error("--steps and --budget-s must be positive, --warmup >= 0")
    return args


def sized(row: Row, smoke: bool) -> Row:
    """--smoke: the row at a CPU-sized preset, 64 px, batch 2."""
    if not smoke:
        return row
    return dataclasses.replace(row, preset=SMOKE[row.preset], resolution=64, batches=(2,))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, device, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):  # each step timed to its last kernel: the host may not run ahead across steps here
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def profile_summary(step, device, steps: int = 2) -> dict:
    """Top kernels by device time and the host gap over `steps` steps (CPU ops on a CPU run)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    wall_us = (time.perf_counter() - t0) * 1e6
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:10]
    busy_us = sum(e.self_device_time_total for e in events) if cuda else None
    return {"steps": steps, "wall_ms_per_step": wall_us / steps / 1e3,
            "device_busy_ms_per_step": busy_us / steps / 1e3 if busy_us is not None else None,
            "host_gap_share": 1 - busy_us / wall_us if busy_us is not None else None,
            "top": [{"name": e.key, "ms_per_step": getattr(e, key) / steps / 1e3, "calls_per_step": e.count / steps}
                    for e in top]}


def job_of(row: Row, batch: int, smoke: bool):
    from trainer.unet.job import UNetJob

    return UNetJob(model=row.preset, batch_per_rank=batch, zero_stage=row.zero_stage, precision="bf16", lr=1e-5,
                   attention="sdpa", channels_last=True, gradient_checkpointing=row.checkpointing, compile=row.compile,
                   compile_backend="aot_eager" if smoke else "inductor", ema_halflife_samples=100_000)


def make_step(row: Row, batch: int, args):
    """(step callable, flops per image) of one row at one batch size; built here so that it can be released."""
    from common import Stepper, cache_batches  # benchmarks/common.py
    from trainer.core.flops import unet_train_flops_per_sample

    side, ctx, pooled = row.resolution // 8, CONTEXT[row.preset], POOLED.get(row.preset, 0)
    if row.kind == "cache":
        return cache_step(row, batch, args.smoke)
    from models.unet import build_unet

    with torch.device("meta"):
        flops = unet_train_flops_per_sample(build_unet(row.preset, 4, side, ctx, pooled_dim=pooled), (4, side, side),
                                            (77, ctx), batch_size=1)
    job = job_of(row, batch, args.smoke)
    if row.kind == "framework":
        from trainer.core.ema import EMA

        stepper = Stepper(job, (4, side, side), (77, ctx), pooled_dim=pooled)
        ema = EMA(stepper.engine.module, job.ema_halflife_samples, job.ema_rampup_ratio)

        def step():  # the loop's body: step, EMA (the tally's few ops left out)
            stepper.step()
            ema.update(stepper.i * batch, batch)
        return step, flops
    from trainer.core import dist
    from trainer.core.engine import resolve_precision
    from trainer.unet.pretrained import build_model, training_schedule
    from trainer.unet.step import DTYPES, prepare_unet, step_setup

    device = dist.device()
    unet = prepare_unet(build_model(job, 4, side, ctx, pooled), job).to(device)
    data = cache_batches(1, batch, (4, side, side), (77, ctx), device=device)[0]
    if row.kind == "reference":
        from reference_step import ReferenceStep

        unet.to(memory_format=torch.channels_last)
        setup = step_setup(job, rank=0, device=device, dtype=DTYPES[resolve_precision("bf16")],
                           shift=torch.zeros((), device=device), scale=torch.tensor(0.18215, device=device),
                           empty=torch.zeros((77, ctx), device=device))
        ref = ReferenceStep(unet, setup, lr=job.lr, betas=job.betas, weight_decay=job.weight_decay,
                            grad_clip=job.grad_clip, ema_decay=0.9999, bf16=True)
        counter = iter(range(10**9))
        return (lambda: ref.step(data, next(counter))), flops
    from peer_step import DiffusersScriptStep

    peer = DiffusersScriptStep(unet, training_schedule(job), device, bf16=True, lr=job.lr, grad_clip=job.grad_clip)
    return (lambda: peer.step(data)), flops


def cache_step(row: Row, batch: int, smoke: bool):
    """The cache job's encoders at `row.resolution`: SD's VAE encoder (posterior moments) and CLIP ViT-L's text
    tower in bf16 (random weights), as trainer/cache/job.py runs them; flops per image of both."""
    import open_clip

    from models.autoencoder import build_autoencoder, encode_moments
    from trainer.core import dist
    from trainer.core.flops import forward_flops_per_sample

    device = dist.device()
    vae = build_autoencoder("tiny_f8" if smoke else "sd").to(device, torch.bfloat16).eval()
    cfg = open_clip.get_model_config("ViT-L-14")["text_cfg"]
    if smoke:
        cfg = dict(cfg, width=64, heads=2, layers=2)
    tower = open_clip.model._build_text_tower(768, open_clip.model.CLIPTextCfg(**cfg)).to(device, torch.bfloat16)
    pixels = torch.randn(batch, 3, row.resolution, row.resolution, device=device, dtype=torch.bfloat16)
    tokens = torch.randint(0, 49408, (batch, 77), device=device)

    @torch.no_grad()
    def step():
        encode_moments(vae, pixels)
        tower(tokens)
    flops = forward_flops_per_sample(lambda: (encode_moments(vae, pixels[:1]), tower(tokens[:1])), 1)
    return step, flops


def run_row(row: Row, args, peak, device) -> dict:
    from trainer.core.flops import Throughput

    out = dataclasses.asdict(row)
    for batch in row.batches:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        step = None
        try:
            step, flops = make_step(row, batch, args)
            times = timed(step, device, args.steps, args.warmup)
            profile = profile_summary(step, device) if row.name == "sd15_512" else None
        except torch.cuda.OutOfMemoryError:
            out.setdefault("out_of_memory_at", []).append(batch)
            continue
        except Exception as e:  # noqa: BLE001 -- one row's failure is recorded; the other rows still run
            out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            return out
        finally:
            peak_b = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
            del step
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        step_s = statistics.median(times)
        tp = Throughput(flops, peak)
        out.update(batch=batch, step_ms=step_s * 1e3, step_ms_spread=(max(times) - min(times)) / step_s,
                   images_per_s=batch / step_s, gflop_per_image=flops / 1e9, tflops=tp.tflops(batch / step_s),
                   mfu=tp.mfu(batch / step_s), peak_memory_gb=(peak_b - base) / 1e9,
                   left_behind_gb=((torch.cuda.memory_allocated() - base) / 1e9) if device.type == "cuda" else None)
        if profile:
            out["profile"] = profile
        return out
    out["error"] = "out of memory at every batch tried"
    return out


def verdicts(rows: dict) -> dict:
    """Each target of issue #26 against the rows measured: {target: (measured, goal, met)}."""
    got, t = {}, TARGETS

    def rate(name):
        return rows.get(name, {}).get("images_per_s")
    best512 = max(filter(None, (rate("sd15_512"), rate("sd15_512_compiled"))), default=None)
    if best512:
        got["sd15_512_images_per_s"] = (best512, t["sd15_512_images_per_s"], best512 >= t["sd15_512_images_per_s"])
    if rate("sd15_256"):
        got["sd15_256_images_per_s"] = (rate("sd15_256"), t["sd15_256_images_per_s"],
                                        rate("sd15_256") >= t["sd15_256_images_per_s"])
    mfus = [rows[n]["mfu"] for n in ("sdxl_1024", "sdxl_1024_ckpt") if rows.get(n, {}).get("mfu")]
    if mfus:
        got["sdxl_mfu"] = (max(mfus), t["sdxl_mfu"], max(mfus) >= t["sdxl_mfu"])
    if best512 and rate("diffusers"):
        got["vs_diffusers"] = (best512 / rate("diffusers"), t["vs_diffusers"], best512 / rate("diffusers") >= 1.4)
    if rate("sd15_512") and rate("reference"):
        ratio = rate("reference") / rate("sd15_512")  # framework time / reference time, same batch
        got["vs_reference_time"] = (ratio, t["vs_reference_time"], ratio <= t["vs_reference_time"])
    return got


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("error: benchmarks/gpu.py needs a CUDA GPU (none visible); --smoke runs it on the CPU at toy sizes")
    from common import started, write_json  # benchmarks/common.py
    from trainer.core import dist
    from trainer.core.flops import device_peak_tflops

    start, t0 = started(), time.time()
    dist.init()
    device = dist.device()
    peak = device_peak_tflops("bf16", args.peak_tflops)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (--smoke)"
    print(f"device: {name}, dense bf16 peak {peak or 'unknown'} TFLOP/s; torch {torch.__version__}")
    rows = {}
    for row in (sized(r, args.smoke) for r in ROWS if r.name in args.only):
        if time.time() - t0 > args.budget_s:
            rows[row.name] = {**dataclasses.asdict(row), "error": f"skipped: past --budget-s {args.budget_s:.0f}"}
        else:
            rows[row.name] = run_row(row, args, peak, device)
        r = rows[row.name]
        if "error" in r:
            print(f"{row.name:18} {r['error']}")
        else:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
            print(f"{row.name:18} batch {r['batch']:3}: {r['images_per_s']:8.1f} images/s  {r['step_ms']:8.1f} ms/step "
                  f"(spread {r['step_ms_spread']:.0%})  {r['tflops']:6.1f} TFLOP/s  MFU {mfu:>6}  "
                  f"peak {r['peak_memory_gb']:.1f} GB", flush=True)
        write_json(args.json, "gpu", start, {"device": name, "peak_tflops": peak, "torch": torch.__version__,
                                             "smoke": args.smoke, "rows": list(rows.values()),
                                             "targets": {k: dict(measured=m, goal=g, met=ok)
                                                         for k, (m, g, ok) in verdicts(rows).items()}})
    print("targets (issue #26):")
    for key, (measured, goal, met) in verdicts(rows).items():
        print(f"  {key:24} {measured:9.3f}  goal {goal}  {'met' if met else 'MISSED'}")
    if "sd15_512" in rows and rows["sd15_512"].get("profile"):
        p = rows["sd15_512"]["profile"]
        gap = f", host gap {p['host_gap_share']:.0%}" if p["host_gap_share"] is not None else ""
        print(f"sd15_512 profile: {p['wall_ms_per_step']:.1f} ms per step{gap}; top: "
              + ", ".join(f"{e['name']} {e['ms_per_step']:.1f} ms" for e in p["top"][:5]))


if __name__ == "__main__":
    main()
