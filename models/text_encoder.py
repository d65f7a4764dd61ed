"""The caption encoder: an OpenCLIP text tower returning per-token hidden states.

Cross-attention in the UNet reads every token's hidden state, not CLIP's pooled
embedding. Stable Diffusion 2 takes them from the penultimate layer of OpenCLIP ViT-H
(its final layer is tuned for the contrastive pooled output); `layer` selects that.
"""
from __future__ import annotations

import os

import open_clip
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .identity import model_identity

# Random-weight towers for the demo and tests; OpenCLIP's BPE tokenizer ships with the
# package, so tokenization is the real one. A frozen random tower is a fixed, injective-
# enough function of the tokens, which is all the UNet needs to learn conditioning.
TINY = dict(context_length=32, width=64, heads=4, layers=2)


class TextEncoder(nn.Module):
    def __init__(self, tower: nn.Module, context_length: int, layer: str, name: str):
        super().__init__()
        if layer not in ("last", "penultimate"):
            raise ValueError(f"text encoder layer must be 'last' or 'penultimate', got {layer!r}")
        self.tower, self.context_length, self.layer, self.name = tower, context_length, layer, name
        self.tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=context_length)
        self.width = tower.token_embedding.embedding_dim

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(list(captions))

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> hidden states [B, L, width]."""
        t = self.tower
        x = t.token_embedding(tokens) + t.positional_embedding[: tokens.shape[1]]
        mask = t.attn_mask[: tokens.shape[1], : tokens.shape[1]] if t.attn_mask is not None else None
        blocks = t.transformer.resblocks
        for block in blocks[: len(blocks) - 1] if self.layer == "penultimate" else blocks:
            x = block(x, attn_mask=mask)
        return t.ln_final(x)

    def encode(self, captions: list[str]) -> torch.Tensor:
        device = next(self.parameters()).device
        return self(self.tokenize(captions).to(device))

    def identity(self) -> str:
        return model_identity(self.tower, {"name": self.name, "layer": self.layer, "context": self.context_length})


def _tiny_tower(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.model._build_text_tower(TINY["width"], open_clip.model.CLIPTextCfg(**TINY))


def save_tiny(path: str, seed: int = 0) -> None:
    """Write a tiny tower's weights, to exercise the checkpoint-loading path in tests."""
    save_file(_tiny_tower(seed).state_dict(), path)


def load_text_encoder(spec: str, layer: str = "last") -> TextEncoder:
    """`tiny` (random), `tiny:FILE.safetensors`, or `MODEL:PRETRAINED` where PRETRAINED is an
    OpenCLIP tag (e.g. `ViT-H-14:laion2b_s32b_b79k`, needs network or the hub cache) or a
    local checkpoint file. Only the text tower is kept."""
    name, _, pretrained = spec.partition(":")
    if name == "tiny":
        tower = _tiny_tower()
        if pretrained:
            if not os.path.exists(pretrained):
                raise FileNotFoundError(f"text encoder weights {pretrained} do not exist")
            tower.load_state_dict(load_file(pretrained))
        return TextEncoder(tower, TINY["context_length"], layer, spec).eval().requires_grad_(False)
    if name not in open_clip.list_models():
        raise ValueError(f"unknown text encoder '{name}': use 'tiny' or an OpenCLIP model name "
                         f"(e.g. ViT-H-14, ViT-L-14), optionally ':PRETRAINED'")
    if pretrained and ("/" in pretrained or pretrained.endswith((".bin", ".pt", ".safetensors"))) \
            and not os.path.exists(pretrained):
        raise FileNotFoundError(f"OpenCLIP checkpoint {pretrained} does not exist")
    try:
        model = open_clip.create_model(name, pretrained=pretrained or None)
    except Exception as e:
        raise FileNotFoundError(
            f"cannot load OpenCLIP weights '{spec}' ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            f"download the checkpoint where there is network and use '{name}:/path/to/checkpoint'") from None
    model.visual = None  # only the text tower is used; drop the image tower's memory
    ctx = model.context_length
    return TextEncoder(model, ctx, layer, spec).eval().requires_grad_(False)
