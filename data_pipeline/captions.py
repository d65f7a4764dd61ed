"""Which caption a cached sample trains with this epoch, and in what tag order.

* A sample with several captions (make_shards keeps them all: imagefolder lists, HF datasets)
  trains with one of them per epoch, drawn from (seed, epoch, sample).
* `shuffle` (kohya's shuffle_caption) shuffles a caption's comma-separated tags per sample and
  epoch, leaving the first `keep_tokens` tags in front (kohya's keep_tokens: a trigger word,
  "sks dog, ..."): tag order stops being something the model learns. It changes the text, so
  the text must be encoded after it: a cache of token ids (text=tokens) keeps the caption text
  and the trainer runs the frozen encoder; an embeddings cache holds one embedding per caption,
  computed once, and is refused.

Randomness is a pure function of (seed, epoch, the sample's shard name and key), so a resumed or
elastic run (or one on a copy of the cache) draws the same.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np


def shuffle_tags(caption: str, keep_tokens: int, rng: np.random.Generator) -> str:
    """`caption`'s comma-separated tags with all but the first `keep_tokens` in a random order."""
    tags = [t.strip() for t in caption.split(",")]
    tags = [t for t in tags if t]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    return ", ".join(head + [tail[i] for i in rng.permutation(len(tail))])


def sample_rng(seed: int, epoch: int, sample: dict) -> np.random.Generator:
    # The shard's name, not its URL: a cache copied elsewhere draws the same.
    where = f"{str(sample.get('__url__')).rsplit('/', 1)[-1]}:{sample.get('__key__')}".encode()
    return np.random.default_rng([seed, epoch, int.from_bytes(hashlib.blake2b(where, digest_size=8).digest(), "big")])


class CaptionPicker:
    """Picks a cached sample's caption (picklable: it runs in the loader's workers).

    `tokenize`: the frozen text encoder's tokenizer (captions -> [n, ...] ids), needed for `shuffle`."""

    def __init__(self, seed: int, shuffle: bool = False, keep_tokens: int = 0, tokenize=None):
        if shuffle and tokenize is None:
            raise ValueError("caption shuffling needs the tokenizer (a cache of token ids)")
        self.seed, self.shuffle, self.keep_tokens, self.tokenize = seed, shuffle, keep_tokens, tokenize

    def __call__(self, sample: dict, tensors: dict) -> dict:
        alt = tensors.get("tokens_alt", tensors.get("text_emb_alt"))
        n = 1 + (len(alt) if alt is not None else 0)
        if n == 1 and not self.shuffle:
            return tensors
        rng = sample_rng(self.seed, int(sample.get("__epoch__", 0)), sample)
        i = int(rng.integers(n)) if n > 1 else 0
        out = {k: v for k, v in tensors.items() if not k.endswith("_alt")}
        if self.shuffle:
            texts = _captions(sample)
            text = texts[i] if i < len(texts) else texts[0]
            out["tokens"] = self.tokenize([shuffle_tags(text, self.keep_tokens, rng)])[0].to(tensors["tokens"].dtype)
        elif i > 0:
            for key in ("tokens", "text_emb", "pooled", "clip_emb"):
                if f"{key}_alt" in tensors:
                    out[key] = tensors[f"{key}_alt"][i - 1]
        return out


def _captions(sample: dict) -> list[str]:
    """The sample's captions: its .json's list where it has several, else its .txt."""
    try:
        texts = json.loads(bytes(sample["json"])).get("captions")
        if isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts):
            return texts
    except (KeyError, ValueError, AttributeError, RecursionError):
        pass
    return [bytes(sample.get("txt", b"")).decode("utf-8", errors="replace")]
