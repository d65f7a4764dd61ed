"""Size a run before booking it: precompute GPU-hours, cache size, training speed, S3 bandwidth.

    python benchmarks/plan.py --images 2e9 --resolution 512 --gpus 256 --gpu h100
    python benchmarks/plan.py --images 1e8 --resolution 1024 --gpus 64 --gpu h100 --model flux

No hardware needed. The FLOPs per image are counted with torch.utils.flop_counter on
shape-only (meta-device) copies of the real models: the UNet's forward + backward, the VAE
encoder's and the text encoder's forward. Bytes per cached sample are those of the real cache
format (data_pipeline/latents.encode_sample on zero tensors of the right shapes). What is
assumed, not measured: the MFU of the encode (--encode-mfu) and the GPUs per node. The training MFU is
the best one benchmarks/gpu.py measured for the model (docs/gpu/, the file and card named), unless
--train-mfu gives one.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_DOCS = os.path.join(ROOT, "docs", "gpu")  # benchmarks/gpu.py's committed figures
sys.path.insert(0, ROOT)

from data_pipeline.latents import encode_sample  # noqa: E402
from models.autoencoder import build_autoencoder  # noqa: E402
from models.unet import build_unet  # noqa: E402
from trainer.core.flops import PEAK_TFLOPS, forward_flops_per_sample, gpu_table_key, unet_train_flops_per_sample  # noqa: E402

# UNet preset -> (OpenCLIP/CLIP text tower config names, context width, pooled width); SD 1.5 uses
# OpenAI's CLIP ViT-L/14 text tower, SD 2.x OpenCLIP ViT-H/14's, SDXL both ViT-L/14 and bigG/14 (their
# penultimate layers concatenated, 768 + 1280, and bigG's 1280-d pooled embedding).
TEXT = {"sd15": (("ViT-L-14",), 768, 0), "sd21": (("ViT-H-14",), 1024, 0),
        "sdxl": (("ViT-L-14", "ViT-bigG-14"), 2048, 1280)}
CONTEXT_TOKENS = 77
# Rectified-flow transformers (#30): their released architectures (models/flow_model.py's presets of SD3.5 Large
# and Flux.1-dev), CLIP towers (SD3: L and bigG; Flux: L's pooled output) and T5-XXL's encoder.
FLOW = {
    "sd3": dict(preset="sd35_large", clip=("ViT-L-14", "ViT-bigG-14"), clip_states=2048, pooled=2048, t5=256),
    "flux": dict(preset="flux_dev", clip=("ViT-L-14",), clip_states=0, pooled=768, t5=512),
}
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")
TAR_HEADER_BYTES = 512 * 4 * 2  # four members (.safetensors, .txt, .json, .sha256): header + padding, roughly


def text_tower_flops(name: str) -> float:
    import open_clip

    cfg = open_clip.get_model_config(name)
    with torch.device("meta"):
        tower = open_clip.model._build_text_tower(cfg["embed_dim"], open_clip.model.CLIPTextCfg(**cfg["text_cfg"]))
        tokens = torch.zeros(2, CONTEXT_TOKENS, dtype=torch.long)
    return forward_flops_per_sample(lambda: tower(tokens), 2)


def sample_bytes(latent_shape: tuple[int, int, int], context_dim: int, flip: bool, caption_bytes: int,
                 pooled_dim: int = 0) -> int:
    z = torch.zeros(latent_shape)
    tensors = {"mean": z, "std": z, "text_emb": torch.zeros(CONTEXT_TOKENS, context_dim)}
    if pooled_dim:
        tensors["pooled"] = torch.zeros(pooled_dim)
    if flip:
        tensors.update(mean_flip=z, std_flip=z)
    side = latent_shape[-1] * 8
    meta = {"original_size": [side, side], "crop_box": [0, 0, side, side], "target_size": [side, side],
            "crop_top_left": [0, 0]}
    sample = encode_sample("k" * 16, tensors, "x" * caption_bytes, meta)
    return sum(len(v) for k, v in sample.items() if k != "__key__") + TAR_HEADER_BYTES


def flow_costs(family: str, resolution: int, caption_tokens: int, caption_bytes: int, flip: bool) -> dict:
    """FLOPs per image (transformer forward + backward, 16-channel VAE encoder, CLIP + T5-XXL) and bytes per cached
    sample (T5's states at `caption_tokens` tokens as the cache keeps them, against the full padded length, and
    the token-id cache) for an SD3- or Flux-class run, on shape-only models."""
    import diffusers
    from transformers import T5Config, T5EncoderModel

    from models.flow_model import build_preset
    from trainer.core.flops import flow_train_flops_per_sample

    spec, side = FLOW[family], resolution // 8
    with torch.device("meta"):
        model = build_preset(spec["preset"], 16, side, 4096, spec["pooled"])
        vae = diffusers.AutoencoderKL(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        t5 = T5EncoderModel(T5Config(**T5_XXL))
        pixels, ids = torch.zeros(1, 3, resolution, resolution), torch.zeros(1, spec["t5"], dtype=torch.long)
    text_tokens = spec["t5"] + (CONTEXT_TOKENS if spec["clip_states"] else 0)
    train = flow_train_flops_per_sample(model, family, (16, side, side), (text_tokens, 4096), spec["pooled"], 1)
    text = forward_flops_per_sample(lambda: t5(ids), 1) + sum(text_tower_flops(n) for n in spec["clip"])
    z = torch.zeros(16, side, side)
    tensors = {"mean": z, "std": z, "pooled": torch.zeros(spec["pooled"]), **({"mean_flip": z, "std_flip": z} if flip else {})}
    if spec["clip_states"]:
        tensors["clip_emb"] = torch.zeros(CONTEXT_TOKENS, spec["clip_states"])
    meta = {"original_size": [resolution] * 2, "crop_box": [0, 0, resolution, resolution],
            "target_size": [resolution] * 2, "crop_top_left": [0, 0]}

    def size(extra: dict) -> int:
        sample = encode_sample("k" * 16, {**tensors, **extra}, "x" * caption_bytes, meta)
        return sum(len(v) for k, v in sample.items() if k != "__key__") + TAR_HEADER_BYTES

    state = lambda n: torch.zeros(n, 4096, dtype=torch.bfloat16)  # noqa: E731
    ids_only = {"mean": z, "std": z, **({"mean_flip": z, "std_flip": z} if flip else {}),
                "tokens": torch.zeros(CONTEXT_TOKENS * len(spec["clip"]) + spec["t5"], dtype=torch.int32)}
    tokens_bytes = sum(len(v) for k, v in encode_sample("k" * 16, ids_only, "x" * caption_bytes, meta).items()
                       if k != "__key__") + TAR_HEADER_BYTES
    return {"train": train, "vae": forward_flops_per_sample(lambda: vae.encode(pixels), 1), "text": text,
            "params": sum(p.numel() for p in model.parameters()), "bytes": size({"text_emb": state(caption_tokens)}),
            "bytes_full": size({"text_emb": state(spec["t5"])}), "bytes_tokens": tokens_bytes,
            "text_tokens": text_tokens, "t5": spec["t5"]}


def zero_model_states_gb(params: int, ranks: int) -> list[tuple[str, str]]:
    """Model-state memory per rank with bf16 as the trainer runs it (trainer/core/engine.py: autocast over fp32
    weights): 4 B fp32 parameter + 4 B fp32 gradient + 4 B fp32 master partition + 8 B Adam m, v per parameter,
    partitioned stage by stage as in Rajbhandari et al. 2019 (sec. 5); ZeRO-0 keeps no separate master copy
    (16 B/param). With the optimizer state offloaded to host memory (ZeRO-Offload), master, Adam and the
    gradient partition leave the GPU. Activations come on top and at 1024 px dominate: gradient checkpointing
    is what bounds them."""
    gb, n = params / 1e9, ranks
    rows = [(f"ZeRO-{stage}", f"{gpu * gb:,.1f} GB on the GPU" + (f" + {host * gb:,.1f} GB host ({label})" if host else ""))
            for stage, gpu, host, label in (
                (0, 16, 0, ""), (1, 8 + 12 / n, 0, ""), (2, 4 + 16 / n, 0, ""), (3, 20 / n, 0, ""),
                ("2 + offload", 4, 16 / n, "fp32 master, Adam, gradient partition"),
                ("3 + offload", 4 / n, 16 / n, "fp32 master, Adam, gradient partition"))]
    return rows


# GPU memory in GB by PEAK_TFLOPS key (the common part; A100 also ships with 40 GB): for fewest_gpus.
MEMORY_GB = {"H100 SXM": 80, "H100 PCIe": 80, "H100 NVL": 94, "H200": 141, "B200": 180, "A100": 80, "A10G": 24,
             "A10": 24, "L4": 24, "L40S": 48, "RTX 4090": 24, "V100 PCIe": 32, "V100": 32}


def fewest_gpus(params: int, memory_gb: float, usable: float = 0.8) -> list[tuple[str, str]]:
    """For each ZeRO stage, the fewest GPUs whose memory (`usable` of it; the rest goes to activations, which
    gradient checkpointing bounds, and to the allocator) holds the model states of zero_model_states_gb."""
    budget, gb, rows = memory_gb * usable, params / 1e9, []
    for stage, fixed, shared in ((0, 16, 0), (1, 8, 12), (2, 4, 16), (3, 0, 20)):
        if fixed * gb >= budget:
            rows.append((f"ZeRO-{stage}", f"does not fit ({fixed * gb:,.0f} GB a GPU before any partitioning)"))
            continue
        n = 1 if not shared else max(1, -(-shared * gb // (budget - fixed * gb)))
        rows.append((f"ZeRO-{stage}", f"{int(n)} GPU(s) ({(fixed + shared / n) * gb:,.1f} GB of model states each)"))
    return rows


def measured_mfu(preset: str, resolution: int, folder: str = GPU_DOCS) -> tuple[float, str] | None:
    """The best training MFU benchmarks/gpu.py measured for `preset` at the resolution nearest `resolution`,
    from the newest JSON under docs/gpu/ that has one; (mfu, where it comes from) or None."""
    found = []
    for path in glob.glob(os.path.join(folder, "*.json")):
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(d, dict) or d.get("benchmark") != "gpu" or d.get("smoke"):
            continue
        rows = [r for r in d.get("rows", []) if isinstance(r, dict) and r.get("preset") == preset
                and r.get("kind", "framework") == "framework"
                and all(isinstance(r.get(k), (int, float)) and r.get(k) > 0 for k in ("mfu", "resolution", "batch"))]
        if rows:
            best = min(rows, key=lambda r: (abs(r["resolution"] - resolution), -r["mfu"]))
            found.append((d.get("date", ""), best, d.get("device", "?"), os.path.relpath(path, ROOT)))
    if not found:
        return None
    date, row, device, path = max(found, key=lambda x: x[0])
    return row["mfu"], f"measured: {preset} at {row['resolution']} px, batch {row['batch']}, on {device}, {path}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=float, required=True, help="images in the data set (e.g. 2e9)")
    p.add_argument("--resolution", type=int, default=512, help="training resolution in pixels (f=8 VAE)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs for training (and for the precompute)")
    p.add_argument("--gpu", default="h100", help="GPU kind: " + ", ".join(PEAK_TFLOPS))
    p.add_argument("--model", choices=(*TEXT, *FLOW), default="sd21",
                   help="UNet preset, or sd3 (SD3.5 Large) / flux (Flux.1-dev): rectified-flow transformers")
    p.add_argument("--caption-tokens", type=int, default=40,
                   help="sd3/flux: average T5 tokens of a caption (its states are what the cache keeps)")
    p.add_argument("--train-mfu", type=float, default=0.0,
                   help="MFU of training; 0: the best one measured for --model in docs/gpu/ (else 0.40, assumed)")
    p.add_argument("--encode-mfu", type=float, default=0.30, help="assumed MFU of the VAE + text encode")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--flip", action="store_true", help="cache the mirrored image's moments too")
    p.add_argument("--caption-bytes", type=int, default=120, help="average caption length in bytes")
    args = p.parse_args()
    key = gpu_table_key(args.gpu.upper()) or next((k for k in PEAK_TFLOPS if k.lower().startswith(args.gpu.lower())), None)
    if key is None:
        sys.exit(f"error: unknown --gpu {args.gpu!r}; known: {', '.join(PEAK_TFLOPS)}")
    peak = PEAK_TFLOPS[key]["bf16"] * 1e12 if "bf16" in PEAK_TFLOPS[key] else PEAK_TFLOPS[key]["fp16"] * 1e12
    if args.resolution % 8:
        sys.exit(f"error: --resolution {args.resolution} is not a multiple of 8 (the VAE's downsampling)")

    # --- FLOPs per image, counted on shape-only models -----------------------------------------
    side = args.resolution // 8
    flow = args.model in FLOW
    if flow:
        costs = flow_costs(args.model, args.resolution, args.caption_tokens, args.caption_bytes, args.flip)
        unet_flops, vae_flops, text_flops, params = costs["train"], costs["vae"], costs["text"], costs["params"]
        per_sample = costs["bytes"]
        text_names = (*FLOW[args.model]["clip"], "T5-XXL")
    else:
        text_names, context_dim, pooled_dim = TEXT[args.model]
        with torch.device("meta"):
            unet = build_unet(args.model, 4, side, context_dim, pooled_dim=pooled_dim)
            vae = build_autoencoder("sd")
            pixels = torch.zeros(1, 3, args.resolution, args.resolution)
        unet_flops = unet_train_flops_per_sample(unet, (4, side, side), (CONTEXT_TOKENS, context_dim), batch_size=1)
        vae_flops = forward_flops_per_sample(lambda: vae.encode(pixels), 1)
        text_flops = sum(text_tower_flops(name) for name in text_names)
        per_sample = sample_bytes((4, side, side), context_dim, args.flip, args.caption_bytes, pooled_dim)
        params = sum(p.numel() for p in unet.parameters())

    # --- the plan ---------------------------------------------------------------------------------
    given = args.train_mfu > 0
    measured = None if given else measured_mfu(args.model, args.resolution)
    if not given:
        args.train_mfu = measured[0] if measured else 0.40
    mfu_source = "given (--train-mfu)" if given else (
        measured[1] if measured else "assumed: no measurement of this model in docs/gpu")
    images = args.images
    encode_s = images * (vae_flops + text_flops) / (peak * args.encode_mfu)
    train_rate = args.gpus * peak * args.train_mfu / unet_flops
    epoch_days = images / train_rate / 86400
    nodes = max(1, args.gpus // args.gpus_per_node)
    read_gb_s_node = train_rate / nodes * per_sample / 1e9
    rows = [
        ("GPU", f"{key}: {peak / 1e12:.0f} TFLOP/s dense bf16 peak"),
        ("UNet forward + backward" if not flow else "transformer fwd + bwd",
         f"{unet_flops / 1e12:.2f} TFLOP per image ({args.model}, {params / 1e9:.2f}B parameters, {side}x{side}x"
         f"{16 if flow else 4} latents" + (f", {costs['text_tokens']} text tokens)" if flow else ")")),
        ("VAE encoder forward", f"{vae_flops / 1e12:.2f} TFLOP per image ({args.resolution} px)"),
        ("text encoder forward", f"{text_flops / 1e9:.1f} GFLOP per caption ({' + '.join(text_names)}, "
                                 f"{CONTEXT_TOKENS} tokens" + (f"; T5: {costs['t5']})" if flow else ")")),
        ("precompute", f"{encode_s / 3600:,.0f} GPU-hours at {args.encode_mfu:.0%} MFU "
                       f"({encode_s / 3600 / args.gpus:,.1f} h on {args.gpus} GPUs)"),
        ("cache on disk", f"{per_sample / 1e3:.0f} KB per sample, {images * per_sample / 1e12:,.0f} TB in all"
                          + (f" (T5 states of {args.caption_tokens} tokens, bf16)" if flow else "")),
        *([("  padded T5 instead", f"{costs['bytes_full'] / 1e3:.0f} KB per sample, "
                                   f"{images * costs['bytes_full'] / 1e12:,.0f} TB: all {costs['t5']} tokens' states"),
           ("  token ids instead", f"{costs['bytes_tokens'] / 1e3:.0f} KB per sample, "
                                   f"{images * costs['bytes_tokens'] / 1e12:,.0f} TB; each step then runs CLIP and T5: "
                                   f"{(unet_flops + text_flops) / unet_flops:.2f}x the cached step's FLOPs")]
          if flow else []),
        ("training", f"{train_rate:,.0f} images/s at {args.train_mfu:.1%} MFU ({train_rate / args.gpus:.0f} per GPU)"),
        ("training MFU", mfu_source),
        ("one epoch", f"{epoch_days:.1f} days; {args.epochs:g} epoch(s): {epoch_days * args.epochs:.1f} days"),
        ("S3 read per node", f"{read_gb_s_node:.2f} GB/s ({nodes} nodes of {args.gpus_per_node} GPUs)"),
        ("on the fly instead", f"each step would cost {(unet_flops + vae_flops + text_flops) / unet_flops:.2f}x "
                               "the cached step's FLOPs"),
    ]
    zero = zero_model_states_gb(params, args.gpus)
    width = max(len(k) for k, _ in rows + zero)
    print(f"plan: {images:,.0f} images at {args.resolution} px, {args.gpus} x {key}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"model states per rank at {args.gpus} ranks (bf16 autocast over fp32 weights, fp32 Adam; "
          "activations not included):")
    for k, v in zero:
        print(f"  {k:<{width}}  {v}")
    if key in MEMORY_GB:
        print(f"fewest {key} GPUs ({MEMORY_GB[key]} GB) whose memory holds the model states, 80% of it used for them:")
        for k, v in fewest_gpus(params, MEMORY_GB[key]):
            print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    main()
