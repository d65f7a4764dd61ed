"""Export a trained run as a complete diffusers Stable Diffusion (or SDXL) pipeline folder.

    OUT/model_index.json  what StableDiffusionPipeline.from_pretrained(OUT) reads: no other input needed
    OUT/unet/             the newest complete checkpoint's UNet: its EMA weights where the run kept an
                          EMA, else the trained weights (safetensors; gathered under ZeRO-3)
    OUT/vae/              the frozen autoencoder the cache was made with (AutoencoderKL only)
    OUT/text_encoder/     the cache's text encoder as a transformers CLIPTextModel: a pipeline folder's
    OUT/tokenizer/        as it was; an OpenCLIP tower converted (models/clip_convert.py)
    OUT/scheduler/        DDIM over the training noise schedule (what launch/sample.py samples with)
    OUT/ldm.json          provenance: checkpoint, weights, prediction type, latent normalisation,
                          the cache's encoders

A run on a cache of SDXL's two text encoders becomes a StableDiffusionXLPipeline: text_encoder/ +
tokenizer/ and text_encoder_2/ + tokenizer_2/ as the pipeline folder had them, and
force_zeros_for_empty_prompt set, since caption dropout trained the unconditional side on zeros.

A LoRA run exports its adapters as diffusers' `pytorch_lora_weights.safetensors` (for
`pipe.load_lora_weights(OUT)` on the pretrained pipeline); with format kohya (or single_file) as
`lora_kohya.safetensors` in kohya's layout, the file A1111 and ComfyUI load and load_lora_weights
converts; with `merge` the complete pipeline above with the adapters folded into the UNet (or, with
single_file, one merged model file).

A pipeline applies one latent scale, `vae.config.scaling_factor`. A run trained with
latent_norm=per_channel saw (z - mean_c) / std_c per channel; that affine map is folded into
the exported VAE's 1x1 quant_conv (encoder side) and post_quant_conv (decoder side), and its
scaling_factor set to 1, so the pipeline decodes exactly what the UNet was trained on.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from data_pipeline import storage
from models.autoencoder import encoder_identity, load_autoencoder
from models.clip_convert import openclip_to_transformers, write_clip_tokenizer
from models.diffusion import make_sampler
from models.single_file import to_original
from models.flow_model import family_of
from models.flow_text import FlowTextEncoder
from models.text_encoder import CLIPTextEncoder, DualTextEncoder

from trainer.core.checkpoint import default_root, latest
from trainer.core.config import ConfigError
from trainer.unet.job import ema_note
from trainer.unet.lora import merged, save_kohya_lora, save_lora_weights
from trainer.unet.model_card import write_model_card
from trainer.unet.pretrained import training_schedule
from trainer.unet.sampling import load_run


def fold_latent_affine(vae, shift: torch.Tensor, scale: torch.Tensor):
    """The VAE, changed in place so that its latents are (z - shift) * scale and scaling_factor is 1.

    Encoder: the posterior mean becomes (mean - shift) * scale and log-variance gains 2 ln scale,
    both affine in quant_conv's output. Decoder: post_quant_conv(z) with z = z' / scale + shift is
    W (z' / scale) + (W shift + b), a 1x1 convolution of z' again. Exact up to float rounding."""
    from diffusers import AutoencoderKL

    if not isinstance(vae, AutoencoderKL) or vae.quant_conv is None or vae.post_quant_conv is None:
        raise ConfigError("latent_norm=per_channel can only be exported with an AutoencoderKL that has quant_conv "
                          "and post_quant_conv (where the per-channel statistics are folded in)")
    shift, scale = shift.flatten().double(), scale.flatten().double()
    c = shift.numel()
    with torch.no_grad():
        q = vae.quant_conv
        w, b = q.weight.double(), q.bias.double()
        w[:c] *= scale.view(-1, 1, 1, 1)
        b[:c] = (b[:c] - shift) * scale
        b[c:] += 2 * torch.log(scale)
        q.weight.copy_(w), q.bias.copy_(b)
        p = vae.post_quant_conv
        w, b = p.weight.double(), p.bias.double()
        b = b + (w[:, :, 0, 0] @ shift)
        w = w / scale.view(1, -1, 1, 1)
        p.weight.copy_(w), p.bias.copy_(b)
    vae.register_to_config(scaling_factor=1.0)
    return vae


def pipeline_text_encoder(text_encoder):
    """(CLIPTextModel, CLIPTokenizer) whose last_hidden_state is what the cache stored."""
    import tempfile

    from transformers import CLIPTokenizer

    if isinstance(text_encoder, CLIPTextEncoder):
        model = text_encoder.model
        if text_encoder.layer == "penultimate":  # a pipeline reads the last layer: drop the one after it
            import copy

            model = copy.deepcopy(model)
            inner = getattr(model, "text_model", model)  # transformers 4.x nests it, 5.x does not
            inner.encoder.layers = inner.encoder.layers[:-1]
            model.config.num_hidden_layers -= 1
        return model, text_encoder.tokenizer
    try:
        model = openclip_to_transformers(text_encoder.tower, text_encoder.layer)
    except ValueError as e:  # a tower transformers' CLIP cannot express (activation, layer scale)
        raise ConfigError(f"cannot export the run's text encoder {text_encoder.name}: {e}") from None
    with tempfile.TemporaryDirectory() as tmp:
        # OpenCLIP pads with id 0 ("!"), as SD 2.x's tokenizer does.
        write_clip_tokenizer(tmp, text_encoder.context_length, pad_token="!")
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    return model, tokenizer


def sdxl_text_encoders(dual: DualTextEncoder) -> list[tuple]:
    """[(CLIPTextModel, tokenizer), (CLIPTextModelWithProjection, tokenizer)] whose hidden_states[-2] (and the
    second's text_embeds) are what the cache stored: a pipeline folder's as they were; OpenCLIP towers (a
    from-scratch pair) converted whole, with CLIP tokenizers padding with "!" as OpenCLIP does."""
    import tempfile

    from transformers import CLIPTokenizer

    out = []
    for part, projection in ((dual.first, False), (dual.second, True)):
        if isinstance(part, CLIPTextEncoder):
            out.append((part.model, part.tokenizer))
            continue
        try:
            model = openclip_to_transformers(part.tower, "last", with_projection=projection)
        except ValueError as e:
            raise ConfigError(f"cannot export the run's text encoder {part.name}: {e}") from None
        with tempfile.TemporaryDirectory() as tmp:
            write_clip_tokenizer(tmp, part.context_length, pad_token="!")
            out.append((model, CLIPTokenizer.from_pretrained(tmp)))
    return out


def swap_decoder(vae, source: str):
    """The autoencoder at `source` in place of the cache's, allowed when its encoder is the same
    (a decoder-only fine-tune, train_autoencoder train_encoder=false): the latents the UNet
    learnt are exactly what it encodes, and its decoder is the improved one."""
    other = load_autoencoder(source)
    if encoder_identity(other) != encoder_identity(vae):
        raise ConfigError(f"--vae {source} has another encoder than the VAE the cache was made with: only a VAE "
                          "whose encoder was frozen (train_autoencoder train_encoder=false) decodes this run's latents")
    return other


def build_pipeline(run_dir: str, weights: str = "ema", loaded=None, vae_source: str = ""):
    """(StableDiffusion(XL)Pipeline of the run's newest checkpoint, provenance dict for ldm.json).
    A LoRA run's UNet has its adapters merged. `loaded`: load_run's result, if already at hand;
    `vae_source`: a decoder fine-tune of the cache's VAE to ship instead (swap_decoder)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline

    unet, vae, text_encoder, cfg, manifest = loaded or load_run(run_dir, weights)
    if vae_source:
        vae = swap_decoder(vae, vae_source)
    if cfg.lora_rank:
        unet = merged(unet)
    if isinstance(text_encoder, FlowTextEncoder):  # SD3 / Flux (#30)
        return flow_pipeline(unet, vae, text_encoder, cfg, manifest), provenance(run_dir, cfg, manifest, weights,
                                                                                 vae_source)
    if not isinstance(vae, AutoencoderKL):
        raise ConfigError(f"the run's first stage is a {type(vae).__name__} ({manifest.vae.source}); a Stable Diffusion "
                          "pipeline decodes with an AutoencoderKL, so this run cannot be exported as one")
    shift, scale = manifest.latent_affine(cfg.latent_norm)
    if cfg.latent_norm == "per_channel":
        vae = fold_latent_affine(vae, shift, scale)
    schedule = training_schedule(cfg)
    scheduler = make_sampler("ddim", schedule.config)
    if isinstance(text_encoder, DualTextEncoder):  # SDXL: both encoders as the pipeline folder had them
        (model, tokenizer), (model_2, tokenizer_2) = sdxl_text_encoders(text_encoder)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=model, text_encoder_2=model_2, tokenizer=tokenizer,
                                         tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True)
    else:
        model, tokenizer = pipeline_text_encoder(text_encoder)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=model, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    info = provenance(run_dir, cfg, manifest, weights, vae_source)
    assert math.isclose(pipe.vae.config.scaling_factor, 1.0 if cfg.latent_norm == "per_channel"
                        else manifest.vae.scaling_factor)
    return pipe, info


def provenance(run_dir: str, cfg, manifest, weights: str, vae_source: str) -> dict:
    """ldm.json of a pipeline export: checkpoint, weights, objective, latent normalisation, the cache's encoders."""
    shift, scale = manifest.latent_affine(cfg.latent_norm)
    return {
        "checkpoint": latest(cfg.checkpoint_url or default_root(run_dir), cfg.checkpoint_endpoint_url),
        "weights": "ema" if weights == "ema" and cfg.ema_halflife_samples else "raw",
        "prediction_type": cfg.prediction_type,
        "pretrained": cfg.pretrained,
        "latent_norm": {"kind": cfg.latent_norm, "shift": shift.flatten().tolist(), "scale": scale.flatten().tolist(),
                        "folded_into_vae": cfg.latent_norm == "per_channel"},
        "vae": {**dataclasses.asdict(manifest.vae), "folder": "vae", "decoder_from": vae_source or None},
        "text_encoder": dataclasses.asdict(manifest.text_encoder),
        "resolution": manifest.resolution,
    }


def flow_pipeline(transformer, vae, text_encoder: FlowTextEncoder, cfg, manifest):
    """A StableDiffusion3Pipeline or FluxPipeline of the trained transformer, the cache's VAE and text encoders
    (a pretrained folder's, checked by identity), and the scheduler it trained with. A T5 length other than the
    pipeline's default (the cache's text_max_tokens) is a call argument there: `max_sequence_length`."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    scheduler = training_schedule(cfg)
    clips, toks = list(text_encoder.clips), text_encoder.clip_tokenizers
    if text_encoder.family == "sd3":
        return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clips[0],
                                        tokenizer=toks[0], text_encoder_2=clips[1], tokenizer_2=toks[1],
                                        text_encoder_3=text_encoder.t5, tokenizer_3=text_encoder.t5_tokenizer)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clips[0], tokenizer=toks[0],
                        text_encoder_2=text_encoder.t5, tokenizer_2=text_encoder.t5_tokenizer)


FORMATS = ("diffusers", "single_file", "kohya")
SINGLE_FILE = "model.safetensors"  # the single-file export's name inside OUT


def describe_weights(run_dir: str, cfg, weights: str) -> tuple[str, bool]:
    """What an export of the run's newest checkpoint with `weights` holds, and whether to warn (#29)."""
    ckpt = latest(cfg.checkpoint_url or default_root(run_dir), cfg.checkpoint_endpoint_url) or ""
    samples = int(os.path.basename(ckpt.rstrip("/")).rpartition("_")[2] or 0)
    if weights == "ema" and cfg.ema_halflife_samples:
        return ema_note(cfg, samples)
    return f"trained weights ({samples} samples{'' if weights == 'raw' else '; the run kept no EMA'})", False


def export_run(run_dir: str, out: str, weights: str = "ema", merge: bool = False, fmt: str = "diffusers",
               vae_source: str = "", say=print, trigger: str = "") -> str:
    """Write the run into the new folder `out`: a complete pipeline; for a LoRA run its diffusers
    LoRA file (for the pretrained pipeline's load_lora_weights), or with `merge` a complete
    pipeline with the adapters folded into the UNet. fmt=single_file: OUT/model.safetensors in
    the original SD layout instead (models/single_file.py; a LoRA run's adapters merged)."""
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"export folder {out} is not empty; choose a new one")
    loaded = load_run(run_dir, weights)
    cfg = loaded[3]
    text, warn = describe_weights(run_dir, cfg, weights)
    say(f"{'warning: ' if warn else ''}exporting the {text}")
    family = family_of(loaded[0])
    if family and fmt != "diffusers":
        raise ConfigError(f"--format {fmt}: an {family} run exports as a diffusers pipeline (or diffusers' LoRA file); "
                          "the single-file and kohya layouts of SD3 and Flux are not written yet")
    if merge and not cfg.lora_rank:
        raise ConfigError(f"--merge folds LoRA adapters into the UNet, and {run_dir} trained all weights (lora_rank=0)")
    if fmt == "kohya" and (not cfg.lora_rank or merge):
        raise ConfigError("--format kohya writes a LoRA adapter file: " + (
            f"{run_dir} trained all weights (lora_rank=0); use diffusers or single_file" if not cfg.lora_rank else
            "it is the adapter alone, leave out --merge (or --format single_file --merge for a merged model)"))
    if vae_source and cfg.lora_rank and not merge and fmt == "diffusers":
        raise ConfigError("--vae ships a VAE in a pipeline; a LoRA file holds the adapters alone: add --merge")
    # Written into a temporary sibling, renamed to `out` when whole: an export stopped half-way (a full
    # disk, a kill) leaves no folder a later user would load as an export (#27).
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o777 & ~umask)  # as os.makedirs would have made it (mkdtemp's is private)
    try:
        _write(partial, run_dir, weights, loaded, vae_source, fmt, merge)
        files = sorted(f for f in os.listdir(partial) if f.endswith(".safetensors"))
        write_model_card(partial, run_dir, cfg, loaded[4], files, text, trigger)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.rename(partial, out)
    except Exception as e:
        shutil.rmtree(partial, ignore_errors=True)
        if not storage.is_disk_full(e):
            raise
        raise FileExistsError(storage.disk_full(out, "the export", _weight_bytes(loaded)) + "; nothing was left "
                              f"at {out}") from None
    return out


def _weight_bytes(loaded) -> int:
    """What the run's weights take in fp32: about what an export of them writes."""
    return sum(p.numel() * 4 for m in loaded[:3] if isinstance(m, torch.nn.Module) for p in m.parameters())


def _write(out: str, run_dir: str, weights: str, loaded, vae_source: str, fmt: str, merge: bool) -> None:
    cfg = loaded[3]
    if cfg.lora_rank and not merge and fmt in ("kohya", "single_file"):  # the single-file tools' LoRA: the adapter alone
        save_kohya_lora(loaded[0], out, cfg)
        info = {"lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha or cfg.lora_rank, "format": "kohya",
                         "targets": list(cfg.lora_targets),
                         "text_encoder": cfg.lora_text_encoder}, "pretrained": cfg.pretrained, "weights": weights,
                "base_fingerprint": getattr(loaded[0], "ldm_base_fingerprint", None)}
    elif fmt == "single_file":
        pipe, info = build_pipeline(run_dir, weights, loaded, vae_source)
        try:
            state = to_original(pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        save_file(state, os.path.join(out, SINGLE_FILE), metadata={"format": "pt"})
        info["format"] = "single_file"
    elif cfg.lora_rank and not merge:
        save_lora_weights(loaded[0], out, cfg)
        info = {"lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha or cfg.lora_rank,
                         "targets": list(cfg.lora_targets),
                         "text_encoder": cfg.lora_text_encoder}, "pretrained": cfg.pretrained, "weights": weights,
                "base_fingerprint": getattr(loaded[0], "ldm_base_fingerprint", None)}  # the base it adapts
    else:
        pipe, info = build_pipeline(run_dir, weights, loaded, vae_source)
        pipe.save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "ldm.json"), "w") as f:
        json.dump(info, f, indent=1)
