"""UNet training-step time on cached latents versus encoding on the fly, next to the FLOP-predicted ratio.

    .venv/bin/python benchmarks/cache_vs_onthefly.py
    .venv/bin/python benchmarks/cache_vs_onthefly.py --preset demo --batch 64 --json runs/bench/cache_vs_onthefly.json

Both variants run trainer.unet.step.train_step on one engine of the job (latent draw from the
posterior moments times the VAE's scaling_factor, caption dropout, loss, backward, ZeRO-2 AdamW step):
(a) cached: fp16 moments and text embeddings, as the cache holds them;
(b) on the fly, diffusers' train_text_to_image.py way: under no_grad the frozen VAE encodes the
    pixel batch, and the step runs the frozen text encoder on token ids (the job's token-cache path).
Both read a pool of --pool batches from memory, so neither pays for reading or decoding (images
are larger than their moments: (b)/(a) is a lower bound). They alternate, order reversed every
other repeat, each --repeats x --steps steps after --warmup; rows print the median.

The FLOP-predicted ratio is (VAE encoder + text encoder forward + UNet forward/backward) / UNet,
per image (trainer/core/flops.py). Measured above it, the encoders ran at a lower FLOP rate than
the UNet step; below it, the reverse.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics

import numpy as np
import torch
from common import CpuWindow, header, noisy_note, started, stats, unet_trainer, write_json  # benchmarks/common.py

from data_pipeline import synthetic
from models.autoencoder import downsample_factor, load_autoencoder
from models.text_encoder import load_text_encoder
from models.unet import build_unet
from trainer.core import dist
from trainer.core.engine import resolve_precision
from trainer.core.flops import (Throughput, device_peak_tflops, forward_flops_per_sample, peak_memory_gb,
                                unet_train_flops_per_sample)
from trainer.unet.job import UNetJob
from trainer.unet.step import DTYPES, train_step

PRESETS = {"tiny": ("tiny", "tiny"), "demo": ("demo", "demo")}  # --preset -> (autoencoder, UNet)


def image_batches(num_batches: int, batch: int, resolution: int) -> tuple[list[torch.Tensor], list[list[str]]]:
    """Synthetic shapes in [-1, 1] with their captions, as the data pipeline would hand them over."""
    xs, caps = [], []
    for b in range(num_batches):
        attrs = [synthetic.attributes(0, b * batch + i) for i in range(batch)]
        pix = np.stack([np.asarray(synthetic.draw(a, resolution)) for a in attrs])
        xs.append(torch.from_numpy(pix).permute(0, 3, 1, 2).float() / 127.5 - 1.0)
        caps.append([synthetic.caption(a) for a in attrs])
    return xs, caps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="autoencoder and UNet presets (random init)")
    p.add_argument("--text-encoder", default="tiny", help="tiny, or an OpenCLIP model name (random weights offline)")
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels (tiny and demo autoencoders: f=4)")
    p.add_argument("--batch", type=int, default=32, help="images per training step")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant per repeat")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each variant, alternating")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each variant first")
    p.add_argument("--pool", type=int, default=4, help="distinct batches cycled through")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights and encoders dtype; auto: bf16 on GPUs that have it, else fp32 (the trainer's rule)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (0: built-in table, GPUs only)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    p.add_argument("--json", default="", metavar="OUT", help="also write the figures to this JSON file")
    args = p.parse_args()
    if min(args.batch, args.steps, args.repeats, args.pool) < 1 or args.warmup < 0:
        p.error("--batch, --steps, --repeats and --pool must be positive, --warmup non-negative")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = started()
    dist.init()
    device, precision = dist.device(), resolve_precision(args.precision)
    dtype = DTYPES[precision]

    # --- models and data ---------------------------------------------------------------------------
    vae_preset, unet_preset = PRESETS[args.preset]
    vae = load_autoencoder(f"preset:{vae_preset}")
    factor, scale = downsample_factor(vae), float(vae.config.scaling_factor)
    if args.resolution % factor:
        p.error(f"--resolution {args.resolution} is not a multiple of the autoencoder's factor {factor}")
    text_encoder = load_text_encoder(args.text_encoder)
    channels, size = vae.config.latent_channels, args.resolution // factor
    ctx_len, ctx_dim = text_encoder.context_length, text_encoder.width
    for m in (vae, text_encoder):  # diffusers warns about any dtype cast, even to fp32
        m.to(device) if dtype == torch.float32 else m.to(device, dtype)
    pixels, captions = image_batches(args.pool, args.batch, args.resolution)
    tokens = [text_encoder.tokenize(c) for c in captions]
    cached = []  # what the latent cache holds for each batch: fp16 moments and fp16 text embeddings
    with torch.no_grad():
        for x, tok in zip(pixels, tokens):
            post = vae.encode(x.to(device, dtype)).latent_dist
            cached.append({"mean": post.mean.half().cpu(), "std": post.std.half().cpu(),
                           "text_emb": text_encoder(tok.to(device)).half().cpu(), "bytes": 0})

    # --- FLOPs per image (the UNet's on a shape-only copy, as the trainer counts them) --------------
    x2, tok2 = pixels[0][:2].to(device, dtype), tokens[0][:2].to(device)
    with torch.device("meta"):
        shapes_only = build_unet(unet_preset, channels, size, ctx_dim)
    unet_flops = unet_train_flops_per_sample(shapes_only, (channels, size, size), (ctx_len, ctx_dim), batch_size=2)
    vae_flops = forward_flops_per_sample(lambda: vae.encode(x2).latent_dist.sample(), 2)
    text_flops = forward_flops_per_sample(lambda: text_encoder(tok2), 2)
    predicted = (vae_flops + text_flops + unet_flops) / unet_flops

    # --- the two steps: the UNet job's train_step, on one engine -----------------------------------
    job = UNetJob(model=unet_preset, batch_per_rank=args.batch, precision=precision, lr=1e-4)
    engine, cached_setup = unet_trainer(job, (channels, size, size), (ctx_len, ctx_dim), scale=scale)
    # On the fly the step embeds token ids itself, as for a cache of tokens.
    onthefly_setup = dataclasses.replace(cached_setup, text_encoder=text_encoder)

    def encoded_on_the_fly():
        for i in itertools.count():
            with torch.no_grad():
                post = vae.encode(pixels[i % args.pool].to(device, dtype)).latent_dist
            yield {"mean": post.mean, "std": post.std, "tokens": tokens[i % args.pool], "bytes": 0}

    streams = {"cached": (itertools.cycle(cached), cached_setup), "on_the_fly": (encoded_on_the_fly(), onthefly_setup)}
    variants = {name: (lambda i, it=it, setup=setup: train_step(engine, it, i, setup))
                for name, (it, setup) in streams.items()}
    for fn in variants.values():
        for i in range(args.warmup):
            fn(i)
    ms, cpu_ms, other = ({k: [] for k in variants} for _ in range(3))
    for r in range(args.repeats):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            torch.cuda.synchronize(device) if device.type == "cuda" else None
            with CpuWindow() as cpu:
                for s in range(args.steps):
                    variants[name](r * args.steps + s)
                torch.cuda.synchronize(device) if device.type == "cuda" else None
            ms[name].append(cpu.wall / args.steps * 1e3)
            cpu_ms[name].append(cpu.own / args.steps * 1e3)
            if cpu.other is not None:
                other[name].append(cpu.other)

    # --- report -------------------------------------------------------------------------------------
    peak = device_peak_tflops(precision, args.peak_tflops)
    flops_of = {"cached": unet_flops, "on_the_fly": unet_flops + vae_flops + text_flops}
    timing = {k: stats(v) for k, v in ms.items()}
    per_repeat = [b / a for a, b in zip(ms["cached"], ms["on_the_fly"])]
    measured = statistics.median(per_repeat)
    of_medians, of_minima = (timing["on_the_fly"][k] / timing["cached"][k] for k in ("median", "min"))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header("UNet training step: cached latents versus encoding on the fly (benchmarks/cache_vs_onthefly.py)", start,
           machine=f"; models on {where}", software=f"torch {torch.__version__}, {torch.get_num_threads()} torch threads "
           f"({'set by --threads' if args.threads else 'the default'}), {precision}")
    print(f"models:   UNet {unet_preset} ({sum(q.numel() for q in engine.module.parameters()) / 1e6:.2f}M params) on "
          f"{channels}x{size}x{size} latents; VAE {vae_preset} (f={factor}, encoder "
          f"{sum(q.numel() for q in vae.encoder.parameters()) / 1e6:.2f}M) at {args.resolution}px; text encoder "
          f"{args.text_encoder} ({ctx_len}x{ctx_dim})")
    print(f"settings: batch {args.batch}, {args.repeats} repeats x {args.steps} steps per variant, alternating, after "
          f"{args.warmup} warm-up steps each; {args.pool} distinct batches in memory", end="\n\n")
    head = f"{'variant':<34} {'ms/step':>8} {'min-max':>11} {'spread':>7} {'img/s':>7} {'TFLOP/s':>8} {'MFU':>6} " \
           f"{'CPU ms':>7} {'other':>6}"
    print(head + "\n" + "-" * len(head))
    labels = {"cached": "(a) cached latents + embeddings", "on_the_fly": "(b) on the fly: VAE + text encoder"}
    figures = {}
    for name, s in timing.items():
        rate = args.batch / (s["median"] / 1e3)
        tp = Throughput(flops_of[name], peak)
        mfu = tp.mfu(rate)
        figures[name] = {"ms_per_step": s, "images_per_s": rate, "flops_per_image": flops_of[name],
                         "tflops": tp.tflops(rate), "mfu": mfu, "cpu_ms_per_step": stats(cpu_ms[name]),
                         "other_cores_max": max(other[name]) if other[name] else None}
        print(f"{labels[name]:<34} {s['median']:>8.1f} {s['min']:>5.1f}-{s['max']:<5.1f} {s['spread'] * 100:>6.1f}% "
              f"{rate:>7.1f} {tp.tflops(rate):>8.4f} {'n/a' if mfu is None else f'{mfu * 100:.1f}%':>6} "
              f"{statistics.median(cpu_ms[name]):>7.1f} {'n/a' if not other[name] else f'{max(other[name]):.2f}':>6}")
    print(f"(ms/step: median over the repeats; TFLOP/s counts each variant's own model FLOPs; MFU "
          f"{'against ' + f'{peak:g} TFLOP/s peak' if peak else 'n/a: no known peak for this device (--peak-tflops)'}; "
          f"CPU ms: this process's CPU time per step; other: cores the rest of the machine used, highest repeat)",
          end="\n\n")
    print(f"FLOPs per image: UNet forward+backward {unet_flops / 1e9:.3f} G, VAE encoder {vae_flops / 1e9:.3f} G, "
          f"text encoder {text_flops / 1e9:.4f} G (forwards)")
    print(f"ratio on the fly / cached, step time: measured {measured:.3f} (median of the per-repeat ratios "
          f"{', '.join(f'{v:.3f}' for v in per_repeat)}; ratio of the medians {of_medians:.3f}, "
          f"of the minima {of_minima:.3f})")
    cpu_ratio = statistics.median(b / a for a, b in zip(cpu_ms["cached"], cpu_ms["on_the_fly"]))
    if device.type == "cpu":  # with --threads 1, CPU time hardly depends on what else runs on the machine
        print(f"                                      by this process's CPU time {cpu_ratio:.3f}")
    print(f"                                      FLOP-predicted {predicted:.3f} ((VAE + text + UNet) / UNet)")
    print(f"encoders' share of the on-the-fly step: measured {(1 - 1 / measured) * 100:.1f}%, by FLOPs "
          f"{(1 - 1 / predicted) * 100:.1f}%")
    mem = peak_memory_gb()
    print(f"peak memory: {mem:.2f} GB ({'CUDA allocated' if device.type == 'cuda' else 'process RSS'})")
    noisy = [labels[k][:3] for k, s in timing.items() if s["spread"] > 0.10]
    busy = max((v for vs in other.values() for v in vs), default=0.0)
    noisy_note(([f"spread > 10% in {' and '.join(noisy)}"] if noisy else [])
               + ([f"other processes used up to {busy:.1f} cores"] if busy > 0.5 else []),
               "the per-repeat ratios are the more robust figure")

    write_json(args.json, "cache_vs_onthefly", start, {
        "settings": {**vars(args), "precision": precision, "latent_shape": [channels, size, size],
                     "context_shape": [ctx_len, ctx_dim]},
        "flops_per_image": dict(unet_train=unet_flops, vae_encode=vae_flops, text_encode=text_flops),
        "variants": figures, "peak_tflops": peak, "peak_memory_gb": mem,
        "ratio": dict(measured=measured, per_repeat=per_repeat, of_medians=of_medians, of_minima=of_minima,
                      cpu_time=cpu_ratio, flop_predicted=predicted)}, device=where)


if __name__ == "__main__":
    main()
