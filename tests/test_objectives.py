"""The training objective's options, the learning-rate schedules, the UNet speed options,
and what happens to an optimizer step whose loss is NaN."""
import math

import pytest
import torch

from models.diffusion import noise_schedule, snr, training_loss
from models.unet import build_unet
from trainer.unet.job import UNetJob, make_plan
from trainer.unet.step import prepare_unet
from trainer.core.schedule import lr_at as _lr_at


def lr_at(step, cfg, plan):
    """The UNet job's call: steps of its plan."""
    return _lr_at(step, cfg.lr, plan.warmup_steps, plan.total_steps, cfg.lr_schedule, cfg.lr_final_ratio)


class _Recorder(torch.nn.Module):
    """A stand-in denoiser that returns a fixed prediction and remembers its inputs."""

    def __init__(self, pred):
        super().__init__()
        self.pred, self.seen = pred, None

    def forward(self, zt, t, context):
        self.seen = (zt, t)
        return type("Out", (), {"sample": self.pred})()


def test_a_sample_weight_of_zero_takes_a_sample_out_of_the_loss():
    """The loader's stand-in for a batch whose samples all failed weighs 0 (#27: exactly once at batch size 1)."""
    sched = noise_schedule("epsilon")
    z0, pred, ctx = torch.randn(4, 4, 8, 8), torch.zeros(4, 4, 8, 8, requires_grad=True), torch.zeros(4, 3, 8)
    base = training_loss(_Recorder(pred), z0, ctx, sched, torch.Generator().manual_seed(1))
    ones = training_loss(_Recorder(pred), z0, ctx, sched, torch.Generator().manual_seed(1),
                         sample_weight=torch.ones(4))
    torch.testing.assert_close(ones, base)
    zero = training_loss(_Recorder(pred), z0, ctx, sched, torch.Generator().manual_seed(1),
                         sample_weight=torch.zeros(4))
    zero.backward()
    assert float(zero) == 0 and float(pred.grad.abs().max()) == 0


def test_min_snr_weights_each_sample_by_its_clipped_snr():
    sched = noise_schedule("epsilon")
    z0, pred = torch.randn(6, 4, 8, 8), torch.zeros(6, 4, 8, 8)
    ctx = torch.zeros(6, 3, 8)
    plain, weighted = _Recorder(pred), _Recorder(pred)
    base = training_loss(plain, z0, ctx, sched, torch.Generator().manual_seed(1))
    loss = training_loss(weighted, z0, ctx, sched, torch.Generator().manual_seed(1), min_snr_gamma=5.0)
    t = weighted.seen[1]
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))  # same draw as inside
    per_sample = noise.pow(2).mean(dim=(1, 2, 3))
    s = snr(sched, t)
    torch.testing.assert_close(base, per_sample.mean())
    torch.testing.assert_close(loss, (per_sample * torch.clamp(s, max=5.0) / s).mean())
    assert (torch.clamp(s, max=5.0) / s <= 1).all()


def test_min_snr_for_v_prediction_is_finite_at_zero_terminal_snr():
    sched = noise_schedule("v_prediction", zero_terminal_snr=True)
    assert float(sched.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12)  # the last step is pure noise
    assert float(snr(sched, torch.tensor([999]))) == 0.0
    z0 = torch.randn(4, 4, 8, 8)
    loss = training_loss(_Recorder(torch.zeros(4, 4, 8, 8)), z0, torch.zeros(4, 3, 8), sched,
                         torch.Generator().manual_seed(0), min_snr_gamma=5.0)
    assert math.isfinite(loss.item())
    assert sched.config.timestep_spacing == "trailing"  # so samplers start at t = T
    with pytest.raises(ValueError, match="needs prediction_type v_prediction"):
        noise_schedule("epsilon", zero_terminal_snr=True)


def test_offset_noise_shifts_each_channel_by_a_constant():
    sched = noise_schedule("epsilon")
    z0 = torch.zeros(64, 4, 8, 8)
    rec = _Recorder(torch.zeros(64, 4, 8, 8))
    training_loss(rec, z0, torch.zeros(64, 3, 8), sched, torch.Generator().manual_seed(0), offset_noise=1.0)
    zt, t = rec.seen
    sigma = (1 - sched.alphas_cumprod[t]).sqrt()[:, None]
    channel_means = zt.mean(dim=(2, 3)) / sigma  # the noise's per-channel mean
    assert channel_means.std() > 0.7  # about 1 with offset noise; 1/8 without


def test_lr_schedules():
    plan = make_plan(UNetJob(total_samples=1000, warmup_samples=100, batch_per_rank=10), world_size=1)
    for kind, end in (("cosine", 0.1), ("linear", 0.1), ("constant", 1.0)):
        cfg = UNetJob(lr=1.0, lr_schedule=kind, total_samples=1000, warmup_samples=100, batch_per_rank=10)
        lrs = [lr_at(s, cfg, plan) for s in range(plan.total_steps)]
        assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # warm-up: 10 steps
        assert lrs[-1] == pytest.approx(end, abs=0.01)
        assert all(a >= b - 1e-12 for a, b in zip(lrs[9:], lrs[10:]))  # never increases after warm-up
    mid = UNetJob(lr=1.0, lr_schedule="linear", total_samples=1000, warmup_samples=100, batch_per_rank=10)
    assert lr_at(55, mid, plan) == pytest.approx(0.1 + 0.9 * 0.5)


def test_speed_options_compute_the_same_thing():
    """SDPA vs eager attention, channels-last and gradient checkpointing change how the
    UNet runs, not its output or gradients."""
    torch.manual_seed(0)
    z, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.tensor([10, 500])
    results = []
    for opts in (dict(attention="eager"), dict(attention="sdpa", channels_last=True, gradient_checkpointing=True)):
        unet = prepare_unet(build_unet("tiny", 4, 8, 32, seed=0), UNetJob(**opts)).train()
        x = z.contiguous(memory_format=torch.channels_last) if opts.get("channels_last") else z
        out = unet(x, t, ctx).sample
        out.square().mean().backward()
        results.append((out.detach(), unet.conv_in.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("zero_stage,precision", [(0, "fp32"), (2, "fp32"), (0, "bf16"), (2, "bf16"), (3, "bf16")])
def test_a_nan_loss_skips_the_step_and_leaves_the_state_unchanged(process_group, zero_stage, precision):
    """Weights, moments and step counts are untouched by a step with a NaN loss, at every stage and precision
    (ZeRO-0: the fused AdamW skips itself on the device; ZeRO-1-3: DeepSpeed skips it)."""
    from trainer.core import dist
    from trainer.core.engine import build_engine, deepspeed_config, full_weights, skipped_steps, step_applied

    dist.init()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    engine = build_engine(model, deepspeed_config(batch_per_rank=4, grad_accum=1, world_size=1, zero_stage=zero_stage,
                                                  precision=precision, lr=0.01, betas=(0.9, 0.999),
                                                  weight_decay=0.01, grad_clip=1.0))
    x = torch.randn(4, 8)

    def step(poison: bool) -> bool:
        before = skipped_steps(engine)
        loss = engine(x).square().mean() * (float("nan") if poison else 1.0)
        engine.backward(loss)
        engine.step()
        return bool(step_applied(engine, before))

    def snapshot():
        with full_weights(engine) as module:  # ZeRO-3: gathered
            weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
        opt = {k: v for k, v in engine.optimizer.state_dict().items() if k != "overflow"}  # the flag says "skipped"
        return weights, repr(opt)  # repr covers moments, step counts and fp32 partitions of each layout

    assert step(poison=False)
    weights, opt = snapshot()
    assert not step(poison=True)
    after_w, after_opt = snapshot()
    assert all(torch.equal(weights[k], after_w[k]) for k in weights)
    assert after_opt == opt
    assert step(poison=False)  # training goes on
    assert not all(torch.equal(weights[k], v) for k, v in snapshot()[0].items())


def test_input_perturbation_noises_the_input_not_the_target():
    """#29, Ning et al. 2023: z_t = add_noise(z0, noise + gamma * xi, t), the regression target the noise."""
    sched = noise_schedule("epsilon")
    z0, pred, ctx = torch.randn(3, 4, 8, 8), torch.zeros(3, 4, 8, 8), torch.zeros(3, 3, 8)
    rec = _Recorder(pred)
    loss = training_loss(rec, z0, ctx, sched, torch.Generator().manual_seed(5), input_perturbation=0.1)
    g = torch.Generator().manual_seed(5)  # the same draws, in training_loss's order
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(0, sched.config.num_train_timesteps, (3,), generator=g)
    xi = torch.randn(z0.shape, generator=g)
    torch.testing.assert_close(rec.seen[0], sched.add_noise(z0, noise + 0.1 * xi, t))
    torch.testing.assert_close(loss, noise.pow(2).mean())  # pred is 0: the loss is the target's, the noise
