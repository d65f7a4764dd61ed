"""The caption encoder: an OpenCLIP text tower, or the transformers CLIP text model and
tokenizer of a diffusers pipeline folder, returning per-token hidden states.

Cross-attention in the UNet reads every token's hidden state, not CLIP's pooled
embedding. Stable Diffusion 2 takes them from the penultimate layer of OpenCLIP ViT-H
(its final layer is tuned for the contrastive pooled output); `layer` selects that. A
pipeline folder's encoder is used as shipped: SD 1.x's CLIP ViT-L with `layer="last"`, and
SD 2.x's converted ViT-H, whose last block was already dropped, also with `layer="last"`.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .identity import model_identity
from .pipeline import check_folder, flow_family, has_two_text_encoders, is_local

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
        import open_clip

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

    pooled_dim = 0  # no pooled embedding: only SDXL's DualTextEncoder conditions on one

    @torch.no_grad()
    def sdxl_states(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states after the penultimate block, before ln_final; the pooled embedding: ln_final at
        the end token, which has the largest id, times the text projection), as SDXL reads its towers."""
        t = self.tower
        x = t.token_embedding(tokens) + t.positional_embedding[: tokens.shape[1]]
        mask = t.attn_mask[: tokens.shape[1], : tokens.shape[1]] if t.attn_mask is not None else None
        *head, last = t.transformer.resblocks
        for block in head:
            x = block(x, attn_mask=mask)
        penultimate = x
        x = t.ln_final(last(x, attn_mask=mask))[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
        proj = t.text_projection
        return penultimate, (proj(x) if isinstance(proj, nn.Linear) else x @ proj)

    @property
    def pooled_width(self) -> int:
        proj = self.tower.text_projection
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])

    def encode(self, captions: list[str]) -> torch.Tensor:
        device = next(self.parameters()).device
        return self(self.tokenize(captions).to(device))

    def embed(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """What a cache stores per caption: {"text_emb": per-token hidden states}."""
        return {"text_emb": self.encode(captions)}

    def embed_tokens(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"text_emb": self(tokens)}

    def identity(self) -> str:
        return model_identity(self.tower, {"name": self.name, "layer": self.layer, "context": self.context_length})


def _tiny_tower(seed: int = 0) -> nn.Module:
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.model._build_text_tower(TINY["width"], open_clip.model.CLIPTextCfg(**TINY))


def save_tiny(path: str, seed: int = 0) -> None:
    """Write a tiny tower's weights, to exercise the checkpoint-loading path in tests."""
    save_file(_tiny_tower(seed).state_dict(), path)


class CLIPTextEncoder(nn.Module):
    """A transformers CLIP text model with its tokenizer (a diffusers pipeline's `text_encoder/`
    and `tokenizer/`), with TextEncoder's interface. Hidden states of the last layer are
    `last_hidden_state` (after the final LayerNorm, as StableDiffusionPipeline reads them);
    the penultimate layer goes through the final LayerNorm too (diffusers' `clip_skip=1`)."""

    def __init__(self, model: nn.Module, tokenizer, layer: str, name: str):
        super().__init__()
        if layer not in ("last", "penultimate"):
            raise ValueError(f"text encoder layer must be 'last' or 'penultimate', got {layer!r}")
        self.model, self.tokenizer, self.layer, self.name = model, tokenizer, layer, name
        self.context_length = int(tokenizer.model_max_length)
        if not 0 < self.context_length <= model.config.max_position_embeddings:
            raise ValueError(f"{name}: the tokenizer's model_max_length {tokenizer.model_max_length} does not fit the "
                             f"text model's {model.config.max_position_embeddings} positions")
        self.width = model.config.hidden_size

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(list(captions), padding="max_length", max_length=self.context_length,
                              truncation=True, return_tensors="pt").input_ids

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # No torch.no_grad here: the weights are frozen, so no graph is kept, except for LoRA adapters a
        # fine-tune adds to them (lora_text_encoder), whose gradients flow through this forward.
        out = self.model(tokens, output_hidden_states=self.layer == "penultimate")
        if self.layer == "last":
            return out.last_hidden_state
        return getattr(self.model, "text_model", self.model).final_layer_norm(out.hidden_states[-2])

    pooled_dim = 0

    def sdxl_states(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden_states[-2], before the final LayerNorm; text_embeds where the model has a projection)."""
        out = self.model(tokens, output_hidden_states=True)
        return out.hidden_states[-2], getattr(out, "text_embeds", None)

    @property
    def pooled_width(self) -> int:
        return int(self.model.config.projection_dim) if hasattr(self.model, "text_projection") else 0

    def encode(self, captions: list[str]) -> torch.Tensor:
        device = next(self.parameters()).device
        return self(self.tokenize(captions).to(device))

    def embed(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return {"text_emb": self.encode(captions)}

    def embed_tokens(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"text_emb": self(tokens)}

    def identity(self) -> str:
        """Weights, architecture, layer and what the tokenizer makes of text (its vocabulary,
        padding and length), not where the folder lies."""
        tok = self.tokenizer
        vocab = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:16]
        config = {k: v for k, v in self.model.config.to_dict().items() if not k.startswith(("_", "transformers"))
                  and k not in ("dtype", "torch_dtype", "architectures")}
        return model_identity(self.model, {"kind": "transformers-clip", "config": config, "layer": self.layer,
                                           "context": self.context_length, "vocab": vocab,
                                           "pad": tok.pad_token_id, "bos": tok.bos_token_id, "eos": tok.eos_token_id})


def pipeline_parts(spec: str) -> tuple[str, str, str | None]:
    """(model location, tokenizer location, hub subfolder prefix) of a transformers text encoder
    spec: a diffusers pipeline folder (`model_index.json`, its `text_encoder/` and `tokenizer/`),
    or a hub id of one. Missing files give one line naming them."""
    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "model_index.json")):
            raise FileNotFoundError(f"{spec} is not a diffusers pipeline folder (no model_index.json): a text "
                                    "encoder folder is named by its pipeline folder, which holds text_encoder/ "
                                    "and tokenizer/")
        for sub, files in (("text_encoder", ("config.json",)), ("tokenizer", ("tokenizer_config.json",))):
            for name in files:
                if not os.path.exists(os.path.join(spec, sub, name)):
                    raise FileNotFoundError(f"pipeline folder {spec} has no {sub}/{name}")
        return os.path.join(spec, "text_encoder"), os.path.join(spec, "tokenizer"), None
    return spec, spec, "hub"


def load_pipeline_text_encoder(spec: str, layer: str = "last") -> CLIPTextEncoder:
    """The CLIP text model and tokenizer of a diffusers pipeline folder or hub id, in fp32."""
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    model_at, tokenizer_at, hub = pipeline_parts(spec)
    sub = {"subfolder": "text_encoder"} if hub else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its "weights not used" notes for the pooled projection SD never reads
    try:
        model = CLIPTextModel.from_pretrained(model_at, dtype=torch.float32, **sub)
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_at, **({"subfolder": "tokenizer"} if hub else {}))
    except Exception as e:  # OSError for missing weights; network errors for hub ids
        text = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        if not hub:  # the folder is here: what is wrong is in it (a missing file, a tensor of another shape)
            if "ignore_mismatched_sizes" in text:
                text = "a weight in text_encoder/ has another shape than its config.json gives it"
            raise FileNotFoundError(f"cannot load the text encoder and tokenizer of pipeline '{spec}': {text}") from None
        raise FileNotFoundError(f"cannot load the text encoder and tokenizer of pipeline '{spec}' from the hub or its "
                                f"local cache ({type(e).__name__}); download the pipeline where there is network and "
                                "name the local folder") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    try:
        encoder = CLIPTextEncoder(model, tokenizer, layer, spec)
    except ValueError as e:  # a tokenizer whose length does not fit the model
        raise FileNotFoundError(f"cannot use the text encoder of pipeline '{spec}': {e}") from None
    return encoder.eval().requires_grad_(False)


def is_pipeline_spec(spec: str) -> bool:
    """A text encoder spec naming a diffusers pipeline (a folder, or a hub id ORG/NAME), not an
    OpenCLIP tower (`tiny`, `tiny:FILE`, `MODEL:PRETRAINED`)."""
    return os.path.isdir(spec) or (spec.count("/") == 1 and ":" not in spec and not spec.startswith((".", "/")))


def load_text_encoder(spec: str, layer: str = "last", max_tokens: int = 0):
    """`tiny` (random), `tiny:FILE.safetensors`, `MODEL:PRETRAINED` where PRETRAINED is an
    OpenCLIP tag (e.g. `ViT-H-14:laion2b_s32b_b79k`, needs network or the hub cache) or a
    local checkpoint file (only the text tower is kept); or a diffusers pipeline folder or hub
    id, whose text_encoder/ and tokenizer/ are loaded (load_pipeline_text_encoder); an SDXL pipeline's
    two encoders are loaded together (load_dual_text_encoder; `layer` does not apply: SDXL reads both
    at the penultimate layer); an SD3 or Flux pipeline's CLIP and T5 encoders as its pipeline reads them
    (models/flow_text.py; `max_tokens`: T5's, 0 the pipeline's default)."""
    if is_pipeline_spec(spec):
        family = flow_family(spec)
        if family is not None:  # SD3 / Flux: CLIP and T5, as their pipelines read them (models/flow_text.py)
            from .flow_text import load_flow_text_encoder

            return load_flow_text_encoder(spec, family, max_tokens)
        if has_two_text_encoders(spec):
            return load_dual_text_encoder(spec)
        return load_pipeline_text_encoder(spec, layer)
    if "+" in spec:  # SDXL from scratch: two OpenCLIP towers, e.g. ViT-L-14:CKPT+ViT-bigG-14:CKPT
        parts = spec.split("+")
        if len(parts) != 2 or any(is_pipeline_spec(p) or "+" in p or not p for p in parts):
            raise ValueError(f"text encoder {spec!r}: a pair is two OpenCLIP specs joined by '+' (e.g. "
                             "ViT-L-14:CKPT+ViT-bigG-14:CKPT)")
        return DualTextEncoder(*(load_text_encoder(p, "penultimate") for p in parts), name=spec).eval()
    import open_clip  # on first use: it imports torchvision and transformers (3 s), which a job without it skips

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


# --- SDXL: two text encoders -----------------------------------------------------------------------
# SDXL's two text encoders, read as StableDiffusionXLPipeline reads them.
#
# SDXL conditions its UNet on two CLIP text models at once (Podell et al. 2023, sec. 2.1): CLIP
# ViT-L (768-d) and OpenCLIP ViT-bigG (1280-d). Cross-attention reads both models' per-token
# hidden states of the penultimate layer, taken *before* the final LayerNorm and concatenated
# along the width (768 + 1280 = 2048); the second model's pooled, projected embedding (1280-d)
# joins the timestep embedding with the size and crop numbers ("text_time"). Each model has its
# own tokenizer: CLIP-L's pads with the end token, bigG's with "!".
#
# `embed(captions)` gives {"text_emb": [B, L, 2048], "pooled": [B, 1280]}, the two tensors a
# latent cache stores per caption; `tokenize` gives both tokenizers' ids, [B, 2, L], for caches of
# token ids (`text=tokens`), which `embed_tokens` turns into the same two tensors.



class DualTextEncoder(nn.Module):
    layer = "penultimate"  # SDXL reads hidden_states[-2] of both models, without the final LayerNorm

    def __init__(self, first, second, name: str):
        """`first`, `second`: CLIPTextEncoders (a pipeline folder's) or OpenCLIP TextEncoders (from scratch)."""
        super().__init__()
        if first.context_length != second.context_length:
            raise ValueError(f"{name}: its two tokenizers have different lengths ({first.context_length} and "
                             f"{second.context_length})")
        if not second.pooled_width:
            raise ValueError(f"{name}: the second text encoder has no pooled projection (expected "
                             "CLIPTextModelWithProjection, as SDXL ships, or an OpenCLIP tower)")
        self.first, self.second, self.name = first, second, name
        self.context_length = first.context_length
        self.width = first.width + second.width
        self.pooled_dim = second.pooled_width

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """[B, 2, L] token ids: the first tokenizer's, then the second's."""
        return torch.stack([self.first.tokenize(captions), self.second.tokenize(captions)], dim=1)

    def embed_tokens(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"text_emb": [B, L, width], "pooled": [B, pooled_dim]} from [B, 2, L] token ids (with gradients only
        for adapters a fine-tune added: the models' own weights are frozen)."""
        a, _ = self.first.sdxl_states(tokens[:, 0])
        b, pooled = self.second.sdxl_states(tokens[:, 1])
        return {"text_emb": torch.cat([a, b], dim=-1), "pooled": pooled}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens)["text_emb"]

    def embed(self, captions: list[str]) -> dict[str, torch.Tensor]:
        device = next(self.parameters()).device
        return self.embed_tokens(self.tokenize(captions).to(device))

    def encode(self, captions: list[str]) -> torch.Tensor:
        return self.embed(captions)["text_emb"]

    def identity(self) -> str:
        """Both models' identities (weights, configuration, tokenizer), and how they are read."""
        return model_identity(nn.Module(), {"kind": "sdxl-dual-clip", "layer": "penultimate, no final LayerNorm",
                                            "first": self.first.identity(), "second": self.second.identity()})


def load_dual_text_encoder(spec: str) -> DualTextEncoder:
    """text_encoder/ + tokenizer/ and text_encoder_2/ + tokenizer_2/ of an SDXL pipeline folder or hub id."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    local = is_local(spec)
    if local:
        check_folder(spec, ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"), "text_encoder")
    encoders = []
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        for suffix, cls in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
            where = (lambda part: dict(pretrained_model_name_or_path=f"{spec}/{part}")) if local else \
                (lambda part: dict(pretrained_model_name_or_path=spec, subfolder=part))
            try:
                model = cls.from_pretrained(**where(f"text_encoder{suffix}"), dtype=torch.float32)
                tokenizer = CLIPTokenizer.from_pretrained(**where(f"tokenizer{suffix}"))
            except Exception as e:  # OSError for missing weights; network errors for hub ids
                detail = str(e).splitlines()[0][:160] if local else f"the hub or its local cache ({type(e).__name__})"
                raise FileNotFoundError(f"cannot load text_encoder{suffix}/ and tokenizer{suffix}/ of pipeline "
                                        f"'{spec}': {detail}") from None
            try:
                encoders.append(CLIPTextEncoder(model, tokenizer, "penultimate", f"{spec}#text_encoder{suffix}"))
            except ValueError as e:
                raise FileNotFoundError(f"cannot use text_encoder{suffix}/ of pipeline '{spec}': {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    try:
        dual = DualTextEncoder(*encoders, name=spec)
    except ValueError as e:
        raise FileNotFoundError(f"cannot use the text encoders of pipeline '{spec}': {e}") from None
    return dual.eval().requires_grad_(False)
