"""Inception-v3 pool features (2048-d) for FID, from a local weights file (nothing is downloaded).

Two files are accepted, told apart by their classifier's size:

* `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's port of the TensorFlow FID network,
  1008 classes) — preferred: FID values are then on the scale papers report. Its blocks pool
  differently from torchvision's (average pools that ignore padding, a max pool in the last
  block), which `_FID_BLOCKS` reproduces on top of torchvision's modules.
* `inception_v3_google-0cc3c7bd.pth` (torchvision's ImageNet weights, 1000 classes) — works,
  but its FIDs are not comparable with published numbers, only with each other.

Both expect RGB in [-1, 1] resized (bilinear) to 299x299, which is what `InceptionFeatures`
does with the project's [-1, 1] tensors.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception as tv

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
TORCHVISION_WEIGHTS_FILE = "inception_v3_google-0cc3c7bd.pth"
FEATURE_DIM = 2048
INPUT_PX = 299


class _FIDPool:
    """Replaces the pool branch of an Inception block with the TF FID network's pooling."""

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = super()._forward(x)  # type: ignore[misc]
        outputs[-1] = self.branch_pool(self._pool(x))  # type: ignore[attr-defined]
        return outputs


class _FIDInceptionA(_FIDPool, tv.InceptionA):
    pass


class _FIDInceptionC(_FIDPool, tv.InceptionC):
    pass


class _FIDInceptionE1(_FIDPool, tv.InceptionE):
    pass


class _FIDInceptionE2(_FIDPool, tv.InceptionE):
    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def build_inception(fid_variant: bool) -> tv.Inception3:
    """An untrained Inception-v3 without the auxiliary head: the TF-FID variant (1008
    classes, FID pooling) or torchvision's (1000 classes)."""
    if not fid_variant:
        return tv.Inception3(num_classes=1000, aux_logits=False, init_weights=False)
    blocks = [tv.BasicConv2d, _FIDInceptionA, tv.InceptionB, _FIDInceptionC, tv.InceptionD, _FIDInceptionE1,
              tv.InceptionAux]
    net = tv.Inception3(num_classes=1008, aux_logits=False, init_weights=False, inception_blocks=blocks)
    net.Mixed_7c = _FIDInceptionE2(2048)
    return net


class InceptionFeatures(nn.Module):
    """Images in [-1, 1] of any size -> (N, 2048) Inception pool features."""

    def __init__(self, net: tv.Inception3, source: str = ""):
        super().__init__()
        net.fc = nn.Identity()  # the pool features come out where the logits were
        self.net, self.source = net.eval(), source

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.float().clamp(-1, 1), size=(INPUT_PX, INPUT_PX), mode="bilinear", align_corners=False)
        return self.net(x)


def load_inception(path: str) -> InceptionFeatures:
    """The FID feature extractor from a local weights file (see the module docstring).
    A missing or unusable file is a FileNotFoundError whose one line names it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights file not found: {path} (expected {FID_WEIGHTS_FILE} from "
                                f"pytorch-fid, or torchvision's {TORCHVISION_WEIGHTS_FILE})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise FileNotFoundError(f"cannot read Inception weights {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise FileNotFoundError(f"{path} is not an Inception-v3 state dict (no fc.weight)")
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    classes = state["fc.weight"].shape[0]
    if classes not in (1000, 1008):
        raise FileNotFoundError(f"{path}: fc.weight has {classes} classes; expected 1008 ({FID_WEIGHTS_FILE}) "
                                f"or 1000 ({TORCHVISION_WEIGHTS_FILE})")
    net = build_inception(fid_variant=classes == 1008)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise FileNotFoundError(f"{path} does not match Inception-v3: {str(e).splitlines()[0]}") from None
    return InceptionFeatures(net, source=path)


def default_inception_path() -> str | None:
    """The FID (preferred) or torchvision weights in torch's hub cache, if either is there."""
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    for name in (FID_WEIGHTS_FILE, TORCHVISION_WEIGHTS_FILE):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None
