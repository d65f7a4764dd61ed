"""Tiny random-weight SD3 and Flux.1 pipeline folders, built offline, for tests and trials (#30).

    sd3   StableDiffusion3Pipeline: two CLIPTextModelWithProjection (CLIP-L and bigG style, widths 16 and 32,
          read at their penultimate layer, concatenated and zero-padded to T5's width; pooled projections
          concatenated), a T5EncoderModel (width 64), an SD3Transformer2DModel (MMDiT, 2x2 patches), a
          16-channel AutoencoderKL without quant convs (shift_factor 0.0609, scaling_factor 1.5305, SD3's),
          FlowMatchEulerDiscreteScheduler with shift 3.0.
    flux  FluxPipeline: a CLIPTextModel (pooled output) and a T5EncoderModel, a FluxTransformer2DModel
          (one double-stream and one single-stream block, guidance embedding as Flux-dev), the 16-channel VAE
          (shift_factor 0.1159, scaling_factor 0.3611, Flux's), FlowMatchEulerDiscreteScheduler with the
          resolution-dependent shift (use_dynamic_shifting; mu from 0.5 at 256 tokens to 1.15 at 4,096).

The T5 tokenizer is a Unigram model built with the `tokenizers` library (T5's kind: "▁" word pieces, `</s>`
appended, `<pad>` id 0) over a small vocabulary: words of the tests' captions, then single characters.

    python tests/flow_pipelines.py --family flux --out /tmp/tiny-flux
"""
from __future__ import annotations

import argparse
import os
import shutil
import string
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FAMILIES = ("sd3", "flux")
WORDS = ("a an the of on at in with and red green blue white black yellow circle square triangle star center top "
         "bottom left right background picture photo dog cat sks").split()


def t5_tokenizer(max_length: int = 512):
    """A T5TokenizerFast of T5's kind over a tiny vocabulary (see the module doc)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -2.0) for w in WORDS]
    vocab += [("▁", -5.0)] + [(c, -6.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def _t5(width: int = 64):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=128, d_model=width, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                   dense_act_fn="gelu_new", is_gated_act=True, pad_token_id=0, eos_token_id=1))


def _clip_tokenizer(out: str, name: str, pad: str):
    from transformers import CLIPTokenizer

    from models.clip_convert import write_clip_tokenizer

    folder = os.path.join(out, f".tokenizer-src-{name}")
    write_clip_tokenizer(folder, 77, pad_token=pad)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    shutil.rmtree(folder)
    return tokenizer


def _vae(image_size: int, shift: float, scale: float):
    """An f = 8 AutoencoderKL with 16 latent channels and no quant convs, as SD3's and Flux's."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=8, sample_size=image_size, scaling_factor=scale,
                         shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False)


def build_flow_pipeline(family: str, out: str, seed: int | None = None, image_size: int = 32) -> str:
    from diffusers import (FluxPipeline, FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from models.clip_convert import EOS

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}")
    torch.manual_seed((10 if family == "sd3" else 11) if seed is None else seed)
    clip = dict(vocab_size=49408, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    if family == "sd3":
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip, hidden_size=16, hidden_act="quick_gelu",
                                                                  projection_dim=16, pad_token_id=1))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip, hidden_size=32, hidden_act="gelu",
                                                                    projection_dim=24, pad_token_id=0))
        transformer = SD3Transformer2DModel(sample_size=image_size // 8, patch_size=2, in_channels=16, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                            caption_projection_dim=16, pooled_projection_dim=16 + 24, out_channels=16,
                                            pos_embed_max_size=16)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(image_size, 0.0609, 1.5305), text_encoder=text_encoder,
            tokenizer=_clip_tokenizer(out, "l", EOS), text_encoder_2=text_encoder_2,
            tokenizer_2=_clip_tokenizer(out, "g", "!"), text_encoder_3=_t5(), tokenizer_3=t5_tokenizer())
    else:
        text_encoder = CLIPTextModel(CLIPTextConfig(**clip, hidden_size=24, hidden_act="quick_gelu",
                                                    projection_dim=24, pad_token_id=1))
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                             pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_vae(image_size, 0.1159, 0.3611),
                            text_encoder=text_encoder, tokenizer=_clip_tokenizer(out, "l", EOS),
                            text_encoder_2=_t5(), tokenizer_2=t5_tokenizer())
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=FAMILIES, default="sd3")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args()
    print(build_flow_pipeline(args.family, args.out, args.seed))


if __name__ == "__main__":
    main()
