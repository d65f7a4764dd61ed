"""trainer/core/zero_lean.py and zero_flat.py: DeepSpeed's ZeRO-1/2 optimizer without its per-tensor loops gives
DeepSpeed's own results (gradient norm, clipping, weights) and dispatches fewer operators per step."""
from unittest import mock

import pytest
import torch


class _Net(torch.nn.Module):
    """Seven small layers and one that this step may leave out (an unused parameter: no gradient)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(6)], torch.nn.Linear(16, 1))
        self.sometimes = torch.nn.Linear(16, 16)
        self.use_all = True

    def forward(self, x):
        return self.layers(self.sometimes(x) if self.use_all else x)


def _engine(stage: int, lean: bool, precision: str = "fp32", bucket_elements: int = 0, grad_accum: int = 1):
    """lean=False: DeepSpeed's optimizer exactly as DeepSpeed builds it. bucket_elements: its reduce_bucket_size."""
    from trainer.core import zero_lean
    from trainer.core.engine import build_engine, deepspeed_config

    torch.manual_seed(0)
    config = deepspeed_config(batch_per_rank=8, grad_accum=grad_accum, world_size=1, zero_stage=stage,
                              precision=precision, lr=0.05, betas=(0.9, 0.999), weight_decay=0.01, grad_clip=0.5)
    if bucket_elements:
        config["zero_optimization"]["reduce_bucket_size"] = bucket_elements
    with mock.patch.object(zero_lean, "install", zero_lean.install if lean else (lambda engine: [])):
        return build_engine(_Net(), config)


def _train(engine, steps: int = 4, skip_every: int = 0):
    norms, g = [], torch.Generator().manual_seed(1)
    for step in range(steps):
        for _ in range(engine.gradient_accumulation_steps()):
            engine.module.use_all = not skip_every or step % skip_every
            x = torch.randn(8, 16, generator=g)
            loss = engine(x).square().mean() * 100  # gradients far above grad_clip: clipping acts on every step
            engine.backward(loss)
            engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    return norms, [p.detach().clone() for p in engine.module.parameters()]


@pytest.mark.parametrize("stage,precision,bucket_elements,grad_accum", [
    (1, "fp32", 0, 1), (2, "fp32", 0, 1), (2, "bf16", 0, 1),
    (1, "fp32", 300, 2), (2, "fp32", 300, 2)])  # several buckets (filled by the hooks at ZeRO-2), accumulation
def test_lean_zero_optimizer_gives_deepspeeds_results(process_group, stage, precision, bucket_elements, grad_accum):
    """Every third step leaves a layer out: its gradient is absent, and counts as zeros on both paths."""
    lean = _engine(stage, True, precision, bucket_elements, grad_accum)
    assert lean.optimizer.get_grad_norm_direct.__func__.__name__ == "_grad_norm_direct"  # installed
    flat = lean.optimizer.flat_gradients
    assert (len(flat.buckets) > 1) == bool(bucket_elements)
    norms_lean, weights_lean = _train(lean, 6, skip_every=3)
    norms_ds, weights_ds = _train(_engine(stage, False, precision, bucket_elements, grad_accum), 6, skip_every=3)
    assert all(n > 0.5 for n in norms_ds)  # clipped
    torch.testing.assert_close(torch.tensor(norms_lean), torch.tensor(norms_ds), rtol=1e-6, atol=0)
    for a, b in zip(weights_lean, weights_ds):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_lean_zero_optimizer_repoints_parameters_only_when_moved(process_group):
    """After the flat weight buffer is replaced (as a checkpoint load may), the parameters follow it again."""
    engine = _engine(2, True)
    opt = engine.optimizer
    assert not hasattr(_engine(2, False).optimizer, "flat_gradients")
    _train(engine, 1)
    first = next(engine.module.parameters())
    before = first.data_ptr()
    opt._update_model_bit16_weights(0)  # in place: nothing to do
    assert first.data_ptr() == before
    opt.bit16_groups_flat[0] = opt.bit16_groups_flat[0].clone()
    opt._update_model_bit16_weights(0)
    assert first.data_ptr() == opt.bit16_groups_flat[0].data_ptr()
    _train(engine, 1)  # and training goes on


def test_zero0_gradients_are_the_mean_over_ranks():
    """ZeRO-0 on 2 ranks: the flat all-reduce (one _chunk_cat copy in, one foreach copy out) gives each rank the
    mean of every rank's gradients (`--deepspeed-own` runs the same check on DeepSpeed's own all-reduce)."""
    from conftest import ranks_of, run_cmd

    out = run_cmd([*ranks_of(2), "tests/allreduce_driver.py"])
    assert "gradients are the mean over 2 ranks (flat all-reduce)" in out.stdout


def test_zero12_flat_gradients_match_deepspeed_on_two_ranks():
    """ZeRO-1 and ZeRO-2 on 2 ranks (all-reduce of each bucket, this rank's share of it into its partition)."""
    from conftest import ranks_of, run_cmd

    out = run_cmd([*ranks_of(2), "tests/allreduce_driver.py", "--zero12"])
    assert "ZeRO-1/2 flat gradients train to DeepSpeed's weights on 2 ranks" in out.stdout
