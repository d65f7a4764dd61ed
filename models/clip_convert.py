"""OpenCLIP text towers as transformers CLIP text models, and CLIP tokenizer files offline.

A diffusers Stable Diffusion pipeline reads its captions through a transformers
`CLIPTokenizer` and `CLIPTextModel`. A run whose text encoder was an OpenCLIP tower exports
into one by moving the weights across: both are pre-LayerNorm transformers with a causal
mask, a learned position table and a final LayerNorm, and differ in names and in OpenCLIP's
fused q/k/v projection. Stable Diffusion 2.x shipped OpenCLIP ViT-H converted the same way,
its last block dropped because SD 2 reads the penultimate layer (`layer="penultimate"`).

The tokenizer files come from the BPE merges that open-clip-torch ships, which are CLIP's:
the vocabulary is the 256 byte symbols, the same with an end-of-word mark, one entry per
merge, then the two special tokens, in that order (Radford et al. 2021, the CLIP tokenizer).
"""
from __future__ import annotations

import gzip
import json
import os

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def write_clip_tokenizer(folder: str, context_length: int = 77, pad_token: str = EOS) -> None:
    """`vocab.json`, `merges.txt` and the tokenizer config of CLIP's tokenizer in `folder`.

    `pad_token`: SD 1.x's tokenizer pads with the end token, SD 2.x's (and OpenCLIP's) with
    "!" (id 0). What it pads with changes the embeddings of every short caption."""
    import open_clip.tokenizer

    with gzip.open(open_clip.tokenizer.default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # the 48,894 merges CLIP uses of the file
    symbols = list(open_clip.tokenizer.bytes_to_unicode().values())  # GPT-2's byte -> character table
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                              pad_token=pad_token, model_max_length=context_length)
    tokenizer.save_pretrained(folder)


def openclip_to_transformers(tower: torch.nn.Module, layer: str = "last", with_projection: bool = False):
    """A transformers `CLIPTextModel` whose `last_hidden_state` equals TextEncoder's output
    (models/text_encoder.py) for the same OpenCLIP text tower and `layer`; with `with_projection`, a
    `CLIPTextModelWithProjection` whose `text_embeds` is the tower's pooled, projected output too
    (SDXL's second text encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    blocks = tower.transformer.resblocks
    keep = len(blocks) - 1 if layer == "penultimate" else len(blocks)
    if keep < 1:
        raise ValueError("an OpenCLIP tower with one block has no penultimate layer")
    width = tower.token_embedding.embedding_dim
    act = blocks[0].mlp[1] if len(blocks[0].mlp) > 1 else None
    if not isinstance(act, torch.nn.GELU) or act.approximate != "none":
        raise ValueError(f"cannot convert an OpenCLIP tower with activation {act!r}: transformers' CLIP text "
                         "model has exact GELU ('gelu') and quick_gelu; only the exact GELU is converted here")
    if any(not isinstance(b.ls_1, torch.nn.Identity) for b in blocks):
        raise ValueError("cannot convert an OpenCLIP tower with layer scale: CLIP's text model has none")
    config = CLIPTextConfig(
        vocab_size=tower.token_embedding.num_embeddings, hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features, num_hidden_layers=keep,
        num_attention_heads=blocks[0].attn.num_heads, max_position_embeddings=tower.positional_embedding.shape[0],
        hidden_act="gelu", layer_norm_eps=tower.ln_final.eps, projection_dim=_projection(tower).shape[1]
        if with_projection else width,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    sd = {"embeddings.token_embedding.weight": tower.token_embedding.weight,
          "embeddings.position_embedding.weight": tower.positional_embedding,
          "final_layer_norm.weight": tower.ln_final.weight,
          "final_layer_norm.bias": tower.ln_final.bias}
    for i in range(keep):
        b, pre = blocks[i], f"encoder.layers.{i}."
        for name, part in zip(("q", "k", "v"), b.attn.in_proj_weight.chunk(3)):
            sd[pre + f"self_attn.{name}_proj.weight"] = part
        for name, part in zip(("q", "k", "v"), b.attn.in_proj_bias.chunk(3)):
            sd[pre + f"self_attn.{name}_proj.bias"] = part
        pairs = {"self_attn.out_proj": b.attn.out_proj, "layer_norm1": b.ln_1, "layer_norm2": b.ln_2,
                 "mlp.fc1": b.mlp.c_fc, "mlp.fc2": b.mlp.c_proj}
        for name, module in pairs.items():
            sd[pre + name + ".weight"], sd[pre + name + ".bias"] = module.weight, module.bias
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    # transformers 5's CLIPTextModel has no `text_model` level any more; 4.x's has, and WithProjection's has.
    missing, unexpected = getattr(model, "text_model", model).load_state_dict({k: v.detach().float().clone() for k, v in sd.items()}, strict=False)
    if with_projection:
        with torch.no_grad():
            model.text_projection.weight.copy_(_projection(tower).T.float())
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"OpenCLIP -> CLIP conversion left keys unmatched: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return model.eval()


def _projection(tower) -> torch.Tensor:
    """The tower's text projection as a [width, out] matrix (a parameter, or a bias-free Linear)."""
    proj = tower.text_projection
    if isinstance(proj, torch.nn.Linear):
        if proj.bias is not None:
            raise ValueError("cannot convert an OpenCLIP text projection with a bias: CLIP's has none")
        return proj.weight.T
    return proj
