"""#30: rectified flow (models/flow.py) against its formulas and against diffusers' own implementations of them:
the velocity target, the timestep samplers, SD3's and Flux's shifts, the loss weightings."""
import math

import pytest
import torch

from models import flow


def test_the_noised_sample_and_its_velocity_are_the_straight_line_and_its_slope():
    from diffusers import FlowMatchEulerDiscreteScheduler

    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    sigmas = torch.tensor([0.0, 0.3, 1.0])
    xt, v = flow.noised(x0, eps, sigmas)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], eps[2])
    torch.testing.assert_close(v, eps - x0)
    # x_sigma moves along v: d x / d sigma = v, exactly (a straight line)
    xt2, _ = flow.noised(x0, eps, sigmas + 0.1)
    torch.testing.assert_close(xt2 - xt, 0.1 * v, atol=1e-6, rtol=1e-5)
    # diffusers' scheduler noises the same way (scale_noise at a timestep of its schedule)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    t = sched.timesteps[[100]]
    sigma = sched.sigmas[100]
    torch.testing.assert_close(sched.scale_noise(x0[:1], t, eps[:1]), flow.noised(x0[:1], eps[:1], sigma[None])[0])


def test_euler_steps_of_the_true_velocity_land_on_the_data():
    """The Euler sampler pipelines use, fed the exact velocity of one data point, ends on it: the path is straight."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    x0, x = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    noise = x.clone()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(7)
    for t in sched.timesteps:
        x = sched.step(noise - x0, t, x).prev_sample
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=1e-5)


def test_the_timestep_samplers_and_weightings_match_diffusers():
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    torch.manual_seed(0)
    want = compute_density_for_timestep_sampling("mode", 1000, mode_scale=1.29)
    torch.manual_seed(0)
    got = flow.sample_u(1000, None, "cpu", "mode", mode_scale=1.29)
    torch.testing.assert_close(got, want)
    u = flow.sample_u(100_000, torch.Generator().manual_seed(1), "cpu", "logit_normal", 0.0, 1.0)
    logits = torch.logit(u)
    assert abs(float(logits.mean())) < 0.02 and abs(float(logits.std()) - 1) < 0.02  # sigmoid of N(0, 1)
    sigmas = torch.linspace(0.05, 0.95, 19)
    for weighting in ("sigma_sqrt", "cosmap"):
        torch.testing.assert_close(flow.loss_weight(sigmas, weighting), compute_loss_weighting_for_sd3(weighting, sigmas))
    assert torch.equal(flow.loss_weight(sigmas, "none"), torch.ones(19))
    with pytest.raises(ValueError, match="timestep sampler must be one of"):
        flow.sample_u(2, None, "cpu", "lognormal")


def test_sd3s_shift_and_fluxs_resolution_dependent_shift_match_the_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's scheduler config
    u = torch.linspace(1, 1 / 1000, 1000)
    torch.testing.assert_close(flow.shift_sigmas(u, 3.0), sched.sigmas)
    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)
    tokens = (1024 // 16) ** 2  # a 1024 px image: 128x128 latents in 2x2 patches
    mu = flow.flux_mu(tokens)
    assert math.isclose(mu, 1.15) and math.isclose(flow.flux_mu(256), 0.5)
    flux.set_timesteps(4, mu=mu)
    u = torch.linspace(1, 1 / 1000, 4)
    torch.testing.assert_close(flow.time_shift(u, mu), flux.sigmas[:-1])
    torch.testing.assert_close(flow.time_shift(u, mu), flow.shift_sigmas(u, math.exp(mu)))


def test_a_perfect_velocity_has_zero_loss_and_draws_are_reproducible():
    x0 = torch.randn(4, 4, 8, 8)
    seen = {}

    def perfect(xt, sigmas):
        s = sigmas.view(-1, 1, 1, 1)
        eps = (xt - (1 - s) * x0) / s
        seen["sigmas"] = sigmas
        return eps - x0

    loss = flow.flow_loss(perfect, x0, torch.Generator().manual_seed(3), sampler="mode", shift=3.0, weighting="cosmap")
    assert float(loss) < 1e-8
    first = seen["sigmas"].clone()
    flow.flow_loss(perfect, x0, torch.Generator().manual_seed(3), sampler="mode", shift=3.0)
    assert torch.equal(first, seen["sigmas"]) and bool((first > 0).all() and (first < 1).all())
    zero = flow.flow_loss(lambda xt, s: torch.zeros_like(xt), x0, torch.Generator().manual_seed(3),
                          sample_weight=torch.zeros(4))
    assert float(zero) == 0.0  # weighted-0 fill trains nothing
