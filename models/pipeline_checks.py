"""The fields of a pipeline folder's config files that jobs size or index things with, checked before
anything is built from them (#27): a list where a number belongs, 0 or 1e10 timesteps, betas past 1 or
NaN, a pad token id past the embedding table, a tokenizer folder without its vocabulary. Each refusal
is one line naming the folder, the file and the field. Only what a job would allocate, index or divide
by is checked; the rest is diffusers' and transformers' to read."""
from __future__ import annotations

import json
import math
import os

BIG = 1 << 20  # no width, length or count in a Stable Diffusion-class pipeline comes near it


class BrokenPipelineFolder(FileNotFoundError):
    """A pipeline folder whose files cannot be used as they are (a FileNotFoundError, so that every job's
    one-line handler reports it)."""


def _int(v, lo: int = 1, hi: int = BIG) -> bool:
    return type(v) is int and lo <= v <= hi


def _ints(v) -> bool:  # a positive count, or one per block
    return _int(v) or (isinstance(v, list) and 0 < len(v) <= 64 and all(_int(x) for x in v))


def _ints_or_none(v) -> bool:
    return v is None or _ints(v)


def _finite(v, lo: float = -math.inf, hi: float = math.inf, open_lo: bool = False) -> bool:
    return (type(v) in (int, float) and math.isfinite(v) and lo <= v <= hi and not (open_lo and v == lo))


_UNET = {"in_channels": _int, "out_channels": _int, "sample_size": _ints, "block_out_channels": _ints,
         "layers_per_block": _ints, "cross_attention_dim": _ints, "attention_head_dim": _ints_or_none,
         "num_attention_heads": _ints_or_none, "transformer_layers_per_block": _ints_or_none,
         "norm_num_groups": lambda v: v is None or _int(v), "addition_time_embed_dim": lambda v: v is None or _int(v),
         "projection_class_embeddings_input_dim": lambda v: v is None or _int(v)}
_VAE = {"in_channels": _int, "out_channels": _int, "latent_channels": _int, "block_out_channels": _ints,
        "layers_per_block": _ints, "sample_size": _ints, "norm_num_groups": lambda v: v is None or _int(v),
        "scaling_factor": lambda v: v is None or _finite(v, 0, open_lo=True),
        "shift_factor": lambda v: v is None or _finite(v)}
_TEXT = {"vocab_size": _int, "hidden_size": _int, "intermediate_size": _int, "num_hidden_layers": lambda v: _int(v, 1, 1024),
         "num_attention_heads": _int, "max_position_embeddings": _int, "projection_dim": lambda v: v is None or _int(v)}
_SCHEDULER = {"num_train_timesteps": lambda v: _int(v, 2, 100_000), "beta_start": lambda v: v is None or _finite(v, 0, 1, True),
              "beta_end": lambda v: v is None or _finite(v, 0, 1, True),
              "trained_betas": lambda v: v is None or (isinstance(v, list) and all(_finite(b, 0, 1, True) for b in v)),
              "prediction_type": lambda v: v is None or v in ("epsilon", "v_prediction", "sample"),
              "beta_schedule": lambda v: v is None or isinstance(v, str)}
_FIELDS = {"unet": ("config.json", _UNET), "vae": ("config.json", _VAE), "text_encoder": ("config.json", _TEXT),
           "text_encoder_2": ("config.json", _TEXT), "scheduler": ("scheduler_config.json", _SCHEDULER)}


def _show(v) -> str:
    text = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else str(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise BrokenPipelineFolder(f"cannot read {path}: {str(e).splitlines()[0][:120]}") from None
    if not isinstance(value, dict):
        raise BrokenPipelineFolder(f"{path} must hold a JSON object")
    return value


def check_part(folder: str, part: str, key: str = "pretrained") -> None:
    """Refuse in one line a field of `folder`/`part` that a job would size, index or divide by with."""
    where = f"{key}={folder}: {part}/"
    if part in ("tokenizer", "tokenizer_2"):
        files = set(os.listdir(os.path.join(folder, part)))
        if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files and "spiece.model" not in files:
            raise BrokenPipelineFolder(f"{where} has no vocabulary (tokenizer.json, or vocab.json with merges.txt): "
                                       "every caption would become the same tokens")
        return
    if part not in _FIELDS:
        return
    name, fields = _FIELDS[part]
    config = _load(os.path.join(folder, part, name))
    for field, ok in fields.items():
        if field in config and not ok(config[field]):
            raise BrokenPipelineFolder(f"{where}{name} field '{field}' is {_show(config[field])}, which no "
                                       "pipeline of this kind has")
    if part.startswith("text_encoder"):
        vocab = config.get("vocab_size")
        for field in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = config.get(field)
            if v is not None and not (type(v) is int and 0 <= v < vocab):
                raise BrokenPipelineFolder(f"{where}{name} field '{field}' is {_show(v)}, outside the embedding table "
                                           f"of vocab_size {vocab}")
    if part == "scheduler" and isinstance(config.get("trained_betas"), list) \
            and len(config["trained_betas"]) != config.get("num_train_timesteps", 1000):
        raise BrokenPipelineFolder(f"{where}{name} field 'trained_betas' holds {len(config['trained_betas'])} betas, "
                                   f"num_train_timesteps is {config.get('num_train_timesteps', 1000)}")
    if part == "scheduler" and _finite(config.get("beta_start"), 0, 1) and _finite(config.get("beta_end"), 0, 1) \
            and config["beta_start"] > config["beta_end"]:
        raise BrokenPipelineFolder(f"{where}{name} field 'beta_start' ({config['beta_start']}) is above beta_end "
                                   f"({config['beta_end']})")
