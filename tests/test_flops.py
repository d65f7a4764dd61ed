"""FLOP counting, peak lookup and MFU arithmetic (trainer/core/flops.py), on CPU in seconds."""
from __future__ import annotations

import pytest
import torch

from models.unet import build_unet
from trainer.core import flops


def test_linear_forward_backward_is_three_forwards():
    layer = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(4, 64, requires_grad=True)  # a layer inside a network: its input needs a gradient too
    per_sample = flops.train_flops_per_sample(lambda: layer(x).sum(), batch_size=4)
    assert per_sample == 3 * 2 * 64 * 32  # forward 2 per MAC; backward: input and weight gradients
    assert flops.forward_flops_per_sample(lambda: layer(x), batch_size=4) == 2 * 64 * 32


def test_cpu_attention_is_counted():
    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    per_sample = flops.train_flops_per_sample(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q).sum(), batch_size=2)
    fwd = 2 * 2 * 4 * 16 * 16 * 8  # QK^T and PV, per sample: 4 heads, 16 tokens, head dim 8
    assert per_sample == fwd + 2.5 * fwd  # backward: QK^T again + 4 gradient products, each half the forward


def test_unet_count_is_per_sample_and_leaves_the_model_as_it_was():
    unet = build_unet("tiny", 4, 8, 32).eval()
    unet.conv_in.weight.requires_grad_(False)
    two = flops.unet_train_flops_per_sample(unet, (4, 8, 8), (16, 32), batch_size=2)
    four = flops.unet_train_flops_per_sample(unet, (4, 8, 8), (16, 32), batch_size=4)
    assert two > 0
    assert abs(four - two) / two < 0.01
    assert not unet.training and not unet.conv_in.weight.requires_grad
    assert all(p.grad is None for p in unet.parameters())


def test_peak_lookup():
    assert flops.device_peak_tflops("bf16", override=123.0) == 123.0
    if not torch.cuda.is_available():
        assert flops.device_peak_tflops("bf16") is None  # no MFU on the CPU
    with pytest.raises(ValueError):
        flops.device_peak_tflops("int8")
    assert flops.gpu_table_key("NVIDIA H100 80GB HBM3") == "H100 SXM"
    assert flops.gpu_table_key("NVIDIA H100 PCIe") == "H100 PCIe"
    assert flops.gpu_table_key("NVIDIA A100-SXM4-80GB") == "A100"
    assert flops.gpu_table_key("NVIDIA A10G") == "A10G"
    assert flops.gpu_table_key("NVIDIA L40S") == "L40S"
    assert flops.gpu_table_key("Intel Arc") is None
    assert flops.peak_memory_gb() > 0


def test_throughput_arithmetic():
    t = flops.Throughput(flops_per_sample=2e9, peak_tflops=100.0)
    assert t.tflops(images_per_s=5000.0) == pytest.approx(10.0)
    assert t.mfu(images_per_s=5000.0) == pytest.approx(0.1)
    assert flops.Throughput(2e9).mfu(5000.0) is None
