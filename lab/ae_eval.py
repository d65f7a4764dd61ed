"""Evaluate first-stage autoencoders on held-out shards: metrics, a report, a reconstruction grid.

Reconstruction is deterministic: an AutoencoderKL decodes its posterior *mean* (no sampling),
a VQModel decodes its quantised latents (`decode(encode(x).latents)`, which quantises). Every
metric compares the decoder output clamped to [-1, 1] with the original, in float32, without
rounding to 8 bits. Per model (keys of `evaluate`'s result):

* `psnr_db`: mean over images of the per-image PSNR on [0, 1] (`models.image_metrics.psnr`);
* `ssim`: mean per-image SSIM, Wang et al. 2004 (`models.image_metrics.ssim`);
* `lpips`: mean per-image LPIPS distance (None without an LPIPS network);
* `rfid`: Fréchet distance between Inception pool features of originals and reconstructions
  (None without Inception weights; biased upward below ~2048 images: compare at equal N);
* `hf_energy_ratio`: spectral energy above `hf_cutoff` x Nyquist kept by the reconstruction,
  summed over the set (`models.image_metrics.hf_energy`);
* `compression_numbers`: pixel numbers (3 H W) / latent numbers (C h w, what a diffusion
  model sees); for a VQModel also `bits_per_position` = log2(codebook size) and
  `compression_bits` = 24 H W / (h w log2 K), its bits against 8-bit RGB.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterable, Iterator, Mapping

import torch
from diffusers import VQModel
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from data_pipeline.images import decode_rgb, resize_center_crop, to_pil, to_tensor
from data_pipeline.shards import iter_samples
from data_pipeline.storage import DataError, expand_shards
from models.autoencoder import encode_moments, load_autoencoder
from models.image_metrics import GaussianStats, frechet_distance, hf_energy, psnr, ssim

from trainer.core.config import ConfigError

Metrics = dict[str, float | int | str | None]
NA_REASONS = {"lpips": "no LPIPS weights", "rfid": "no Inception weights"}


# ---------------------------------------------------------------- models

def load_model(source: str) -> nn.Module:
    """A frozen AutoencoderKL or VQModel: `preset:NAME`, a hub id, or a diffusers folder
    (the class comes from its config.json) — `models.autoencoder.load_autoencoder`."""
    return load_autoencoder(source)


def encode_decode(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction clamped to [-1, 1], latent) of images `x` in [-1, 1], deterministically:
    the latent is what the latent cache stores (`encode_moments`' mean: an AutoencoderKL's
    posterior mean, a VQModel's pre-quantisation latent, which `decode` quantises)."""
    latent = encode_moments(model, x)[0]
    recon = model.decode(latent).sample
    if recon.shape != x.shape:
        raise ConfigError(f"{type(model).__name__} reconstructs {tuple(recon.shape[1:])} from {tuple(x.shape[1:])}: "
                          "the resolution must be a multiple of its downsampling factor")
    return recon.float().clamp(-1, 1), latent


def reconstruct(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return encode_decode(model, x)[0]


def compression_stats(model: nn.Module, image_shape: tuple[int, ...], latent_shape: tuple[int, ...]) -> Metrics:
    """Latent size and compression of one image (shapes without the batch axis)."""
    _, h_px, w_px = image_shape
    c, h, w = latent_shape
    stats: Metrics = {"kind": type(model).__name__, "latent_channels": c, "latent_height": h, "latent_width": w,
                      "compression_numbers": 3 * h_px * w_px / (c * h * w),
                      "bits_per_position": None, "compression_bits": None}
    codebook = getattr(model.config, "num_vq_embeddings", None) if isinstance(model, VQModel) else None
    if codebook:
        stats["bits_per_position"] = math.log2(codebook)
        stats["compression_bits"] = 24 * h_px * w_px / (h * w * math.log2(codebook))
    return stats


# ---------------------------------------------------------------- LPIPS

def load_lpips_net(weights: str = "", net: str = "vgg") -> nn.Module:
    """The training code's LPIPS (`models.perceptual.load_lpips`: weights "" = torchvision's
    hub cache, a backbone file, or "random"). Should that module be missing, only "random"
    works, through `lpips` directly; anything else is a FileNotFoundError saying so."""
    try:
        from models.perceptual import load_lpips
    except ImportError:
        if weights != "random":
            raise FileNotFoundError(f"cannot load LPIPS weights {weights or '(hub cache)'}: models.perceptual."
                                    "load_lpips is not available; only --lpips-weights random works without it") from None
        import lpips

        return lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval().requires_grad_(False)
    return load_lpips(net, weights).eval().requires_grad_(False)


# ---------------------------------------------------------------- data

class ImageBatches:
    """Batches `(B, 3, R, R)` in [-1, 1] from shards (any URL data_pipeline.storage reads),
    resized and centre-cropped as for training; undecodable samples are skipped and counted."""

    def __init__(self, spec: str, resolution: int, batch_size: int, limit: int | None = None,
                 endpoint_url: str | None = None):
        self.urls = expand_shards(spec, endpoint_url)
        self.resolution, self.batch_size, self.limit, self.endpoint_url = resolution, batch_size, limit, endpoint_url
        self.skipped: list[str] = []

    def _images(self) -> Iterator[torch.Tensor]:
        for url in self.urls:
            for sample in iter_samples(url, self.endpoint_url, on_error=lambda u, k, m: self.skipped.append(f"{u}:{k}: {m}")):
                where = f"{url}:{sample['__key__']}"
                ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
                if ext is None:
                    self.skipped.append(f"{where}: no image")
                    continue
                try:
                    yield to_tensor(resize_center_crop(decode_rgb(sample[ext], where), self.resolution)[0])
                except DataError as e:
                    self.skipped.append(str(e))

    def __iter__(self) -> Iterator[torch.Tensor]:
        batch: list[torch.Tensor] = []
        count = 0
        for image in self._images():
            if self.limit is not None and count >= self.limit:
                break
            batch.append(image)
            count += 1
            if len(batch) == self.batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)


# ---------------------------------------------------------------- evaluation

@torch.inference_mode()
def evaluate(models: Mapping[str, nn.Module], batches: Iterable[torch.Tensor], *, lpips: nn.Module | None = None,
             inception: nn.Module | None = None, hf_cutoff: float = 0.5, device: str | torch.device = "cpu",
             on_batch: Callable[[torch.Tensor, dict[str, torch.Tensor]], None] | None = None,
             fid_method: str = "auto") -> dict[str, Metrics]:
    """Metrics per model name over all `batches` (tensors (B, 3, H, W) in [-1, 1]), in one pass.

    Models, `lpips` (an lpips.LPIPS-like module on [-1, 1] inputs) and `inception` (images in
    [-1, 1] -> (B, D) features, D = 2048 for Inception-v3) are moved to `device`. `on_batch(originals, recons)` sees
    every batch (the launcher keeps the first images for its grid). `fid_method` goes to
    `frechet_distance` ("eigh" is ~20x faster than scipy's sqrtm at 2048-d on a CPU, same
    value to ~1e-12 relative). The keys are described
    in the module docstring; `lpips` and `rfid` are None when their network is not given.
    """
    models = {name: m.to(device).eval() for name, m in models.items()}
    lpips = lpips.to(device).eval() if lpips is not None else None
    inception = inception.to(device).eval() if inception is not None else None
    sums = {name: {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0, "hf": 0.0} for name in models}
    hf_original, n_images = 0.0, 0
    shapes: dict[str, Metrics] = {}
    real_stats, fake_stats = GaussianStats(), {name: GaussianStats() for name in models}
    for x in batches:
        x = x.to(device).float()
        x01 = (x + 1) / 2
        n_images += x.shape[0]
        hf_original += float(hf_energy(x01, hf_cutoff).sum())
        if inception is not None:
            real_stats.update(inception(x))
        recons = {}
        for name, model in models.items():
            recon, latent = encode_decode(model, x)
            recons[name] = recon
            r01, s = (recon + 1) / 2, sums[name]
            s["psnr"] += float(psnr(x01, r01).sum())
            s["ssim"] += float(ssim(x01, r01).sum())
            s["hf"] += float(hf_energy(r01, hf_cutoff).sum())
            if lpips is not None:
                s["lpips"] += float(lpips(x, recon).sum())
            if inception is not None:
                fake_stats[name].update(inception(recon))
            if name not in shapes:
                shapes[name] = compression_stats(model, tuple(x.shape[1:]), tuple(latent.shape[1:]))
        if on_batch is not None:
            on_batch(x, recons)
    if n_images == 0:
        raise DataError("no images to evaluate: the shards held no decodable image")
    results: dict[str, Metrics] = {}
    for name, s in sums.items():
        rfid = None
        if inception is not None and n_images >= 2:
            rfid = frechet_distance(*real_stats.mean_cov(), *fake_stats[name].mean_cov(), method=fid_method)
        results[name] = {"num_images": n_images, "psnr_db": s["psnr"] / n_images, "ssim": s["ssim"] / n_images,
                         "lpips": s["lpips"] / n_images if lpips is not None else None, "rfid": rfid,
                         "hf_energy_ratio": s["hf"] / hf_original if hf_original > 0 else None,
                         "hf_cutoff": hf_cutoff, **shapes[name]}
    return results


# ---------------------------------------------------------------- report

def _fmt(value, digits: int, na: str) -> str:
    if value is None:
        return f"n/a ({na})" if na else "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def markdown_table(results: Mapping[str, Metrics], na_reasons: Mapping[str, str] | None = None) -> str:
    """One row per model; a metric that is None is shown as "n/a (reason)"."""
    na = {**NA_REASONS, **(na_reasons or {})}
    head = ["model", "PSNR (dB) ↑", "SSIM ↑", "LPIPS ↓", "rFID ↓", "HF energy kept", "latent (c×h×w)",
            "numbers ÷", "bits/position", "bits ÷ (vs 24 bpp)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, m in results.items():
        cells = [name, _fmt(m["psnr_db"], 2, ""), _fmt(m["ssim"], 4, ""), _fmt(m["lpips"], 4, na["lpips"]),
                 _fmt(m["rfid"], 2, na["rfid"]), _fmt(m["hf_energy_ratio"], 3, ""),
                 f"{m['latent_channels']}×{m['latent_height']}×{m['latent_width']}",
                 f"{m['compression_numbers']:.1f}×", _fmt(m["bits_per_position"], 1, "continuous"),
                 _fmt(m["compression_bits"], 1, "") + ("×" if m["compression_bits"] is not None else "")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _font(size_px: int):
    try:
        return ImageFont.load_default(size=size_px)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def save_recon_grid(originals: torch.Tensor, recons: Mapping[str, torch.Tensor], path: str, *,
                    crop: tuple[float, float, float] = (0.5, 0.5, 0.25), min_cell_px: int = 128) -> str:
    """PNG: a column of originals and one labelled column per model; under each row of full
    images, the same fixed region of each (`crop` = centre x, centre y, side, as fractions of
    the image; outlined in red on the original) enlarged nearest-neighbour, so that lost
    texture is visible. Images are (K, 3, H, W) in [-1, 1]; cells are scaled up (nearest)
    to at least `min_cell_px`."""
    k, _, h, w = originals.shape
    scale = max(1, math.ceil(min_cell_px / max(h, w)))
    cell_w, cell_h, gap, pair_gap, label_h = w * scale, h * scale, 2, 8, 20
    side_x, side_y = max(1, round(crop[2] * w)), max(1, round(crop[2] * h))
    left = min(max(0, round(crop[0] * w - side_x / 2)), w - side_x)
    top = min(max(0, round(crop[1] * h - side_y / 2)), h - side_y)
    box = (left, top, left + side_x, top + side_y)
    columns = {"original": originals, **recons}
    pair_h = 2 * cell_h + gap + pair_gap  # a row of full images, its row of crops, a wider gap
    sheet = Image.new("RGB", (len(columns) * (cell_w + gap) - gap, label_h + k * pair_h - pair_gap), "white")
    draw, font = ImageDraw.Draw(sheet), _font(12)
    for col, (label, images) in enumerate(columns.items()):
        x0 = col * (cell_w + gap)
        draw.text((x0 + 3, 3), label[: max(4, cell_w // 7)], fill="black", font=font)
        for row in range(k):
            img = to_pil(images[row])
            full = img.resize((cell_w, cell_h), Image.Resampling.NEAREST)
            if col == 0:
                ImageDraw.Draw(full).rectangle([box[0] * scale, box[1] * scale, box[2] * scale - 1, box[3] * scale - 1],
                                               outline=(255, 0, 0))
            zoom = img.crop(box).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            y0 = label_h + row * pair_h
            sheet.paste(full, (x0, y0))
            sheet.paste(zoom, (x0, y0 + cell_h + gap))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)
    return path


def write_report(results: Mapping[str, Metrics], out_dir: str, header: Mapping[str, object],
                 na_reasons: Mapping[str, str] | None = None, notes: Iterable[str] = ()) -> tuple[str, str, str]:
    """`out_dir/metrics.md` (header, table, notes) and `out_dir/metrics.json` ({header...,
    "models": results}; +inf PSNR is written as JSON `Infinity`, which Python reads back).
    Returns (markdown path, JSON path, table text)."""
    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(results, na_reasons)
    md_path, json_path = os.path.join(out_dir, "metrics.md"), os.path.join(out_dir, "metrics.json")
    lines = ["# Autoencoder reconstruction", ""] + [f"- {k}: {v}" for k, v in header.items()] + ["", table]
    lines += [f"- {n}" for n in notes]
    with open(md_path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    with open(json_path, "w") as f:
        json.dump({**header, "models": results}, f, indent=2)
    return md_path, json_path, table


# ---------------------------------------------------------------- the launcher's job

def model_names(specs: Iterable[str]) -> dict[str, str]:
    """{label: source} from `--model` values `PATH` or `LABEL=PATH`. A bare path is labelled
    by its last folder name, or its last two when that is generic (export, vae) or taken."""
    named: dict[str, str] = {}
    for spec in specs:
        label, sep, source = spec.partition("=")
        if not sep or not label or "/" in label or ":" in label:
            label, source = "", spec
        if not label:
            parts = [p for p in source.rstrip("/").replace("\\", "/").split("/") if p]
            label = parts[-1] if parts else source
            if (label in ("export", "vae") or label in named) and len(parts) > 1:
                label = "/".join(parts[-2:])
        base, i = label, 2
        while label in named:
            label, i = f"{base}#{i}", i + 1
        named[label] = source
    return named


def optional_networks(lpips_weights: str | None, lpips_net: str, inception_weights: str | None,
                      say: Callable[[str], None]) -> tuple[nn.Module | None, nn.Module | None, dict[str, str]]:
    """(LPIPS net or None, Inception features or None, notes). Weights not given are looked
    for in torch's hub cache; whatever is missing is reported by `say` in one line naming the
    file, and its column reads n/a — the other metrics still run."""
    notes: dict[str, str] = {}
    lpips_model = None
    try:
        lpips_model = load_lpips_net(lpips_weights or "", lpips_net)
    except FileNotFoundError as e:
        say(f"LPIPS: n/a (no LPIPS weights): {e}")
    inception = optional_inception(inception_weights, say)
    if lpips_weights == "random" and lpips_model is not None:
        notes["lpips_note"] = "LPIPS from a randomly initialised backbone (pipeline check, not a perceptual score)"
    return lpips_model, inception, notes


def optional_inception(weights: str | None, say: Callable[[str], None], metric: str = "rFID",
                       option: str = "--inception-weights") -> nn.Module | None:
    """Inception features from `weights` (None: torch's hub cache), or None after `say` has
    given one line, "METRIC: n/a (no Inception weights): ...", naming the file."""
    from models.fid_inception import FID_WEIGHTS_FILE, TORCHVISION_WEIGHTS_FILE, default_inception_path, load_inception

    if weights is None:
        weights = default_inception_path()
        if weights is None:
            say(f"{metric}: n/a (no Inception weights): no {option} given and neither {FID_WEIGHTS_FILE} "
                f"nor {TORCHVISION_WEIGHTS_FILE} is in {os.path.join(torch.hub.get_dir(), 'checkpoints')}")
            return None
    try:
        return load_inception(weights)
    except FileNotFoundError as e:
        say(f"{metric}: n/a (no Inception weights): {e}")
        return None


def run_evaluation(model_specs: list[str], data: str, out_dir: str, *, resolution: int = 256, limit: int | None = None,
                   batch_size: int = 16, lpips_weights: str | None = None, lpips_net: str = "vgg",
                   inception_weights: str | None = None, hf_cutoff: float = 0.5, grid_images: int = 4,
                   device: str | None = None, endpoint_url: str | None = None,
                   say: Callable[[str], None] = print) -> dict[str, Metrics]:
    """Load, evaluate, write `metrics.md`, `metrics.json` and `recon_grid.png` under `out_dir`, print the table."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sources = model_names(model_specs)
    models = {name: load_model(src) for name, src in sources.items()}
    batches = ImageBatches(data, resolution, batch_size, limit, endpoint_url)
    lpips_model, inception, extra = optional_networks(lpips_weights, lpips_net, inception_weights, say)
    kept: dict[str, list[torch.Tensor]] = {}

    def keep(x: torch.Tensor, recons: dict[str, torch.Tensor]) -> None:
        have = sum(t.shape[0] for t in kept.get("original", []))
        if have < grid_images:
            for name, t in {"original": x, **recons}.items():
                kept.setdefault(name, []).append(t[: grid_images - have].cpu())

    results = evaluate(models, batches, lpips=lpips_model, inception=inception, hf_cutoff=hf_cutoff,
                       device=device, on_batch=keep)
    for name, src in sources.items():
        results[name] = {"source": src, **results[name]}
    n = next(iter(results.values()))["num_images"]
    notes = ["Reconstructions are deterministic (AutoencoderKL: posterior mean; VQModel: quantised codes), clamped to [-1, 1].",
             f"HF energy kept: spectral energy above {hf_cutoff} x Nyquist ({hf_cutoff * 0.5:g} cycles/pixel) of the "
             "reconstructions divided by the originals' (1.0 perfect, below 1 blurrier, above 1 noise/ringing)."]
    if "lpips_note" in extra:
        notes.append(extra["lpips_note"])
    if inception is not None:
        notes.append(f"rFID: Inception-v3 pool features from {inception.source}" +
                     (f"; {n} images < 2048, so the covariances are rank-deficient and rFID is biased upward: "
                      "compare only at equal N" if n < 2048 else ""))
    if batches.skipped:
        notes.append(f"{len(batches.skipped)} undecodable samples skipped, e.g. {batches.skipped[0]}")
    header = {"data": data, "images": n, "resolution": resolution, "hf_cutoff": hf_cutoff,
              "lpips": f"{lpips_net}:{lpips_weights or 'hub cache'}" if lpips_model is not None else None,
              "inception": inception.source if inception is not None else None}
    md, js, table = write_report(results, out_dir, header, notes=notes)
    grid = "(none: --grid-images 0)"
    if kept:
        grid = save_recon_grid(torch.cat(kept["original"]), {k: torch.cat(v) for k, v in kept.items() if k != "original"},
                               os.path.join(out_dir, "recon_grid.png"))
    say(f"{n} images at {resolution}x{resolution} from {data}\n\n{table}")
    for line in notes:
        say(f"- {line}")
    say(f"\nreport: {md}\njson:   {js}\ngrid:   {grid}")
    return results
