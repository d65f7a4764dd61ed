"""The same UNet in pixel space and in f=8 latent space: FLOPs and step time per image (the 48x claim).

    .venv/bin/python benchmarks/pixel_vs_latent.py
    .venv/bin/python benchmarks/pixel_vs_latent.py --preset demo --resolution 64 --json runs/bench/pixel_vs_latent.json

Why
---
A latent diffusion model denoises 64x64x4 latents instead of 512x512x3 pixels: 48x fewer numbers
per image (512*512*3 / (64*64*4), at any resolution with f = 8 and 4 latent channels). Numbers
are not cost, though: convolutions cost in proportion to positions (64x fewer at f = 8, channel
counts inside the network unchanged), and self-attention in proportion to positions squared, so
the same architecture saves more than 48x wherever it has attention at high resolution.

What is measured
----------------
(a) FLOPs per image of one training step (forward + backward; trainer/core/flops.py: matmuls,
    convolutions and attention) of the same UNet preset built for 3-channel pixels at H x H and
    for 4-channel latents at H/8 x H/8, counted on shape-only (meta-device) models, at
    --resolution and at each of --flop-resolutions, for each of --flop-presets.
(b) Step time per image at --resolution (CPU-sized: 64 px pixels against 8 px latents by
    default): the trainer's loss (models.diffusion.training_loss), backward, gradient clipping,
    AdamW, loss.item(), on random inputs and text embeddings in memory. Pixel and latent steps
    alternate (order reversed every other repeat), each window at least --seconds long and at
    least one step, after one warm-up step each; per image = window time / images in it. The
    pixel step runs at --pixel-batch (it is memory- and time-hungry), the latent step at
    --latent-batch (the demo's batch), each the batch that space would train at on this
    machine; the figure is the median of the per-repeat ratios. torch runs with --threads
    threads (1 by default: steadier on a shared machine, and the ratio is what is quoted).
The ratio of the measured times next to the FLOP ratio says how far the CPU's efficiency differs
between the two shapes (long attention sequences and wide activations at full resolution run at
a different FLOP rate from the small latent tensors).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from common import cpu_model, machine_busy_seconds, write_json  # noqa: E402  (benchmarks/common.py)

from torch.utils import flop_counter  # noqa: E402

from models.diffusion import noise_schedule, training_loss  # noqa: E402
from models.unet import PRESETS, build_unet  # noqa: E402
from trainer.core.flops import unet_train_flops_per_sample  # noqa: E402

FACTOR, LATENT_CHANNELS, PIXEL_CHANNELS = 8, 4, 3
# preset -> (context tokens, width): the tiny text tower for the CPU presets, CLIP/OpenCLIP for SD.
CONTEXT = {"tiny": (32, 64), "demo": (32, 64), "sd15": (77, 768), "sd21": (77, 1024)}


def numbers_ratio(resolution: int) -> float:
    """Pixel numbers per image over latent numbers per image: 48 whenever f = 8 and 4 channels."""
    side = resolution // FACTOR
    return PIXEL_CHANNELS * resolution ** 2 / (LATENT_CHANNELS * side ** 2)


def _count(unet, shape: tuple[int, int, int], ctx: tuple[int, int]) -> tuple[float, float]:
    """(training FLOPs per image, share of them in attention's batched matmuls) for one model.

    The total is trainer/core/flops.py's; an outer counter splits it by operator: on the meta device
    attention runs as its math decomposition (two bmm per head group), so bmm is attention."""
    with flop_counter.FlopCounterMode(display=False) as outer:
        total = unet_train_flops_per_sample(unet, shape, ctx, batch_size=1)
    ops = outer.get_flop_counts().get("Global", {})
    attention = sum(v for k, v in ops.items() if "bmm" in str(k) or "scaled_dot_product" in str(k))
    return total, attention / total if total else 0.0


def flops_pair(preset: str, resolution: int) -> dict:
    """Pixel and latent training FLOPs per image of `preset` at `resolution` px, on the meta device."""
    ctx = CONTEXT[preset]
    side = resolution // FACTOR
    with torch.device("meta"):
        pixel = build_unet(preset, PIXEL_CHANNELS, resolution, ctx[1])
        latent = build_unet(preset, LATENT_CHANNELS, side, ctx[1])
    px, px_att = _count(pixel, (PIXEL_CHANNELS, resolution, resolution), ctx)
    lat, lat_att = _count(latent, (LATENT_CHANNELS, side, side), ctx)
    return {"preset": preset, "resolution": resolution, "pixel_flops": px, "latent_flops": lat, "ratio": px / lat,
            "numbers_ratio": numbers_ratio(resolution), "pixel_attention_share": px_att,
            "latent_attention_share": lat_att}


class Stepper:
    """One space's model, optimizer and in-memory batch; `window()` times steps for >= seconds."""

    def __init__(self, preset: str, channels: int, side: int, batch: int, seed: int):
        ctx = CONTEXT[preset]
        self.unet = build_unet(preset, channels, side, ctx[1], seed=seed)
        self.unet.train()
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=1e-4, weight_decay=0.01)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn((batch, channels, side, side), generator=g)
        self.context = torch.randn((batch, *ctx), generator=g)
        self.schedule = noise_schedule("epsilon")
        self.batch, self.i = batch, 0

    def step(self) -> float:
        gen = torch.Generator().manual_seed(self.i)
        self.i += 1
        loss = training_loss(self.unet, self.x, self.context, self.schedule, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def window(self, seconds: float) -> tuple[float, float, float | None]:
        """(seconds per image, CPU seconds per image, cores the rest of the machine used)."""
        n, m0, c0, t0 = 0, machine_busy_seconds(), time.process_time(), time.perf_counter()
        while n < 1 or time.perf_counter() - t0 < seconds:
            self.step()
            n += 1
        wall, cpu, m1 = time.perf_counter() - t0, time.process_time() - c0, machine_busy_seconds()
        other = None if m0 is None or m1 is None else max(0.0, (m1 - m0 - cpu) / wall)
        return wall / (n * self.batch), cpu / (n * self.batch), other


def _stats(values: list[float]) -> dict:
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / med if med else 0.0, "values": values}


def _resolutions(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated pixel sizes, got {text!r}") from None
    if not values or any(v < FACTOR or v % FACTOR for v in values):
        raise argparse.ArgumentTypeError(f"resolutions must be positive multiples of {FACTOR}, got {text!r}")
    return values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", choices=[k for k in PRESETS if k in CONTEXT],
                   help="UNet preset timed on the CPU (random init)")
    p.add_argument("--resolution", type=int, default=64, help="pixel side timed (latents: resolution / 8)")
    p.add_argument("--pixel-batch", type=int, default=2, help="images per pixel-space step")
    p.add_argument("--latent-batch", type=int, default=64, help="images per latent-space step")
    p.add_argument("--seconds", type=float, default=4.0, help="least length of each timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per space, alternating")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default, all cores)")
    p.add_argument("--flop-resolutions", type=_resolutions, default=[256, 512],
                   help="pixel sides at which FLOPs are also counted (comma-separated)")
    p.add_argument("--flop-presets", default="demo,sd21", help="UNet presets whose FLOPs are counted there")
    p.add_argument("--json", default="", metavar="OUT", help="also write the figures to this JSON file")
    args = p.parse_args()
    if args.resolution < FACTOR or args.resolution % FACTOR:
        p.error(f"--resolution must be a positive multiple of {FACTOR}, got {args.resolution}")
    if min(args.pixel_batch, args.latent_batch, args.repeats) < 1 or args.seconds < 0 or args.threads < 0:
        p.error("--pixel-batch, --latent-batch and --repeats must be positive, --seconds and --threads non-negative")
    flop_presets = [v.strip() for v in args.flop_presets.split(",") if v.strip()]
    bad = [v for v in flop_presets if v not in CONTEXT]
    if bad:
        p.error(f"--flop-presets: unknown {bad[0]!r}; choose from {', '.join(CONTEXT)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.datetime.now().astimezone()
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    side = args.resolution // FACTOR

    # --- (a) FLOPs, counted on shape-only models -----------------------------------------------
    t0 = time.perf_counter()
    pairs = [(args.preset, args.resolution)] + [(q, r) for q in flop_presets for r in args.flop_resolutions]
    flops = [flops_pair(preset, res) for preset, res in dict.fromkeys(pairs)]  # in order, each once
    count_s = time.perf_counter() - t0

    # --- (b) step time per image, alternating --------------------------------------------------
    spaces = {"pixel": Stepper(args.preset, PIXEL_CHANNELS, args.resolution, args.pixel_batch, seed=0),
              "latent": Stepper(args.preset, LATENT_CHANNELS, side, args.latent_batch, seed=0)}
    for s in spaces.values():
        s.step()  # warm-up: allocator, kernel selection
    per_image, cpu_per_image, other = ({k: [] for k in spaces} for _ in range(3))
    for r in range(args.repeats):
        for name in (list(spaces) if r % 2 == 0 else list(spaces)[::-1]):
            wall, cpu, busy = spaces[name].window(args.seconds)
            per_image[name].append(wall * 1e3)
            cpu_per_image[name].append(cpu * 1e3)
            if busy is not None:
                other[name].append(busy)
    ratios = [a / b for a, b in zip(per_image["pixel"], per_image["latent"])]
    cpu_ratios = [a / b for a, b in zip(cpu_per_image["pixel"], cpu_per_image["latent"])]
    measured = next(f for f in flops if f["preset"] == args.preset and f["resolution"] == args.resolution)

    # --- report ---------------------------------------------------------------------------------
    params = sum(q.numel() for q in spaces["latent"].unet.parameters())
    print("Pixel space versus f=8 latent space, same UNet (benchmarks/pixel_vs_latent.py)")
    print(f"date:     {started.isoformat(timespec='seconds')}")
    print(f"machine:  {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}")
    print(f"software: python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} torch "
          f"threads, fp32")
    if load0 is not None:
        print(f"load avg: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} (1/5/15 min, before the run)")
    print(f"numbers per image: pixels {PIXEL_CHANNELS}xHxW over latents {LATENT_CHANNELS}x(H/8)x(W/8) = "
          f"{numbers_ratio(512):.0f}x at every resolution (512x512x3 / 64x64x4 = 48: the claim)", end="\n\n")
    print(f"(a) training FLOPs per image (forward + backward), counted on meta-device models in {count_s:.1f}s")
    head = f"{'preset':<7} {'pixels':>7} {'latents':>8} {'pixel GFLOP':>13} {'latent GFLOP':>13} {'FLOP ratio':>11} " \
           f"{'numbers ratio':>14} {'attention share px/lat':>23}"
    print(head + "\n" + "-" * len(head))
    for f in flops:
        share = f"{f['pixel_attention_share'] * 100:.0f}% / {f['latent_attention_share'] * 100:.0f}%"
        print(f"{f['preset']:<7} {f['resolution']:>5}px {f['resolution'] // FACTOR:>6}px {f['pixel_flops'] / 1e9:>13.2f} "
              f"{f['latent_flops'] / 1e9:>13.3f} {f['ratio']:>10.1f}x {f['numbers_ratio']:>13.0f}x {share:>23}")
    print("(attention share: FLOPs in attention's score and value matmuls; convolutions scale with positions, "
          "attention with positions squared)")
    print()
    print(f"(b) step time per image, UNet {args.preset} ({params / 1e6:.2f}M params), {args.repeats} alternating windows "
          f"of >= {args.seconds:g}s per space after one warm-up step")
    head = f"{'space':<28} {'batch':>5} {'ms/image':>9} {'min-max':>17} {'spread':>7} {'CPU ms/image':>13} {'other':>6}"
    print(head + "\n" + "-" * len(head))
    labels = {"pixel": f"pixel  {PIXEL_CHANNELS}x{args.resolution}x{args.resolution}",
              "latent": f"latent {LATENT_CHANNELS}x{side}x{side}"}
    rows = {}
    for name, s in spaces.items():
        st = _stats(per_image[name])
        rows[name] = {"batch": s.batch, "ms_per_image": st, "cpu_ms_per_image": _stats(cpu_per_image[name]),
                      "other_cores_max": max(other[name]) if other[name] else None}
        rng = f"{st['min']:.2f}-{st['max']:.2f}"
        busy = "n/a" if not other[name] else f"{max(other[name]):.2f}"
        print(f"{labels[name]:<28} {s.batch:>5} {st['median']:>9.2f} {rng:>17} {st['spread'] * 100:>6.1f}% "
              f"{statistics.median(cpu_per_image[name]):>13.2f} {busy:>6}")
    ratio, cpu_ratio = _stats(ratios), _stats(cpu_ratios)
    print(f"(ms/image: median over the windows; CPU ms: this process's CPU time; other: cores the rest of the "
          f"machine used, highest window)", end="\n\n")
    print(f"ratio pixel / latent at {args.resolution}px vs {side}px:  step time per image {ratio['median']:.1f}x "
          f"(per repeat {', '.join(f'{v:.1f}' for v in ratios)}); by CPU time {cpu_ratio['median']:.1f}x; "
          f"FLOPs {measured['ratio']:.1f}x; numbers {numbers_ratio(args.resolution):.0f}x")
    eff = ratio["median"] / measured["ratio"]
    if eff > 1:
        why = (f"the pixel step is {measured['pixel_attention_share'] * 100:.0f}% attention by FLOPs, over "
               f"{args.resolution ** 2} tokens at the top level, which likely runs at a lower FLOP rate here than the "
               "latent step's convolutions and short attention")
    else:
        why = "the latent step's small tensors use the cores less well than the pixel step's large ones"
    print(f"the CPU ran the latent step at {eff:.2f}x the FLOP rate of the pixel step: {why}")
    busiest = max((v for vs in other.values() for v in vs), default=0.0)
    if ratio["spread"] > 0.10 or busiest > 0.5:
        print(f"note: noisy (spread {ratio['spread'] * 100:.0f}% of the per-repeat ratios, other processes up to "
              f"{busiest:.1f} cores): the CPU-time ratio is the steadier figure")

    if args.json:
        write_json(args.json, {"benchmark": "pixel_vs_latent", "date": started.isoformat(timespec="seconds"),
                               "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch": torch.__version__,
                                           "torch_threads": torch.get_num_threads()},
                               "settings": vars(args), "params": params, "flops": flops, "steps": rows,
                               "ratio_time": ratio, "ratio_cpu_time": cpu_ratio, "ratio_flops": measured["ratio"],
                               "numbers_ratio": numbers_ratio(args.resolution)})
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
