"""An export's README.md in the layout the Hugging Face hub shows (a model card), and the upload.

The card's YAML front matter is what the hub indexes (base_model, library_name, tags,
instance_prompt); the text says what was trained, on how much data, with which settings and
weights, how to load it, and shows the run's newest validation grid (copied in as samples.png).
"""
from __future__ import annotations

import glob
import os
import shutil

import yaml

from trainer.core.config import ConfigError, looks_like_hub_id

CARD = "README.md"


def write_model_card(out: str, run_dir: str, cfg, manifest, files: list[str], weights_text: str,
                     trigger: str = "") -> str:
    """Write OUT/README.md (and OUT/samples.png from the newest validation grid, where there is one)."""
    lora = bool(cfg.lora_rank) and not os.path.exists(os.path.join(out, "model_index.json"))
    grids = sorted(glob.glob(os.path.join(run_dir, "samples", "step_*.png")))
    if grids:
        shutil.copyfile(grids[-1], os.path.join(out, "samples.png"))
    front = {"library_name": "diffusers", "license": "other",
             "tags": ["text-to-image", "diffusers", "ldm-train", *(["lora"] if cfg.lora_rank else [])]}
    if cfg.pretrained and looks_like_hub_id(cfg.pretrained):  # the hub links a hub id; a local folder is named below
        front["base_model"] = cfg.pretrained
    if trigger:
        front["instance_prompt"] = trigger
    kind = (f"LoRA adapters (rank {cfg.lora_rank}, alpha {cfg.lora_alpha or cfg.lora_rank}, on "
            f"{', '.join(cfg.lora_targets)}{'; and on the text encoder' if cfg.lora_text_encoder else ''})"
            if cfg.lora_rank else "all UNet weights")
    base = f"`{cfg.pretrained}`" if cfg.pretrained else f"the `{cfg.model}` UNet preset, from scratch"
    buckets = f"aspect-ratio buckets ({len(manifest.buckets)})" if manifest.buckets else "square crops"
    per_epoch = sum(s.count * s.repeats for s in manifest.shards) * cfg.data.repeats
    lines = [
        f"# {os.path.basename(os.path.abspath(run_dir))}", "",
        f"Trained with ldm-train from {base}: {kind}.", "",
        "## Training", "",
        f"- data: {manifest.num_samples} images at {manifest.resolution} px ({buckets})"
        + (f", {per_epoch} samples an epoch with repeats" if per_epoch != manifest.num_samples else "")
        + (f", prior preservation with class images (weight {cfg.data.prior_loss_weight})" if cfg.data.class_urls else ""),
        f"- {cfg.total_samples} samples, batch {cfg.batch_per_rank} per rank x {cfg.grad_accum} accumulation, lr "
        f"{cfg.lr} ({cfg.lr_schedule}, {cfg.warmup_samples} warm-up samples), {cfg.prediction_type} prediction",
        f"- weights in this export: {weights_text}",
        *([f"- trigger words: `{trigger}`"] if trigger else []), "",
        "## Use", "", "```python",
    ]
    if lora:
        pipe = "StableDiffusionXLPipeline" if manifest.pooled_dim else "StableDiffusionPipeline"
        lines += [f"from diffusers import {pipe}", "", f'pipe = {pipe}.from_pretrained("{cfg.pretrained}")',
                  f'pipe.load_lora_weights("<this folder or repo>", weight_name="{files[0]}")']
    else:
        lines += ["from diffusers import DiffusionPipeline", "",
                  'pipe = DiffusionPipeline.from_pretrained("<this folder or repo>")']
    prompt = trigger or (cfg.validation_prompts[0] if cfg.validation_prompts else "a photograph")
    lines += [f'image = pipe("{prompt}").images[0]', "```", ""]
    if grids:
        lines += ["## Samples", "", f"Validation prompts at the last grid ({', '.join(cfg.validation_prompts)}):", "",
                  "![samples](samples.png)", ""]
    text = "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(lines)
    with open(os.path.join(out, CARD), "w") as f:
        f.write(text)
    return os.path.join(out, CARD)


def push_to_hub(folder: str, repo: str, private: bool = True) -> str:
    """Upload the export folder to the hub repository `repo` (created if absent); a ConfigError in one line
    where there is no network or no token."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, private=private, exist_ok=True)
        return api.upload_folder(folder_path=folder, repo_id=repo).commit_url
    except Exception as e:  # noqa: BLE001 - offline, no token, a refused name: the export itself is kept
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"--push-to-hub {repo}: the upload failed ({type(e).__name__}: {first[:200]}); the export "
                          f"is complete at {folder}: upload it later with `huggingface-cli upload {repo} {folder}`") from None
