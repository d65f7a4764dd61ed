"""LPIPS (Zhang et al. 2018), frozen, with its ImageNet backbone read from a local file.

The `lpips` package ships its calibrated linear heads, but its backbone (torchvision's
ImageNet VGG16 or AlexNet) is downloaded by torchvision on first use. Here it is never
downloaded: it comes from torchvision's hub cache or from a file named in the config, and a
machine with neither gets one line naming the missing file. `weights="random"` builds a
randomly initialised backbone for tests; its values are then not perceptual, and it says so.
"""
from __future__ import annotations

import os
import warnings

import torch

# torchvision's file names for the ImageNet weights (what torch.hub would download).
BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
BACKBONE_URLS = {net: f"https://download.pytorch.org/models/{name}" for net, name in BACKBONE_FILES.items()}
RANDOM = "random"
RANDOM_NOTICE = "LPIPS backbone is random: values are not perceptual"


def hub_backbone_path(net: str) -> str:
    """Where torchvision keeps the backbone: $TORCH_HOME/hub/checkpoints/FILE (default ~/.cache/torch)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", BACKBONE_FILES[net])


def _backbone_file(net: str, weights: str) -> str:
    name = BACKBONE_FILES[net]
    hint = (f"download {BACKBONE_URLS[net]} where there is network and put it there or set lpips_weights=PATH "
            f"(lpips_weights=random: a random backbone, for tests only)")
    if weights:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"lpips_weights={weights}: file does not exist (expected torchvision's {name}); "
                                    + hint.replace(" and put it there", ""))
        return weights
    path = hub_backbone_path(net)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LPIPS needs the ImageNet backbone {name}, not found at {path}; {hint}")
    return path


def _read_state(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one holding more than tensors
        raise FileNotFoundError(f"lpips weights {path} cannot be read as a torch state dict "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return state.get("state_dict", state) if isinstance(state, dict) else {}


def _load_backbone(model, net: str, path: str) -> None:
    """Copy torchvision's `features.N.*` tensors into lpips' slices, which hold those very
    modules under their original index N (lpips builds them from torchvision's `features`)."""
    state = _read_state(path)
    slices = [m for name, m in model.net.named_children() if name.startswith("slice")]
    for part in slices:
        for index, module in part.named_children():
            for pname, param in module.named_parameters(recurse=False):
                key = f"features.{index}.{pname}"
                if key not in state or state[key].shape != param.shape:
                    raise FileNotFoundError(f"lpips weights {path} are not torchvision's {BACKBONE_FILES[net]} "
                                            f"({key} missing or of another shape)")
                param.data.copy_(state[key].to(param.dtype))


def load_lpips(net: str = "vgg", weights: str = ""):
    """A frozen `lpips.LPIPS` in eval mode; inputs in [-1, 1], output (B, 1, 1, 1).

    `weights`: "" (torchvision's hub cache), a path to torchvision's backbone file, or
    "random" (seeded random backbone: deterministic across processes, not perceptual).
    The returned module has `random_backbone` set accordingly.
    """
    import lpips

    if net not in BACKBONE_FILES:
        raise ValueError(f"lpips net must be one of {', '.join(BACKBONE_FILES)}, got {net!r}")
    path = None if weights == RANDOM else _backbone_file(net, weights)
    # pnet_rand=True: torchvision builds the backbone without downloading; it is filled below
    # (or stays random). Seeded so that every process of a run gets the same random backbone.
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained=` deprecation
        torch.manual_seed(0)
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    if path is not None:
        _load_backbone(model, net, path)
    else:
        print(f"warning: {RANDOM_NOTICE} (lpips_weights=random)")
    model.random_backbone = path is None
    return model.eval().requires_grad_(False)
