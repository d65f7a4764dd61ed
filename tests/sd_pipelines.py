"""Tiny random-weight Stable Diffusion pipeline folders, built offline, for tests and trials.

Pretrained weights cannot be downloaded here, so the tests start from folders of the same
architectures and layout as the real ones, with small widths:

    sd15  CLIP text model (quick_gelu, padded with the end token), PNDM scheduler, epsilon;
    sd21  converted-OpenCLIP-style text model (gelu, padded with "!"), DDIM scheduler,
          v-prediction, linear projections and per-level head dims in the UNet.

    sdxl  SDXL: two text encoders (CLIP-L style, padded with the end token; a bigG-style
          CLIPTextModelWithProjection padded with "!", whose pooled projection conditions the
          UNet), a UNet with addition_embed_type "text_time" (pooled embedding + six size and
          crop numbers), EulerDiscrete, epsilon, scaling factor 0.13025.

Each has an f = 8 AutoencoderKL (scaling factor 0.18215 for SD) and a UNet2DConditionModel, written
by the pipeline's `save_pretrained` with model_index.json, so `from_pretrained(folder)`
loads them and generates.

    python tests/sd_pipelines.py --family sd15 --out /tmp/tiny-sd15
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FAMILIES = ("sd15", "sd21", "sdxl")


def _tiny_vae(image_size: int, scaling_factor: float):
    """An f = 8 AutoencoderKL of SD's layout (four levels) at tiny widths."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=8, sample_size=image_size, scaling_factor=scaling_factor)


def _tiny_unet(image_size: int) -> dict:
    """The UNet2DConditionModel settings the tiny families share (two levels of 32 and 64 channels)."""
    return dict(sample_size=image_size // 8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                layers_per_block=1, norm_num_groups=8)


def build_pipeline(family: str, out: str, seed: int | None = None, image_size: int = 32) -> str:
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from models.clip_convert import EOS, write_clip_tokenizer

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}")
    if family == "sdxl":
        return build_sdxl_pipeline(out, 2 if seed is None else seed, image_size)
    sd2 = family == "sd21"
    width, context = 32, 77
    torch.manual_seed(FAMILIES.index(family) if seed is None else seed)  # each family its own weights
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=context, hidden_act="gelu" if sd2 else "quick_gelu", projection_dim=width,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0 if sd2 else 1))
    tok_dir = os.path.join(out, ".tokenizer-src")
    write_clip_tokenizer(tok_dir, context, pad_token="!" if sd2 else EOS)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    vae = _tiny_vae(image_size, scaling_factor=0.18215)
    unet = UNet2DConditionModel(
        **_tiny_unet(image_size), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=width,
        attention_head_dim=(4, 8) if sd2 else 8, use_linear_projection=sd2)
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  steps_offset=1, set_alpha_to_one=False)
    if sd2:
        scheduler = DDIMScheduler(**common, clip_sample=False, prediction_type="v_prediction")
    else:
        scheduler = PNDMScheduler(**common, skip_prk_steps=True, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    import shutil

    shutil.rmtree(tok_dir)
    return out


def build_sdxl_pipeline(out: str, seed: int = 2, image_size: int = 32) -> str:
    """SDXL's layout at tiny widths: text encoders of 32 and 48 (hidden states concatenated to 80-d
    context, the second's 40-d projection pooled), time embedding 8 per number (6 x 8 + 40 = 88)."""
    import shutil

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from models.clip_convert import EOS, write_clip_tokenizer

    torch.manual_seed(seed)
    context = 77
    clip = dict(vocab_size=49408, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=context, bos_token_id=49406, eos_token_id=49407)
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip, hidden_size=32, hidden_act="quick_gelu", projection_dim=32,
                                                pad_token_id=1))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip, hidden_size=48, hidden_act="gelu",
                                                                projection_dim=40, pad_token_id=0))
    tokenizers = []
    for i, pad in enumerate((EOS, "!")):
        tok_dir = os.path.join(out, f".tokenizer-src-{i}")
        write_clip_tokenizer(tok_dir, context, pad_token=pad)
        tokenizers.append(CLIPTokenizer.from_pretrained(tok_dir))
        shutil.rmtree(tok_dir)
    vae = _tiny_vae(image_size, scaling_factor=0.13025)
    unet = UNet2DConditionModel(
        **_tiny_unet(image_size), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=80, attention_head_dim=(4, 8),
        transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 40)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                                       prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=FAMILIES, default="sd15")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=None, help="default: 0 for sd15, 1 for sd21, 2 for sdxl")
    args = p.parse_args()
    print(build_pipeline(args.family, args.out, args.seed))


if __name__ == "__main__":
    main()
