"""The original Stable Diffusion checkpoint layout (CompVis latent-diffusion's key names), from a
diffusers pipeline's UNet, VAE and text encoder, as the one `.safetensors` file that ComfyUI,
A1111 and `StableDiffusionPipeline.from_single_file` read.

    model.diffusion_model.*   the UNet: input_blocks / middle_block / output_blocks, each a
                              list of [resnet, spatial transformer, down/upsampler] layers
    first_stage_model.*       the autoencoder: encoder.down.I.block.J, decoder.up.I (levels in
                              the reverse order of diffusers' up_blocks), mid.attn_1 as 1x1 convs
    cond_stage_model.transformer.text_model.*   the CLIP text model (transformers' names)

SDXL's file (Stability's generative-models layout) keeps the UNet and VAE names, adds the UNet's
text_time projection as label_emb.0, and holds both text encoders under conditioner.embedders:

    conditioner.embedders.0.transformer.text_model.*   CLIP ViT-L (transformers' names)
    conditioner.embedders.1.model.*                    OpenCLIP bigG in OpenCLIP's names: q, k and v
                                                       fused into in_proj, the projection transposed

Names map one to one and no tensor changes except the VAE's mid-block attention, whose
linear q/k/v/out projections are 1x1 convolutions in the original (a reshape).
"""
from __future__ import annotations

import re

import torch

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."
XL_TEXT, XL_TEXT_2 = "conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL
_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    name, _, tail = rest.partition(".")
    if name not in _UNET_RESNET:
        raise KeyError(rest)
    return f"{_UNET_RESNET[name]}.{tail}"


def unet_key(key: str, config: dict) -> str:
    """The original name of a diffusers UNet2DConditionModel key (SD 1.x / 2.x architectures)."""
    n = config["layers_per_block"]
    if not isinstance(n, int):
        raise ValueError("single-file export needs one layers_per_block for every level")
    for diff, ldm in _UNET_FIXED.items():
        if key.startswith(diff + "."):
            return ldm + key[len(diff):]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = 1 + i * (n + 1) + j
        return f"input_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{block}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = i * (n + 1) + j
        return f"output_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{block}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        with_attention = "CrossAttn" in config["up_block_types"][i]
        return f"output_blocks.{i * (n + 1) + n}.{2 if with_attention else 1}.conv.{m[2]}"
    raise KeyError(key)


def vae_key(key: str, levels: int) -> str:
    """The original name of a diffusers AutoencoderKL key."""
    key = key.replace(".conv_norm_out.", ".norm_out.").replace(".conv_shortcut.", ".nin_shortcut.")
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.+)", key):
        part = f"block.{m[3]}" if m[3] is not None else "downsample"
        return f"encoder.down.{m[1]}.{part}.{m[4]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)", key):
        part = f"block.{m[3]}" if m[3] is not None else "upsample"
        return f"decoder.up.{levels - 1 - int(m[1])}.{part}.{m[4]}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)|(post_)?quant_conv\.(weight|bias)", key):
        return key
    raise KeyError(key)


def openclip_text(model) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection's weights in OpenCLIP's names (SDXL's bigG layout)."""
    state = {k.removeprefix("text_model."): v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    out = {"token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": state.pop("final_layer_norm.weight"), "ln_final.bias": state.pop("final_layer_norm.bias"),
           "text_projection": state.pop("text_projection.weight").T}
    for i in range(model.config.num_hidden_layers):
        p = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv"])
            for ours, theirs in _OPENCLIP_LAYER.items():
                out[f"transformer.resblocks.{i}.{theirs}.{kind}"] = state.pop(f"{p}{ours}.{kind}")
    if state:
        raise ValueError(f"single-file export: text_encoder_2 weight {sorted(state)[0]} has no place in OpenCLIP's layout")
    return out


def to_original(unet, vae, text_encoder, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """One state dict in the original layout (SDXL's where `text_encoder_2` is given); every tensor
    contiguous, in its model's dtype."""
    out: dict[str, torch.Tensor] = {}

    def put(name: str, tensor: torch.Tensor, source: str) -> None:
        if name in out:
            raise ValueError(f"single-file export maps two {source} weights to {name}")
        out[name] = tensor.detach().contiguous()

    config = dict(unet.config)
    for key, tensor in unet.state_dict().items():
        try:
            put(UNET + unet_key(key, config), tensor, "UNet")
        except KeyError:
            raise ValueError(f"single-file export: the UNet weight {key} has no place in the original SD layout "
                             "(only SD 1.x/2.x and SDXL-style UNets can be written as one file)") from None
    levels = len(vae.config.block_out_channels)
    for key, tensor in vae.state_dict().items():
        try:
            name = vae_key(key, levels)
        except KeyError:
            raise ValueError(f"single-file export: the VAE weight {key} has no place in the original SD layout") from None
        if ".mid.attn_1." in name and name.endswith(".weight") and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]  # linear -> 1x1 convolution
        put(VAE + name, tensor, "VAE")
    for key, tensor in text_encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        put((TEXT if text_encoder_2 is None else XL_TEXT) + key.removeprefix("text_model."), tensor, "text encoder")
    if text_encoder_2 is not None:
        for key, tensor in openclip_text(text_encoder_2).items():
            put(XL_TEXT_2 + key, tensor, "text encoder 2")
    return out
