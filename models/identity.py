"""A model's identity: a hash of its architecture and weights.

Caches record the identity of the frozen models that produced them, so a trainer can
refuse latents made by a different VAE or text encoder instead of training on garbage.
"""
import hashlib
import json

import torch


def model_identity(model: torch.nn.Module, config: dict) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
