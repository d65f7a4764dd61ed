"""The CLIP-score network: an OpenCLIP model (both towers) from a local weights file; nothing is
downloaded.

A spec is `MODEL:PATH`: MODEL is an OpenCLIP architecture name (`ViT-B-32`, `ViT-L-14`, ...) or
an architecture `.json` in OpenCLIP's config format (registered under its file stem, so that
small custom models load the same way), PATH a checkpoint file that
`open_clip.create_model_and_transforms(MODEL, pretrained=PATH)` reads (.bin, .pt, .safetensors).
Images go through the model's own eval transform (resize, centre crop, normalise), so the
embeddings are what the checkpoint was trained with.
"""
from __future__ import annotations

import json
import os

import open_clip
import torch
from PIL import Image
from torch import nn

# A random-weight architecture for tests: 1.6M parameters (mostly the 49,408-token embedding
# the real tokenizer needs), 32 px images. Its scores are a pipeline check, never a measurement.
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TINY_CLIP_NAME = "tiny-clip-random"


def parse_clip_spec(spec: str) -> tuple[str, str]:
    """(architecture, weights path) of `MODEL:PATH`; a ValueError saying what is wrong."""
    model, sep, path = spec.partition(":")
    if not sep or not model or not path:
        raise ValueError(f"expected MODEL:PATH (e.g. ViT-B-32:/weights/open_clip_vit_b32.bin), got {spec!r}")
    if not model.endswith(".json") and model not in open_clip.list_models():
        raise ValueError(f"unknown OpenCLIP architecture {model!r} (an OpenCLIP model name, e.g. ViT-B-32, "
                         "or an architecture .json)")
    return model, path


class ClipEmbedder(nn.Module):
    """Unit-norm OpenCLIP embeddings of images (PIL) and texts, in batches, on the model's device."""

    def __init__(self, model: nn.Module, preprocess, tokenizer, source: str = ""):
        super().__init__()
        self.model, self.preprocess, self.tokenizer, self.source = model.eval(), preprocess, tokenizer, source

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        out = [self.model.encode_image(torch.stack([self.preprocess(im) for im in images[i: i + batch_size]])
                                       .to(self.device), normalize=True).float().cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0, 0)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        out = [self.model.encode_text(self.tokenizer(list(texts[i: i + batch_size])).to(self.device),
                                      normalize=True).float().cpu()
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.empty(0, 0)


def _register(model: str) -> str:
    """The OpenCLIP name of `model`, registering an architecture .json first."""
    if not model.endswith(".json"):
        return model
    if not os.path.isfile(model):
        raise FileNotFoundError(f"OpenCLIP architecture file not found: {model}")
    open_clip.add_model_config(model)
    return os.path.splitext(os.path.basename(model))[0]


def load_clip(spec: str, device: str | torch.device = "cpu") -> ClipEmbedder:
    """The CLIP-score model of `MODEL:PATH` (module docstring), frozen, on `device`. A missing or
    unreadable file is a FileNotFoundError whose one line names it; a malformed spec a ValueError."""
    model, path = parse_clip_spec(spec)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP weights file not found: {path}")
    name = _register(model)
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=path, device=device)
    except Exception as e:  # noqa: BLE001 - a wrong file for the architecture gets the same one-line answer
        raise FileNotFoundError(f"cannot load CLIP weights {path} as {name}: {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]}") from None
    return ClipEmbedder(net.requires_grad_(False), preprocess, open_clip.get_tokenizer(name), source=spec)


def save_tiny_clip(folder: str, seed: int = 0) -> str:
    """Write TINY_CLIP's architecture and random weights under `folder`; returns their spec
    (`FOLDER/tiny-clip-random.json:FOLDER/tiny_clip.bin`) for `load_clip` — for tests."""
    os.makedirs(folder, exist_ok=True)
    arch = os.path.join(folder, f"{TINY_CLIP_NAME}.json")
    with open(arch, "w") as f:
        json.dump(TINY_CLIP, f)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = open_clip.create_model(_register(arch))
    weights = os.path.join(folder, "tiny_clip.bin")
    torch.save(net.state_dict(), weights)
    return f"{arch}:{weights}"
