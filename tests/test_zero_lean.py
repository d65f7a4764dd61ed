"""trainer/core/zero_lean.py: DeepSpeed's ZeRO-1/2 optimizer without two of its per-tensor loops gives
DeepSpeed's own results (gradient norm, clipping, weights) and dispatches fewer operators per step."""
import pytest
import torch


def _engine(stage: int, lean: bool, precision: str = "fp32"):
    from trainer.core.engine import build_engine, deepspeed_config

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(6)], torch.nn.Linear(16, 1))
    engine = build_engine(model, deepspeed_config(batch_per_rank=8, grad_accum=1, world_size=1, zero_stage=stage,
                                                  precision=precision, lr=0.05, betas=(0.9, 0.999),
                                                  weight_decay=0.01, grad_clip=0.5))
    if not lean:  # DeepSpeed's own methods back
        opt = engine.optimizer
        opt.get_grad_norm_direct = opt._deepspeed_grad_norm_direct
        opt._update_model_bit16_weights = opt._deepspeed_update_model_bit16_weights
    return engine


def _train(engine, steps: int = 4):
    norms, g = [], torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g)
        loss = engine(x).square().mean() * 100  # gradients far above grad_clip: clipping acts on every step
        engine.backward(loss)
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    return norms, [p.detach().clone() for p in engine.module.parameters()]


@pytest.mark.parametrize("stage,precision", [(1, "fp32"), (2, "fp32"), (2, "bf16")])
def test_lean_zero_optimizer_gives_deepspeeds_results(process_group, stage, precision):
    lean = _engine(stage, True, precision)
    assert lean.optimizer.get_grad_norm_direct.__func__.__name__ == "_grad_norm_direct"  # installed
    norms_lean, weights_lean = _train(lean)
    norms_ds, weights_ds = _train(_engine(stage, False, precision))
    assert all(n > 0.5 for n in norms_ds)  # clipped
    torch.testing.assert_close(torch.tensor(norms_lean), torch.tensor(norms_ds), rtol=1e-6, atol=0)
    for a, b in zip(weights_lean, weights_ds):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_lean_zero_optimizer_repoints_parameters_only_when_moved(process_group):
    """After the flat weight buffer is replaced (as a checkpoint load may), the parameters follow it again."""
    engine = _engine(2, True)
    opt = engine.optimizer
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
    from conftest import DEEPSPEED, free_port, run_cmd

    out = run_cmd([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "tests/allreduce_driver.py"])
    assert "gradients are the mean over 2 ranks (flat all-reduce)" in out.stdout
