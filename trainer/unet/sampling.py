"""Generate images from a trained run: text -> UNet in latent space -> frozen VAE decoder."""
from __future__ import annotations

import json
import os
import re

import torch
from PIL import Image, ImageDraw

from data_pipeline.images import grid, to_pil
from models.autoencoder import autoencoder_identity, load_autoencoder
from models.diffusion import sample_latents
from models.flow_model import family_of

from trainer.cache.manifest import Manifest
from trainer.core import checkpoint
from trainer.core import config as config_lib
from trainer.core.ema import EMA_DIR
from trainer.unet.job import UNetJob
from trainer.unet.lora import add_text_encoder_lora, attached_text_encoder, check_base, load_adapter
from trainer.unet.flow_sampling import flow_sample_latents
from trainer.unet.pretrained import build_model, denoiser_class, training_schedule


def load_run(run_dir: str, weights: str = "ema"):
    """(UNet, VAE, text encoder, run config, cache manifest) of a run's newest complete checkpoint.

    `weights` is "ema" (the EMA weights where the run kept them, else the trained ones) or
    "raw". The VAE and text encoder are the ones the latent cache was made with; their
    identity is checked against the cache manifest so a swapped folder cannot decode garbage.
    """
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a train_unet run directory?")
    cfg = config_lib.load_config(UNetJob, path)
    root = cfg.checkpoint_url or checkpoint.default_root(run_dir)
    ckpt = checkpoint.latest(root, cfg.checkpoint_endpoint_url)
    if ckpt is None:
        raise FileNotFoundError(f"{root} has no complete checkpoint yet")
    ckpt = checkpoint.fetch(ckpt, endpoint_url=cfg.checkpoint_endpoint_url, parts=("unet", EMA_DIR))
    manifest = Manifest.read(cfg.data.urls, cfg.data.endpoint_url)
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be ema or raw, got {weights!r}")
    folder = os.path.join(ckpt, EMA_DIR if weights == "ema" and os.path.isdir(os.path.join(ckpt, EMA_DIR)) else "unet")
    if cfg.lora_rank:  # the checkpoint holds the adapters; the frozen base is pretrained's
        unet = lora_unet(cfg, manifest)
        recorded = checkpoint.info(ckpt).get("lora_base")  # the base it was trained on (#27)
        check_base(unet, recorded if isinstance(recorded, str) else None, f"the LoRA adapter of {run_dir}",
                   cfg.pretrained)
        load_adapter(unet, folder)
    else:
        unet = denoiser_class(cfg).from_pretrained(folder, use_safetensors=True)
    vae, text_encoder = load_frozen(manifest, cfg.data.urls)
    adapted = attached_text_encoder(unet)  # lora_text_encoder: the adapted text encoder
    return unet.eval(), vae, adapted if adapted is not None else text_encoder, cfg, manifest


def lora_unet(cfg: UNetJob, manifest: Manifest):
    """A LoRA run's UNet before training: pretrained's weights with fresh adapters (and with
    lora_text_encoder, the cache's text encoder with fresh adapters riding on it)."""
    unet = build_model(cfg, manifest.latent_shape[0], manifest.latent_shape[1], manifest.text_emb_shape[1],
                       manifest.pooled_dim)
    if cfg.lora_text_encoder:
        add_text_encoder_lora(unet, manifest.text_encoder.load(), cfg)
    return unet


def parse_size(text: str, factor: int) -> tuple[int, int]:
    """`WxH` pixels -> (w, h), both positive multiples of the autoencoder's factor `factor`."""
    w, _, h = text.lower().partition("x")
    if not (w.isdigit() and h.isdigit()) or int(w) <= 0 or int(h) <= 0 or int(w) % factor or int(h) % factor:
        raise config_lib.ConfigError(f"size must be WIDTHxHEIGHT in pixels, multiples of {factor} (the autoencoder's "
                                     f"factor), e.g. 1152x896; got {text!r}")
    return int(w), int(h)


def available_bytes(device: torch.device) -> int:
    """Memory free for a new allocation: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_memory(vae, per_prompt: int, prompts: int, size: tuple[int, int], device: torch.device) -> None:
    """Refuse, before anything is allocated, a request whose images cannot fit (#27): the VAE decodes a
    prompt's `per_prompt` images at once, its activations at each level about 3 live tensors of that
    level's channels, and every image is kept (and drawn into the grid) until the end. An estimate, on
    the side of allowing: a size or count far past what fits is refused, not one at the margin."""
    w, h = size
    channels = list(getattr(vae.config, "block_out_channels", (128,)))
    per_pixel = sum(c / 4 ** k for k, c in enumerate(channels)) * 3 * 4  # fp32, level k at 1/2^k of the side
    decode = per_prompt * w * h * per_pixel
    kept = prompts * per_prompt * (w * h * 3 + 144 * 128 * 3)  # PIL images and their grid tiles
    free = available_bytes(device)
    host_free = free if device.type != "cuda" else available_bytes(torch.device("cpu"))
    if decode > free or kept > host_free:
        gb = 1024 ** 3
        raise config_lib.ConfigError(
            f"{prompts} prompt(s) x {per_prompt} image(s) at {w}x{h} need about {decode / gb:.1f} GB to decode a "
            f"prompt's images and {kept / gb:.1f} GB to keep them; {device.type} has {free / gb:.1f} GB free"
            + (f" and the host {host_free / gb:.1f} GB" if device.type == "cuda" else "")
            + ": ask for a smaller --size or fewer --per-prompt")


def condition(text_encoder, prompts: list[str], negative_prompt: str, size: tuple[int, int], device,
              original: tuple[int, int] | None = None, crop: tuple[int, int] = (0, 0)) -> tuple:
    """(context, uncond, added, added_uncond) for sample_latents. With SDXL's two encoders the
    unconditional side is zeros where there is no negative prompt (what caption dropout trained and
    SDXL pipelines use: force_zeros_for_empty_prompt), and the size conditioning is original size
    `original` (w, h; default the sampled `size`), crop (top, left) `crop`, target `size`."""
    text = {k: v.to(device) for k, v in text_encoder.embed(prompts).items()}
    if "pooled" not in text:
        return text["text_emb"], text_encoder.encode([negative_prompt]).to(device), None, None
    if negative_prompt:
        neg = {k: v.to(device) for k, v in text_encoder.embed([negative_prompt]).items()}
    else:
        neg = {k: torch.zeros_like(v[:1]) for k, v in text.items()}
    (w, h), (ow, oh) = size, original or size
    ids = torch.tensor([[oh, ow, crop[0], crop[1], h, w]], dtype=torch.float32, device=device).expand(len(prompts), -1)
    return (text["text_emb"], neg["text_emb"], {"text_embeds": text["pooled"], "time_ids": ids},
            {"text_embeds": neg["pooled"], "time_ids": ids[:1]})


def load_frozen(manifest: Manifest, cache_url: str):
    """The VAE (`identity` for a pixel-space cache) and text encoder a cache was made with,
    checked against its manifest."""
    vae = load_autoencoder(manifest.vae.source)
    if autoencoder_identity(vae) != manifest.vae.identity:
        raise config_lib.ConfigError(f"the autoencoder at {manifest.vae.source} is not the one the cache "
                                     f"{cache_url} was made with")
    return vae, manifest.text_encoder.load()


@torch.no_grad()
def sample_rows(unet, vae, text_encoder, manifest: Manifest, cfg: UNetJob, prompts: list[str], *, per_prompt: int = 4,
                guidance: float = 5.0, steps: int = 50, sampler: str = "ddim", seed: int = 0,
                negative_prompt: str = "", size: tuple[int, int] | None = None,
                original_size: tuple[int, int] | None = None, crop: tuple[int, int] = (0, 0)) -> list[list[Image.Image]]:
    """One row of images per prompt; row i's noise is seeded by seed + i, so a fixed prompt
    list gives comparable grids across checkpoints.

    Classifier-free guidance extrapolates from the output for `negative_prompt` towards the
    prompt's: eps = n + guidance * (c - n). With "" (the default) n is the unconditional
    model (the empty caption it was trained on under caption_dropout); a negative prompt
    replaces it, so guidance > 1 also pushes away from what it describes. `size`: (w, h) in pixels
    (any bucket shape), default the cache's square resolution; `original_size` (w, h) and `crop`
    (top, left): SDXL's micro-conditioning, default `size` and (0, 0) (an uncropped image of that size).
    """
    device = next(unet.parameters()).device
    shift, scale = (t.to(device) for t in manifest.latent_affine(cfg.latent_norm))  # model latents: (z - shift) * scale
    schedule = training_schedule(cfg)
    f = manifest.vae.downsample_factor
    size = size or (manifest.resolution, manifest.resolution)
    check_memory(vae, per_prompt, len(prompts), size, device)
    rows = []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator(device).manual_seed(seed + i)
        if family_of(unet) is not None:  # SD3/Flux: flow-matching Euler steps, as their pipelines take them
            z = flow_sample_latents(unet, text_encoder, dict(schedule.config), [prompt] * per_prompt, steps=steps,
                                    guidance=guidance, generator=gen, negative_prompt=negative_prompt,
                                    latent_shape=(manifest.latent_shape[0], size[1] // f, size[0] // f))
        else:
            context, uncond, added, added_uncond = condition(text_encoder, [prompt] * per_prompt, negative_prompt,
                                                             size, device, original_size, crop)
            z = sample_latents(unet, context, uncond, dict(schedule.config), steps=steps, guidance=guidance,
                               sampler=sampler, generator=gen, size=(size[1] // f, size[0] // f), added=added,
                               added_uncond=added_uncond)
        images = vae.decode((z / scale + shift).to(next(vae.parameters()).dtype)).sample
        rows.append([to_pil(x.float().cpu()) for x in images])
    return rows


def generate(run_dir: str, prompts: list[str], *, weights: str = "ema", size: str = "", original_size: str = "",
             crop: str = "", **kwargs) -> list[list[Image.Image]]:
    """`size`, `original_size`: "WxH" pixels ("" the cache's square resolution; the size); `crop`: "TOP,LEFT"
    pixels (SDXL runs only, like original_size)."""
    unet, vae, text_encoder, cfg, manifest = load_run(run_dir, weights)
    wh = parse_size(size, manifest.vae.downsample_factor) if size else None
    if (original_size or crop) and not manifest.pooled_dim:
        raise config_lib.ConfigError("original size and crop condition SDXL runs (a cache of two text encoders); "
                                     f"{run_dir} has no such conditioning")
    original = parse_size(original_size, 1) if original_size else None
    top_left = (0, 0)
    if crop:
        top, _, left = crop.partition(",")
        if not (top.strip().isdigit() and left.strip().isdigit()):
            raise config_lib.ConfigError(f"crop must be TOP,LEFT in pixels, e.g. 0,128; got {crop!r}")
        top_left = (int(top), int(left))
    return sample_rows(unet, vae, text_encoder, manifest, cfg, prompts, size=wh, original_size=original, crop=top_left,
                       **kwargs)


def _tile(im: Image.Image, tile: int) -> Image.Image:
    """A grid tile: downscaled with a Lanczos filter (nearest-neighbour would alias fine
    detail into noise), enlarged with nearest-neighbour so that a small model's pixels show
    as drawn."""
    if im.size == (tile, tile):
        return im
    shrinking = im.width > tile or im.height > tile
    return im.resize((tile, tile), Image.Resampling.LANCZOS if shrinking else Image.Resampling.NEAREST,
                     reducing_gap=3.0 if shrinking else None)


_ORIGINAL = re.compile(r"p\d{3,}_\d{3,}\.png")  # the full-size files save_grid writes (row = prompt, column)


def save_grid(rows: list[list[Image.Image]], prompts: list[str], out: str, tile: int = 128,
              originals: bool = True) -> str:
    """One row per prompt, the prompt written above it, each image shrunk or enlarged to a
    `tile`-pixel square. With `originals`, every image is also saved at its real size beside
    the grid, in OUT without .png: pRRR_CCC.png (row = prompt index, column = image), and the
    prompts in order in prompts.json there."""
    tiles = [[_tile(im, tile) for im in row] for row in rows]
    label_h, cols = 16, max(len(r) for r in tiles)
    canvas = Image.new("RGB", (cols * tile, len(tiles) * (tile + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (row, prompt) in enumerate(zip(tiles, prompts)):
        y = r * (tile + label_h)
        draw.text((4, y + 2), prompt, fill=(0, 0, 0))
        canvas.paste(grid(row, cols), (0, y + label_h))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    canvas.save(out)
    if originals:
        folder = os.path.splitext(out)[0]
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):  # an earlier call's images that this one does not overwrite
            if _ORIGINAL.fullmatch(name):
                os.remove(os.path.join(folder, name))
        for r, row in enumerate(rows):
            for c, im in enumerate(row):
                im.save(os.path.join(folder, f"p{r:03d}_{c:03d}.png"))
        with open(os.path.join(folder, "prompts.json"), "w") as f:
            json.dump(list(prompts[:len(rows)]), f, indent=1)
    return out


class Validator:
    """Grids of a fixed prompt list during training, so a run's progress can be seen.

    Every rank calls it (gathering ZeRO-3 weights is collective); rank 0 samples with a
    plain copy of the UNet holding the EMA (or current) weights and writes
    run_dir/samples/step_XXXXXXXXX.png (also logged to wandb), and each image at full size in
    run_dir/samples/step_XXXXXXXXX/.
    """

    def __init__(self, cfg: UNetJob, manifest: Manifest, device: torch.device, is_main: bool):
        self.cfg, self.manifest, self.device, self.is_main = cfg, manifest, device, is_main
        self.frozen = load_frozen(manifest, cfg.data.urls) if is_main else None

    def __call__(self, step: int, ema_state: dict | None, engine, runlog, samples: int = 0) -> str | None:
        from trainer.core.engine import full_weights
        from trainer.unet.job import ema_note

        if self.is_main:  # which weights the grid shows (#29: an EMA behind the training looked untrained)
            which = ema_note(self.cfg, samples)[0] if ema_state is not None else "trained weights (no EMA)"
            print(f"validation grid at step {step}: the {which}")
        if ema_state is None:
            with full_weights(engine) as module:
                ema_state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        if not self.is_main:
            return None
        if self.cfg.lora_rank:  # the EMA holds the adapters: on a fresh copy of the pretrained base
            unet = lora_unet(self.cfg, self.manifest)
            unet.load_state_dict(ema_state, strict=False)
        else:
            unet = type(engine.module).from_config(engine.module.config)
            unet.load_state_dict(ema_state)
        unet = unet.to(self.device).eval()
        vae, text_encoder = (m.to(self.device) for m in self.frozen)
        adapted = attached_text_encoder(unet)  # lora_text_encoder: the adapted text encoder
        text_encoder = adapted if adapted is not None else text_encoder
        rows = sample_rows(unet, vae, text_encoder, self.manifest, self.cfg, self.cfg.validation_prompts,
                           steps=self.cfg.validation_steps, seed=self.cfg.seed, guidance=self.cfg.validation_guidance,
                           negative_prompt=self.cfg.validation_negative_prompt)
        out = save_grid(rows, self.cfg.validation_prompts,
                        os.path.join(self.cfg.run_dir, "samples", f"step_{step:09d}.png"))
        runlog.log_image(step, "validation", out)
        del unet
        return out
