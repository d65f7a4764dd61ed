"""The text encoders of SD3- and Flux-class pipelines, read as their diffusers pipelines read them (#30).

SD3 (Esser et al. 2024, sec. 5.1): CLIP-L and OpenCLIP bigG, each at its penultimate layer's hidden states
(77 tokens, widths concatenated: 768 + 1280) with their pooled projections concatenated (2048), and T5-XXL's
last hidden states (its `max_sequence_length` tokens, 4096 wide). StableDiffusion3Pipeline pads the CLIP
states with zeros to T5's width and puts them before T5's along the sequence.
Flux.1: CLIP-L's pooled output (768) and T5-XXL's last hidden states (512 tokens for dev, 256 for schnell).

`embed(captions)` gives what a latent cache stores per caption:
    text_emb  [B, L, d]  T5's hidden states, the `max_length` tokens the pipeline computes (T5 runs unmasked,
                         as in the pipelines, so each real token's state is the pipeline's);
    text_len  [B]        how many of them are the caption's (up to and with `</s>`): the cache keeps only
                         those (data_pipeline/latents.py), since the padding's states are most of a 4 MB
                         embedding for a short caption;
    pooled    [B, P]     the pooled CLIP embedding(s);
    clip_emb  [B, 77, w] SD3 only: both CLIP models' states, concatenated.
`tokenize` gives every tokenizer's ids in one row ([B, 77 * CLIP models + L]: CLIP-L's, bigG's, T5's), for
caches of token ids (`text=tokens`), which `embed_tokens` turns into the same tensors.
"""
from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from .identity import model_identity

CLIP_TOKENS = 77
FAMILIES = ("sd3", "flux")
MAX_LENGTH = {"sd3": 256, "flux": 512}  # the pipelines' default max_sequence_length


class FlowTextEncoder(nn.Module):
    def __init__(self, family: str, clips: list, clip_tokenizers: list, t5, t5_tokenizer, max_length: int, name: str):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        self.family, self.name = family, name
        self.clips, self.clip_tokenizers = nn.ModuleList(clips), list(clip_tokenizers)
        self.t5, self.t5_tokenizer = t5, t5_tokenizer
        if not 0 < max_length <= int(t5_tokenizer.model_max_length or max_length):
            raise ValueError(f"{name}: max_sequence_length {max_length} is above its T5 tokenizer's "
                             f"{t5_tokenizer.model_max_length}")
        self.context_length, self.width = max_length, int(t5.config.d_model)
        self.layer = "pipeline"
        if family == "sd3":
            self.pooled_dim = sum(int(m.config.projection_dim) for m in clips)
            self.clip_width = sum(int(m.config.hidden_size) for m in clips)
        else:
            self.pooled_dim, self.clip_width = int(clips[0].config.hidden_size), 0

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        rows = [tok(list(captions), padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                    return_tensors="pt").input_ids for tok in self.clip_tokenizers]
        rows.append(self.t5_tokenizer(list(captions), padding="max_length", max_length=self.context_length,
                                      truncation=True, add_special_tokens=True, return_tensors="pt").input_ids)
        return torch.cat(rows, dim=1)

    def embed_tokens(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        n = len(self.clips)
        clip_ids, t5_ids = tokens[:, :n * CLIP_TOKENS].long(), tokens[:, n * CLIP_TOKENS:].long()
        out = {"text_emb": self.t5(t5_ids)[0],
               "text_len": (t5_ids != self.t5_tokenizer.pad_token_id).sum(1).clamp(min=1)}
        if self.family == "flux":
            out["pooled"] = self.clips[0](clip_ids, output_hidden_states=False).pooler_output
            return out
        states, pooled = [], []
        for i, clip in enumerate(self.clips):
            o = clip(clip_ids[:, i * CLIP_TOKENS:(i + 1) * CLIP_TOKENS], output_hidden_states=True)
            states.append(o.hidden_states[-2])
            pooled.append(o.text_embeds)
        out["clip_emb"], out["pooled"] = torch.cat(states, dim=-1), torch.cat(pooled, dim=-1)
        return out

    def embed(self, captions: list[str]) -> dict[str, torch.Tensor]:
        device = next(self.parameters()).device
        return self.embed_tokens(self.tokenize(captions).to(device))

    def encode(self, captions: list[str]) -> torch.Tensor:
        return self.embed(captions)["text_emb"]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens)["text_emb"]

    def identity(self) -> str:
        """Every model's weights and configuration, every tokenizer's vocabulary and padding, the length."""
        vocab = []
        for tok in (*self.clip_tokenizers, self.t5_tokenizer):
            vocab.append(hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:16])
            vocab.append((tok.pad_token_id, tok.eos_token_id))
        configs = [{k: v for k, v in m.config.to_dict().items() if not k.startswith(("_", "transformers"))
                    and k not in ("dtype", "torch_dtype", "architectures")} for m in (*self.clips, self.t5)]
        return model_identity(self, {"kind": f"{self.family}-text", "configs": configs, "vocab": vocab,
                                     "max_length": self.context_length})


def load_flow_text_encoder(spec: str, family: str, max_length: int = 0) -> FlowTextEncoder:
    """The text encoders and tokenizers of an SD3 or Flux pipeline folder or hub id, in fp32, frozen.
    `max_length`: T5 tokens (0: the pipeline's default, MAX_LENGTH)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, \
        T5TokenizerFast
    from transformers.utils import logging as hf_logging

    from .pipeline import is_local

    local = is_local(spec)
    parts = ([("text_encoder", CLIPTextModelWithProjection, "tokenizer", CLIPTokenizer),
              ("text_encoder_2", CLIPTextModelWithProjection, "tokenizer_2", CLIPTokenizer),
              ("text_encoder_3", T5EncoderModel, "tokenizer_3", T5TokenizerFast)] if family == "sd3" else
             [("text_encoder", CLIPTextModel, "tokenizer", CLIPTokenizer),
              ("text_encoder_2", T5EncoderModel, "tokenizer_2", T5TokenizerFast)])
    loaded = []
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        for model_part, model_cls, tok_part, tok_cls in parts:
            where = (lambda part: dict(pretrained_model_name_or_path=f"{spec}/{part}")) if local else \
                (lambda part: dict(pretrained_model_name_or_path=spec, subfolder=part))
            try:
                model = model_cls.from_pretrained(**where(model_part), dtype=torch.float32)
                tokenizer = tok_cls.from_pretrained(**where(tok_part))
            except Exception as e:  # OSError for missing weights; network errors for hub ids
                detail = str(e).splitlines()[0][:160] if local else f"the hub or its local cache ({type(e).__name__})"
                raise FileNotFoundError(f"cannot load {model_part}/ and {tok_part}/ of pipeline '{spec}': "
                                        f"{detail}") from None
            loaded.append((model, tokenizer))
    finally:
        hf_logging.set_verbosity(verbosity)
    *clips, (t5, t5_tok) = loaded
    try:
        encoder = FlowTextEncoder(family, [m for m, _ in clips], [t for _, t in clips], t5, t5_tok,
                                  max_length or MAX_LENGTH[family], spec)
    except ValueError as e:
        raise FileNotFoundError(f"cannot use the text encoders of pipeline '{spec}': {e}") from None
    return encoder.eval().requires_grad_(False)
