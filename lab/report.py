"""The autoencoder lab's report: tables, loss-curve plots and findings computed from the stage results.

Everything here reads the dicts that lab/run.py's stages returned (the files in
run_dir/stages/), so the report can be rewritten at any time without rerunning anything.
"""
from __future__ import annotations

import os
import re

from data_pipeline import synthetic

from lab.ae_eval import markdown_table
from lab.config import FIRST_STAGES, PIXELS, SPACES, LabJob
from trainer.core.metrics import read_log

SIMILAR_PSNR_DB = 1.0  # two first stages within this PSNR count as "at similar PSNR"
HEADS = (("shape", "shape"), ("color", "colour"), ("position", "position"),
         ("shape+color+position", "shape+colour+position"), ("all", "every attribute"))
# Chance of a uniform guess, per head: 1 / vocabulary size (the generator draws uniformly).
CHANCE = {"shape": 1 / len(synthetic.SHAPES), "color": 1 / len(synthetic.COLORS),
          "position": 1 / len(synthetic.POSITIONS)}
CHANCE["shape+color+position"] = CHANCE["shape"] * CHANCE["color"] * CHANCE["position"]


def _rel(cfg: LabJob, path: str) -> str:
    return os.path.relpath(path, cfg.run_dir)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _na_cell(samples: dict, key: str) -> str:
    """"n/a (reason)" from the stage's one-line reason, e.g. "n/a (no Inception weights)"."""
    found = re.search(r"n/a \([^)]*\)", samples.get("na", {}).get(key, ""))
    return found.group(0) if found else "n/a"


def _quality_cells(s: dict) -> list[str]:
    """Sample FID (with its sample count: it is biased at small N) and CLIP score of one space."""
    fid = (f"{s['sample_fid']:.2f} ({s['fid_samples']} samples)" if s.get("sample_fid") is not None
           else _na_cell(s, "sample_fid"))
    clip = f"{s['clip_score']:.2f}" if s.get("clip_score") is not None else _na_cell(s, "clip_score")
    return [fid, clip]


# ---------------------------------------------------------------- plots

def _curve(ax, rows: list[dict], key: str, label: str) -> None:
    pts = [(r.get("samples", r["step"]), r[key]) for r in rows if isinstance(r.get(key), float)]
    if not pts:
        return
    x, y = zip(*pts)
    k = max(1, len(y) // 20)  # moving average over about 5% of the run, as trainer/metrics.plot_loss
    smooth = [sum(y[max(0, i - k + 1): i + 1]) / len(y[max(0, i - k + 1): i + 1]) for i in range(len(y))]
    line, = ax.plot(x, smooth, label=label)
    ax.plot(x, y, alpha=0.25, color=line.get_color())


def plot_curves(cfg: LabJob, results: dict) -> dict[str, str]:
    """unet_loss.png (the four UNets' losses) and autoencoder_loss.png (the trained first
    stages' pixel reconstruction terms), against samples seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for space in SPACES:
        _curve(ax, read_log(os.path.join(results[f"unet_{space}"]["run"], "log.jsonl")), "loss", space)
    ax.set(xlabel="samples seen", ylabel="denoising loss (MSE)", yscale="log", title=f"UNet {cfg.unet.model} per space")
    out["unet"] = _save(fig, os.path.join(cfg.run_dir, "unet_loss.png"))
    trained = [n for n in FIRST_STAGES if results[f"autoencoder_{n}"].get("trained")]
    if trained:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in trained:
            key = "mse" if name == "kl_plain" else "l1"
            _curve(ax, read_log(os.path.join(results[f"autoencoder_{name}"]["run"], "log.jsonl")), key,
                   f"{name} ({key.upper()})")
        ax.set(xlabel="images seen", ylabel="pixel reconstruction loss", yscale="log",
               title="first stages (kl_plain: MSE; kl_gan, vq_gan: L1)")
        out["autoencoder"] = _save(fig, os.path.join(cfg.run_dir, "autoencoder_loss.png"))
    return out


def _save(fig, path: str) -> str:
    fig.axes[0].legend()
    fig.axes[0].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ---------------------------------------------------------------- tables

def generation_table(results: dict, scored: bool) -> str:
    head = ["space", "latent (c×h×w)", "UNet GFLOP/image (train step)", "UNet images/s (train)", "final loss",
            "sampling s/image", "sample FID ↓", "CLIP score ↑"]
    head += [label for _, label in HEADS] if scored else ["caption accuracy"]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for space in SPACES:
        u, s = results[f"unet_{space}"], results[f"samples_{space}"]
        c, h, w = u["latent_shape"]
        cells = [space, f"{c}×{h}×{w}", f"{u['train_flops_per_image'] / 1e9:.3f}",
                 "n/a" if u["images_per_s"] is None else f"{u['images_per_s']:.0f}",
                 "n/a" if u["final_loss"] is None else f"{u['final_loss']:.4f}", f"{s['seconds_per_image']:.3f}",
                 *_quality_cells(s)]
        if scored:
            cells += [_pct(s["accuracy"].get(key)) for key, _ in HEADS]
        else:
            cells.append("n/a (real data: no caption classifier)")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def quality_notes(results: dict) -> list[str]:
    """What the sample FID and CLIP score columns measure, or why they are n/a."""
    samples = [results[f"samples_{space}"] for space in SPACES]
    out, first = [], samples[0]
    if any(s.get("sample_fid") is not None for s in samples):
        n = first["fid_samples"]
        out.append(f"Sample FID: Fréchet distance between Inception-v3 pool features ({first['inception']}) of "
                   f"{first['fid_real_images']} held-out images and of each space's {n} samples; lower is closer"
                   + (f". With {n} samples (< 2048) the covariances are rank-deficient and FID is biased upward: "
                      "compare spaces with each other at this count, not with published FIDs." if n < 2048 else "."))
    if any(s.get("clip_score") is not None for s in samples):
        out.append(f"CLIP score: 100 × the mean of max(cos, 0) between the OpenCLIP embeddings ({first['clip_model']}) "
                   "of each sample and of its prompt, as torchmetrics' CLIPScore (Hessel et al. 2021's CLIP-S "
                   "weights it by 2.5 instead of 100); higher follows the prompts better"
                   + (". Random-weight test model: not a measurement." if "tiny-clip-random" in first["clip_model"]
                      else "."))
    reasons = dict.fromkeys(line for s in samples for line in s.get("na", {}).values())  # unique, in order
    return out + list(reasons)


def stage_table(results: dict) -> str:
    rows = ["| stage | seconds |", "|---|---:|"]
    rows += [f"| {name} | {r['seconds']:.1f} |" for name, r in results.items() if "seconds" in r]
    total = sum(r.get("seconds", 0.0) for r in results.values())
    return "\n".join(rows + [f"| **total** | **{total:.1f}** |"]) + "\n"


# ---------------------------------------------------------------- findings

def recon_findings(cfg: LabJob, models: dict) -> list[str]:
    """Whether kl_plain keeps less high-frequency energy than kl_gan at similar PSNR, as measured."""
    p, g, v = models["kl_plain"], models["kl_gan"], models["vq_gan"]
    gap = g["psnr_db"] - p["psnr_db"]
    similar = abs(gap) <= SIMILAR_PSNR_DB
    out = [f"kl_plain keeps {p['hf_energy_ratio']:.3f} of the held-out images' high-frequency energy and kl_gan "
           f"{g['hf_energy_ratio']:.3f}, at PSNR {p['psnr_db']:.2f} dB against {g['psnr_db']:.2f} dB "
           + (f"(similar: within {SIMILAR_PSNR_DB:g} dB)." if similar else f"({abs(gap):.2f} dB apart: not similar).")]
    less = p["hf_energy_ratio"] < g["hf_energy_ratio"]
    if less and similar:
        out.append("So here the plain VAE keeps less high-frequency energy than kl_gan at similar PSNR, as the seed claims.")
    elif less:
        out.append("The plain VAE keeps less high-frequency energy than kl_gan, but not at similar PSNR, so the "
                   "seed's claim is only partly tested by this run.")
    else:
        out.append("So in this run the plain VAE does not keep less high-frequency energy than kl_gan: the seed's "
                   "claim is not borne out at this scale.")
    out.append(f"vq_gan keeps {v['hf_energy_ratio']:.3f} at {v['psnr_db']:.2f} dB.")
    if cfg.autoencoder.lpips_weights == "random":
        out.append("Caveat: LPIPS had a random backbone (no ImageNet weights here), so the perceptual term that "
                   "kl_gan and vq_gan trained with, and the LPIPS column, are not the real LPIPS.")
    return out


def generation_findings(results: dict, scored: bool) -> list[str]:
    unets = {s: results[f"unet_{s}"] for s in SPACES}
    latent = FIRST_STAGES
    flops_ratio = unets[PIXELS]["train_flops_per_image"] / min(unets[s]["train_flops_per_image"] for s in latent)
    out = [f"The same UNet costs {flops_ratio:.1f}× the FLOPs per image in pixel space as in the cheapest latent space"]
    rates = {s: u["images_per_s"] for s, u in unets.items() if u["images_per_s"]}
    if PIXELS in rates and any(s in rates for s in latent):
        fastest = max((s for s in latent if s in rates), key=rates.get)
        out[0] += f", and trains {rates[fastest] / rates[PIXELS]:.1f}× fewer images/s ({fastest}: {rates[fastest]:.0f}, pixels: {rates[PIXELS]:.0f})"
    out[0] += "."
    fids = {s: results[f"samples_{s}"].get("sample_fid") for s in SPACES}
    fids = {s: v for s, v in fids.items() if v is not None}
    if fids:
        best = min(fids, key=fids.get)
        out.append(f"Sample FID is lowest in {best} ({fids[best]:.2f} at {results[f'samples_{best}']['fid_samples']} "
                   "samples per space).")
    clips = {s: results[f"samples_{s}"].get("clip_score") for s in SPACES}
    clips = {s: v for s, v in clips.items() if v is not None}
    if clips:
        best = max(clips, key=clips.get)
        out.append(f"CLIP score is highest in {best} ({clips[best]:.2f}).")
    if scored:
        acc = {s: results[f"samples_{s}"]["accuracy"]["shape+color+position"] for s in SPACES}
        best = max(acc, key=acc.get)  # the first of equals
        above = [s for s in SPACES if acc[s] > CHANCE["shape+color+position"]]
        lead = f"best in {best} ({_pct(acc[best])})" if acc[best] > 0 else "no space got a sample fully right"
        out.append(f"Caption accuracy (shape, colour and position all right): {lead}; "
                   f"chance is {_pct(CHANCE['shape+color+position'])}; above chance: {', '.join(above) or 'none'} "
                   f"({results[f'samples_{best}']['scored']} scored samples per space: a few points are noise).")
    return out


# ---------------------------------------------------------------- report

def write_lab_report(cfg: LabJob, results: dict, prompts: list[str]) -> str:
    d, a, u, s = cfg.data, cfg.autoencoder, cfg.unet, cfg.sampling
    rec, scored = results["reconstruction"], "classifier" in results
    plots = plot_curves(cfg, results)
    lines = ["# Autoencoder lab", "",
             "Three first stages (a textbook VAE, Stable Diffusion's KL-VAE with LPIPS + PatchGAN, a VQ-GAN) and raw "
             "pixels (LDM-1), each feeding the same UNet.", "", "## Configuration", ""]
    if cfg.synthetic:
        lines.append(f"- data: synthetic shapes, {d.train_images} training / {d.heldout_images} held-out images "
                     f"(seeds {d.seed} / {d.seed + 1}) at {d.resolution} px; shape fills {', '.join(d.textures)}; "
                     f"background fills {', '.join(d.background_textures)}")
    else:
        lines.append(f"- data: {d.urls} (held out: {d.heldout_urls}) at {d.resolution} px")
    for name in FIRST_STAGES:
        r = results[f"autoencoder_{name}"]
        how = (f"trained: preset {a.vq_preset if name == 'vq_gan' else a.kl_preset}, {a.latent_channels} latent "
               f"channels, {a.total_samples} images in batches of {a.batch_size}"
               + ("" if name == "kl_plain" else f", discriminator from {a.disc_start_samples} images")
               if r["trained"] else f"loaded from {r['vae']}")
        lines.append(f"- {name}: {how}")
    lpips = ("random backbone (no ImageNet weights: not perceptual)" if a.lpips_weights == "random"
             else a.lpips_weights or "torchvision hub cache")
    lines += [f"- LPIPS ({a.lpips_net}): {lpips}",
              f"- UNet: preset {u.model}, {u.total_samples} samples in batches of {u.batch_size}, lr {u.lr}, EMA "
              f"half-life {u.ema_halflife_samples} samples; text encoder {cfg.cache.text_encoder}",
              f"- sampling: {len(prompts)} prompts × {s.per_prompt} images, {s.sampler} {s.steps} steps, guidance "
              f"{s.guidance}, EMA weights", f"- full config: [config.yaml](config.yaml)", ""]

    n = next(iter(rec["models"].values()))["num_images"]
    lines += [f"## Reconstruction ({n} held-out images)", "", markdown_table(rec["models"])]
    lines += [f"- {note}" for note in rec["notes"]] + [f"- {m}" for m in rec["missing"].values()]
    lines += ["", f"![reconstructions]({_rel(cfg, rec['grid'])})", "",
              "Originals, then each first stage's reconstruction; under each row the red-boxed region enlarged.", ""]

    lines += ["## Generation", "", generation_table(results, scored)]
    if scored:
        ceiling = results["classifier"]["heldout_accuracy"]
        lines += [f"- Caption accuracy: a classifier trained on the synthetic training set reads each sample, scored "
                  f"against its prompt. Chance: shape {_pct(CHANCE['shape'])}, colour {_pct(CHANCE['color'])}, position "
                  f"{_pct(CHANCE['position'])}, all three {_pct(CHANCE['shape+color+position'])}. On held-out real "
                  f"images the classifier itself scores {_pct(ceiling['shape+color+position'])} (shape+colour+position) "
                  f"and {_pct(ceiling['all'])} (every attribute): the ceiling."]
    lines += [f"- {note}" for note in quality_notes(results)]
    lines += ["- GFLOP/image: model FLOPs of one training step (forward + backward) per image (trainer/core/flops.py); "
              "images/s: the median logged training interval on this machine. Final loss: the last logged "
              "interval's mean denoising MSE; spaces differ in scale, so compare curves, not values, across spaces.",
              "", "### Samples", ""]
    for space in SPACES:
        lines += [f"**{space}**", "", f"![{space} samples]({_rel(cfg, results[f'samples_{space}']['grid'])})", ""]

    lines += ["## Loss curves", "", f"![UNet losses]({_rel(cfg, plots['unet'])})", ""]
    if "autoencoder" in plots:
        lines += [f"![first-stage losses]({_rel(cfg, plots['autoencoder'])})", ""]

    lines += ["## What this shows", ""] + [" ".join(recon_findings(cfg, rec["models"]))] + [""]
    lines += [" ".join(generation_findings(results, scored)), "", "## Stage times", "", stage_table(results)]
    path = os.path.join(cfg.run_dir, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    os.replace(path + ".tmp", path)
    return path
