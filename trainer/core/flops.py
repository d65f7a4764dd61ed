"""Model FLOPs per image, the device's peak, and the MFU they give.

`torch.utils.flop_counter` counts matmuls, convolutions and attention (2 FLOPs per
multiply-accumulate), no elementwise work (norms, activations, the optimizer): the usual
MFU convention of model FLOPs over peak (PaLM, Chowdhery et al. 2022, appendix B; the
Chinchilla-style 6N-per-token count), so figures here compare with published MFUs. A
forward + backward is about 3x the forward (weight and input gradients; the first layer's
input needs none).
"""
from __future__ import annotations

import re
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils import flop_counter

aten = torch.ops.aten

# SDPA on the CPU runs as its own kernel that flop_counter has no formula for (it would
# count attention as 0 FLOPs); it is the same computation as the GPU flash kernel.
_CPU_SDPA = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_backward_flop_count(g, q, k, v),
} if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward") else {}


def _counter() -> flop_counter.FlopCounterMode:
    return flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_SDPA)


def train_flops_per_sample(module_fn: Callable[[], torch.Tensor], batch_size: int) -> float:
    """FLOPs per sample of one forward + backward: `module_fn` runs a forward on a batch of
    `batch_size` and returns a scalar loss (the gradients it leaves are the caller's)."""
    with _counter() as counter:
        module_fn().backward()
    return counter.get_total_flops() / batch_size


def forward_flops_per_sample(fn: Callable[[], object], batch_size: int) -> float:
    """FLOPs of one no-grad forward per sample (frozen encoders: the VAE, the text tower)."""
    with torch.no_grad(), _counter() as counter:
        fn()
    return counter.get_total_flops() / batch_size


def unet_train_flops_per_sample(unet: torch.nn.Module, latent_shape: tuple[int, int, int],
                                context_shape: tuple[int, int], batch_size: int = 2) -> float:
    """FLOPs per sample of one training step of `unet` (train mode, every weight trained,
    MSE against a random target) on random latents [C, H, W] and text embeddings [L, D].

    Call it before training starts or on a copy: it runs a real backward. The module's mode,
    requires_grad flags, gradients and the RNG are restored afterwards, but a module wrapped
    by DeepSpeed ZeRO-3 holds empty partitioned weights and cannot be measured this way.
    """
    params = list(unet.parameters())
    device, dtype = params[0].device, params[0].dtype
    was_training, flags, grads = unet.training, [p.requires_grad for p in params], [p.grad for p in params]
    for p in params:
        p.grad = None
        p.requires_grad_(True)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            z = torch.randn((batch_size, *latent_shape), device=device, dtype=dtype)
            context = torch.randn((batch_size, *context_shape), device=device, dtype=dtype)
            t = torch.randint(0, 1000, (batch_size,), device=device)
            target = torch.randn_like(z, dtype=torch.float32)
            added = None
            if getattr(unet.config, "addition_embed_type", None) == "text_time":  # SDXL: pooled text + 6 time ids
                cfg = unet.config
                pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
                added = {"text_embeds": torch.randn((batch_size, pooled), device=device, dtype=dtype),
                         "time_ids": torch.full((batch_size, 6), float(latent_shape[-1] * 8), device=device, dtype=dtype)}
            unet.train()
            return train_flops_per_sample(
                lambda: torch.nn.functional.mse_loss(unet(z, t, context, added_cond_kwargs=added).sample.float(),
                                                     target), batch_size)
    finally:
        unet.train(was_training)
        for p, flag, grad in zip(params, flags, grads):
            p.grad = grad  # the measurement's own gradients are dropped
            p.requires_grad_(flag)


# Dense (no structured sparsity) peak TFLOP/s per GPU from NVIDIA's datasheets, which quote
# tensor-core figures with 2:4 sparsity: those are halved here. bf16/fp16 and tf32 are tensor
# cores; fp32 is the plain FP32 rate, what fp32 matmuls get unless TF32 is enabled
# (torch.backends.cuda.matmul.allow_tf32; cuDNN convolutions use TF32 by default). SKUs
# differ in clocks and power (B200 above all): pass an override where the part differs.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # the H100 SXM's compute
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 80.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},  # SXM and PCIe alike
    "A10G": {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2},  # AWS part, no NVIDIA datasheet
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},  # fp32 accumulate
    "V100 PCIe": {"fp16": 112.0, "tf32": 14.0, "fp32": 14.0},  # no bf16, no tf32: fp32 rate
    "V100": {"fp16": 125.0, "tf32": 15.7, "fp32": 15.7},  # SXM2
}
# torch.cuda.get_device_name() -> table key; first match wins, so specific names come first.
_NAMES = [(r"H100.*PCIE", "H100 PCIe"), (r"H100.*\bNVL", "H100 NVL"), (r"H100", "H100 SXM"), (r"H200", "H200"),
          (r"B200", "B200"), (r"A100", "A100"), (r"A10G", "A10G"), (r"A10", "A10"), (r"L40S", "L40S"), (r"L4", "L4"),
          (r"RTX 4090", "RTX 4090"), (r"V100.*PCIE", "V100 PCIe"), (r"V100", "V100")]


def gpu_table_key(device_name: str) -> str | None:
    """The PEAK_TFLOPS key for a CUDA device name, e.g. "NVIDIA H100 80GB HBM3" -> "H100 SXM"."""
    name = device_name.upper()  # whole words only: "A10" is not "A100", "L4" not "L40S", "H200" not "GH200"
    return next((key for pattern, key in _NAMES if re.search(rf"\b{pattern}\b", name)), None)


def device_peak_tflops(precision: str, override: float = 0.0) -> float | None:
    """Peak dense TFLOP/s of this process's device for `precision` (bf16, fp16, tf32, fp32);
    `override` > 0 wins. None for an unknown GPU and on the CPU: a CPU's peak depends on its
    vector units, clocks and core count in ways no table captures, so no MFU is claimed there."""
    if precision not in ("bf16", "fp16", "tf32", "fp32"):
        raise ValueError(f"precision must be bf16, fp16, tf32 or fp32, got {precision!r}")
    if override > 0:
        return override
    key = gpu_table_key(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    return None if key is None else PEAK_TFLOPS[key].get(precision)


def peak_memory_gb() -> float | None:
    """Peak memory in GB (1e9 bytes): on CUDA the most this process allocated on the current
    device (torch.cuda.max_memory_allocated); on the CPU the process's peak resident set size
    (RSS, all memory the process touched, not only tensors)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9  # bytes on macOS, KiB on Linux


@dataclass(frozen=True)
class Throughput:
    """Achieved TFLOP/s and MFU from an image rate, per device: divide a global rate by the world size."""
    flops_per_sample: float
    peak_tflops: float | None = None

    def tflops(self, images_per_s: float) -> float:
        return images_per_s * self.flops_per_sample / 1e12

    def mfu(self, images_per_s: float) -> float | None:
        return None if not self.peak_tflops else self.tflops(images_per_s) / self.peak_tflops


def flow_train_flops_per_sample(model: torch.nn.Module, family: str, latent_shape: tuple[int, int, int],
                                context_shape: tuple[int, int], pooled_dim: int, batch_size: int = 2) -> float:
    """FLOPs per sample of one training step of an SD3 or Flux transformer (models/flow_model.py's call) on
    random latents [C, H, W], a text sequence [L, D] and pooled embeddings; on a meta-device copy, as the UNet's."""
    from models.flow_model import velocity

    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    z = torch.zeros((batch_size, *latent_shape), device=device, dtype=dtype)
    context = torch.zeros((batch_size, *context_shape), device=device, dtype=dtype)
    pooled = torch.zeros((batch_size, pooled_dim), device=device, dtype=dtype)
    sigmas = torch.full((batch_size,), 0.5, device=device, dtype=dtype)
    guidance = sigmas if getattr(model.config, "guidance_embeds", False) else None
    was = model.training
    model.train()
    try:
        return train_flops_per_sample(
            lambda: velocity(model, family, z, sigmas, context, pooled, guidance).float().square().mean(), batch_size)
    finally:
        model.train(was)

