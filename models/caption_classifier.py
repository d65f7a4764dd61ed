"""A small CNN that reads a synthetic image's attributes back: one head per caption attribute.

It scores generated images against their prompts (caption accuracy), so it only has to be
right on clean synthetic images; it is deliberately small (0.2-0.7M parameters) so that
training it is a few seconds of CPU. Saved as `caption_classifier.safetensors` (weights)
plus `caption_classifier.json` (resolution, width and the label vocabulary of each head).
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "caption_classifier.safetensors"
CONFIG = "caption_classifier.json"
FORMAT = 1


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CaptionClassifier(nn.Module):
    """Images [N, 3, R, R] in [-1, 1] -> {head: logits [N, len(vocab[head])]}.

    Two full-resolution convolutions see pixel-scale texture; stride-2 blocks then halve the
    side to 4-7 px, average-pooled to 4x4 and flattened, so that position survives.
    """

    def __init__(self, vocab: dict[str, list[str]], resolution: int, width: int = 32, hidden: int = 128):
        super().__init__()
        if resolution < 8:
            raise ValueError(f"caption classifier resolution must be at least 8 px, got {resolution}")
        if not vocab or any(len(v) < 2 for v in vocab.values()):
            raise ValueError(f"caption classifier needs heads with at least 2 labels each, got {vocab}")
        self.vocab = {k: list(v) for k, v in vocab.items()}
        self.resolution, self.width, self.hidden = resolution, width, hidden
        layers, side, ch = [_block(3, width, 1), _block(width, width, 1)], resolution, width
        while side >= 8:
            out = min(2 * ch, 4 * width)
            layers.append(_block(ch, out, 2))
            side, ch = (side + 1) // 2, out
        layers.append(nn.AdaptiveAvgPool2d(4))  # 4x4 whatever the resolution (a no-op for powers of two)
        self.features = nn.Sequential(*layers)
        self.trunk = nn.Sequential(nn.Linear(ch * 18, hidden), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, len(v)) for k, v in self.vocab.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (self.resolution,) * 2:
            raise ValueError(f"caption classifier reads [N, 3, {self.resolution}, {self.resolution}] images "
                             f"(its training resolution), got {list(images.shape)}")
        f = self.features(images)
        # Flattened 4x4 map: where things are; its global mean and max: what is anywhere
        # (a texture detector firing inside the shape, wherever the shape is).
        h = self.trunk(torch.cat([f.flatten(1), f.mean((2, 3)), f.amax((2, 3))], 1))
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> list[dict[str, str]]:
        """Each image's most likely label per head, in eval mode (restores the mode after)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out: list[dict[str, str]] = []
        try:
            for i in range(0, len(images), batch_size):
                batch = images[i:i + batch_size].to(device, torch.float32).clamp(-1, 1)
                idx = {k: v.argmax(1).tolist() for k, v in self(batch).items()}
                out.extend({k: self.vocab[k][idx[k][j]] for k in self.vocab} for j in range(len(batch)))
        finally:
            self.train(was_training)
        return out

    def config(self) -> dict:
        return {"format": FORMAT, "resolution": self.resolution, "width": self.width, "hidden": self.hidden,
                "vocab": self.vocab}


def save_classifier(model: CaptionClassifier, out_dir: str, extra: dict | None = None) -> str:
    """Weights + config json (written last, so its presence means a complete save); `extra`
    (e.g. what it was trained on, its held-out accuracy) is recorded in the json."""
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out_dir, WEIGHTS))
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump({**model.config(), **(extra or {})}, f, indent=1, sort_keys=True)
    return out_dir


def load_classifier(path: str, device: str | torch.device = "cpu") -> CaptionClassifier:
    """A saved classifier in eval mode; a one-line error naming the missing file."""
    for name in (CONFIG, WEIGHTS):
        if not os.path.exists(os.path.join(path, name)):
            raise FileNotFoundError(f"caption classifier {path}: missing {name} "
                                    f"(train one with launch/train_caption_classifier.py)")
    with open(os.path.join(path, CONFIG)) as f:
        cfg = json.load(f)
    if cfg.get("format") != FORMAT:
        raise ValueError(f"caption classifier {path}: format {cfg.get('format')!r}, this code reads {FORMAT}")
    model = CaptionClassifier(cfg["vocab"], cfg["resolution"], cfg["width"], cfg["hidden"])
    model.load_state_dict(load_file(os.path.join(path, WEIGHTS)))
    return model.to(device).eval()
