"""The same UNet in pixel space and in f=8 latent space: FLOPs and step time per image (the 48x claim).

    .venv/bin/python benchmarks/pixel_vs_latent.py
    .venv/bin/python benchmarks/pixel_vs_latent.py --preset demo --resolution 64 --json runs/bench/pixel_vs_latent.json

64x64x4 latents hold 48x fewer numbers than 512x512x3 pixels (at any resolution, f = 8 and 4
channels), but numbers are not cost: convolutions cost in proportion to positions (64x fewer),
self-attention to positions squared, so the same network saves more than 48x where it attends at
high resolution.

(a) Training FLOPs per image (forward + backward, trainer/core/flops.py) of the same UNet preset
    built for 3-channel pixels at H x H and 4-channel latents at H/8 x H/8, on shape-only (meta)
    models, at --resolution and each of --flop-resolutions for each of --flop-presets.
(b) Step time per image at --resolution: trainer.unet.step.train_step in the job's engine on random
    inputs in memory, pixel (--pixel-batch) and latent (--latent-batch) windows of at least
    --seconds alternating after one warm-up step each, with --threads torch threads (1: steadier on
    a shared machine). The figure is the median of the per-repeat ratios; beside the FLOP ratio it
    says how differently the CPU runs the two shapes.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import Stepper, header, started, stats, write_json  # benchmarks/common.py
from torch.utils import flop_counter

from models.unet import PRESETS, build_unet
from trainer.core import dist
from trainer.core.flops import unet_train_flops_per_sample
from trainer.unet.job import UNetJob

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
    start = started()
    side = args.resolution // FACTOR

    # --- (a) FLOPs, counted on shape-only models -----------------------------------------------
    t0 = time.perf_counter()
    pairs = [(args.preset, args.resolution)] + [(q, r) for q in flop_presets for r in args.flop_resolutions]
    flops = [flops_pair(preset, res) for preset, res in dict.fromkeys(pairs)]  # in order, each once
    count_s = time.perf_counter() - t0

    # --- (b) step time per image, alternating --------------------------------------------------
    dist.init()
    ctx = CONTEXT[args.preset]
    spaces = {name: Stepper(UNetJob(model=args.preset, batch_per_rank=batch, precision="fp32", lr=1e-4, seed=0),
                            (channels, s, s), ctx)  # the "moments" are the pixels or latents, with a small std
              for name, channels, s, batch in (("pixel", PIXEL_CHANNELS, args.resolution, args.pixel_batch),
                                               ("latent", LATENT_CHANNELS, side, args.latent_batch))}
    for s in spaces.values():
        s.step()  # warm-up: allocator, kernel selection
    per_image, cpu_per_image, other = ({k: [] for k in spaces} for _ in range(3))
    for r in range(args.repeats):
        for name in (list(spaces) if r % 2 == 0 else list(spaces)[::-1]):
            n, cpu = spaces[name].window(args.seconds)
            images = n * spaces[name].batch
            per_image[name].append(cpu.wall / images * 1e3)
            cpu_per_image[name].append(cpu.own / images * 1e3)
            if cpu.other is not None:
                other[name].append(cpu.other)
    ratios = [a / b for a, b in zip(per_image["pixel"], per_image["latent"])]
    cpu_ratios = [a / b for a, b in zip(cpu_per_image["pixel"], cpu_per_image["latent"])]
    measured = next(f for f in flops if f["preset"] == args.preset and f["resolution"] == args.resolution)

    # --- report ---------------------------------------------------------------------------------
    params = spaces["latent"].params
    header("Pixel space versus f=8 latent space, same UNet (benchmarks/pixel_vs_latent.py)", start,
           software=f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, fp32")
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
        st = stats(per_image[name])
        rows[name] = {"batch": s.batch, "ms_per_image": st, "cpu_ms_per_image": stats(cpu_per_image[name]),
                      "other_cores_max": max(other[name]) if other[name] else None}
        rng = f"{st['min']:.2f}-{st['max']:.2f}"
        busy = "n/a" if not other[name] else f"{max(other[name]):.2f}"
        print(f"{labels[name]:<28} {s.batch:>5} {st['median']:>9.2f} {rng:>17} {st['spread'] * 100:>6.1f}% "
              f"{statistics.median(cpu_per_image[name]):>13.2f} {busy:>6}")
    ratio, cpu_ratio = stats(ratios), stats(cpu_ratios)
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

    write_json(args.json, "pixel_vs_latent", start, {
        "settings": vars(args), "params": params, "flops": flops, "steps": rows, "ratio_time": ratio,
        "ratio_cpu_time": cpu_ratio, "ratio_flops": measured["ratio"], "numbers_ratio": numbers_ratio(args.resolution)})


if __name__ == "__main__":
    main()
