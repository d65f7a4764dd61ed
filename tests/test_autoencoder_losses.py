"""The first-stage objectives (trainer/autoencoder/losses.py): where each loss term's gradient goes,
the adaptive GAN weight, the VQ straight-through estimator, codebook usage and restarts, presets,
LPIPS weights, and config mismatches."""

import pytest
import torch

from models.autoencoder import build_autoencoder, downsample_factor, encode_moments
from models.discriminator import build_discriminator, patch_grid
from models.perceptual import load_lpips
from trainer.core import config as config_lib
from trainer.autoencoder.losses import (CodebookUsage, FirstStageLoss, adaptive_weight, codebook_losses, hinge_d_loss,
                                        hinge_g_loss, restart_dead_codes, vq_forward)
from trainer.autoencoder.job import AutoencoderJob


@pytest.fixture(scope="module")
def lpips_random():
    return load_lpips("vgg", "random")


def _objective(kind, lpips, norm="batch"):
    disc = build_discriminator(channels=8, layers=2, norm=norm, seed=1)
    return FirstStageLoss(kind, lpips=lpips, discriminator=disc, disc_start_samples=0)


def _images(n=4, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def _reaches(grad) -> bool:
    return grad is not None and grad.abs().sum() > 0


# --- the loss functions on hand-made cases ---------------------------------------------------------

def test_hinge_losses_on_hand_made_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, 0.5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2.5] -> 7/6; half their sum = 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(1.0)
    assert hinge_g_loss(fake).item() == pytest.approx(0.5 / 3)  # minus the mean fake logit, -0.5 / 3
    assert hinge_d_loss(torch.tensor([1.5]), torch.tensor([-3.0])).item() == 0.0  # beyond the margins: nothing


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    rec = 3 * w[0] + 4 * w[1]  # gradient (3, 4): norm 5
    g = w[0] ** 2  # gradient (2, 0): norm 2
    weight = adaptive_weight(rec, g, w, disc_weight=0.5)
    assert weight.item() == pytest.approx(0.5 * 5 / (2 + 1e-4)) and not weight.requires_grad
    assert adaptive_weight(rec, 0 * w.sum(), w).item() == 1e4  # 5 / 1e-4, clamped


def test_adaptive_weight_uses_the_decoders_last_layer(lpips_random):
    model, objective = build_autoencoder("tiny"), _objective("kl_gan", lpips_random)
    _, _, logs = objective.generator_loss(model, _images(), samples_seen=0, generator=torch.Generator().manual_seed(0))
    last = model.decoder.conv_out.weight
    rec_grad, = _grads(logs["l1"] + logs["lpips"], [last])
    g_grad, = _grads(logs["g_loss"], [last])
    expected = objective.disc_weight * rec_grad.norm() / (g_grad.norm() + 1e-4)
    assert logs["disc_adaptive_weight"].item() == pytest.approx(expected.item(), rel=1e-5)


# --- where each term's gradient goes ------------------------------------------------------------------

def test_each_kl_gan_term_reaches_the_parameters_it_should(lpips_random):
    model, objective = build_autoencoder("tiny"), _objective("kl_gan", lpips_random)
    loss, _, logs = objective.generator_loss(model, _images(), samples_seen=0, generator=torch.Generator().manual_seed(0))
    enc, dec = model.encoder.conv_in.weight, model.decoder.conv_out.weight
    for term in ("l1", "lpips", "g_loss"):  # through the decoder, and on through the latent to the encoder
        g_enc, g_dec = _grads(logs[term], [enc, dec])
        assert _reaches(g_dec) and _reaches(g_enc), term
    g_enc, g_dec = _grads(logs["kl"], [enc, dec])
    assert _reaches(g_enc) and not _reaches(g_dec)  # the KL is a property of the encoder alone
    loss.backward()
    assert all(p.grad is None for p in objective.discriminator.parameters())  # a fixed function here
    assert not any(p.requires_grad for p in lpips_random.parameters())


def test_discriminator_and_generator_steps_leave_each_other_alone(lpips_random):
    model, objective = build_autoencoder("tiny"), _objective("kl_gan", lpips_random, norm="batch")
    disc = objective.discriminator
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    disc_opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    x = _images()
    disc_before = {k: v.clone() for k, v in disc.state_dict().items()}  # BatchNorm running stats included
    loss, recon, _ = objective.generator_loss(model, x, samples_seen=0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    opt.step()
    for k, v in disc.state_dict().items():  # the generator step did not move the discriminator
        assert torch.equal(v, disc_before[k]), k
    ae_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    ae_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    d_loss, _ = objective.discriminator_loss(x, recon)
    d_loss.backward()
    disc_opt.step()
    for n, p in model.named_parameters():  # the discriminator step did not touch the autoencoder
        assert torch.equal(p.grad, ae_grads[n]) and torch.equal(p.detach(), ae_weights[n]), n
    assert not torch.equal(disc.state_dict()["net.0.weight"], disc_before["net.0.weight"])
    assert not torch.equal(disc.state_dict()["net.3.running_mean"], disc_before["net.3.running_mean"])


def test_vq_straight_through_and_codebook_terms(lpips_random):
    model = build_autoencoder("vq_tiny")
    x = _images()
    recon, z, codes, indices = vq_forward(model, x)
    with torch.no_grad():
        torch.testing.assert_close(recon, model.decode(model.encode(x).latents).sample)  # what sampling decodes
    l1 = (recon - x).abs().mean()
    enc, book = model.encoder.conv_in.weight, model.quantize.embedding.weight
    g_z, g_enc, g_book = _grads(l1, [z, enc, book])
    assert _reaches(g_enc) and not _reaches(g_book)  # through the quantiser to the encoder, not to the codes
    q = codes.detach().clone().requires_grad_(True)  # the decoder's input as a leaf: its gradient is what z gets
    g_q, = _grads((model.decoder(model.post_quant_conv(q)) - x).abs().mean(), [q])
    torch.testing.assert_close(g_z, g_q, rtol=1e-4, atol=1e-7)
    codebook, commit = codebook_losses(z, codes)
    g_enc, g_book = _grads(codebook, [enc, book])
    assert _reaches(g_book) and not _reaches(g_enc)
    g_enc, g_book = _grads(commit, [enc, book])
    assert _reaches(g_enc) and not _reaches(g_book)
    loss, _, logs = _objective("vq_gan", lpips_random).generator_loss(model, x, samples_seen=0)
    for term in ("lpips", "g_loss"):
        assert _reaches(_grads(logs[term], [model.decoder.conv_out.weight])[0]), term


def test_codebook_usage_over_a_window():
    usage = CodebookUsage(size=4, window=2)
    usage.update(torch.tensor([0, 1, 2, 3]))
    assert usage.stats() == {"perplexity": pytest.approx(4.0), "dead_codes": 0, "codes_restarted": 0}
    usage.update(torch.tensor([0, 0, 0, 0]))  # counts [5, 1, 1, 1]
    p = torch.tensor([5, 1, 1, 1]) / 8
    assert usage.stats()["perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    restored = CodebookUsage(4, 2)
    restored.load_state_dict(usage.state_dict())
    for u in (usage, restored):
        u.update(torch.tensor([0, 0]))  # the first batch leaves the window: counts [6, 0, 0, 0]
        assert u.stats() == {"perplexity": pytest.approx(1.0), "dead_codes": 3, "codes_restarted": 0}


def test_dead_codes_restart_on_encoder_outputs():
    usage = CodebookUsage(size=4, window=2)
    usage.update(torch.tensor([0, 1]))
    assert usage.dead().numel() == 0  # the window has not filled yet
    usage.update(torch.tensor([1, 1]))
    assert usage.dead().tolist() == [2, 3]
    book = torch.nn.Embedding(4, 3)
    opt = torch.optim.Adam(book.parameters())
    book.weight.sum().backward()
    opt.step()
    before = book.weight.detach().clone()
    z = torch.arange(2 * 3 * 2 * 2, dtype=torch.float).view(2, 3, 2, 2)  # 8 latent vectors of dimension 3
    assert restart_dead_codes(book, z, usage.dead(), torch.Generator().manual_seed(0), opt) == 2
    vectors = z.permute(0, 2, 3, 1).reshape(-1, 3)
    for row in (2, 3):  # now an encoder output of the batch, with fresh Adam moments
        assert (book.weight[row] == vectors).all(1).any() and opt.state[book.weight]["exp_avg"][row].abs().sum() == 0
    assert torch.equal(book.weight[:2], before[:2])


@pytest.mark.parametrize("preset, factor", [("tiny", 4), ("tiny_f8", 8), ("vq_tiny", 4), ("vq_tiny_f8", 8)])
def test_presets_f4_and_f8(preset, factor):
    model = build_autoencoder(preset)
    mean, std = encode_moments(model, _images(1))
    assert downsample_factor(model) == factor and mean.shape == (1, 4, 16 // factor, 16 // factor)
    assert (std == 0).all() == preset.startswith("vq_")


# --- LPIPS weights -------------------------------------------------------------------------------------

def test_missing_lpips_weights_are_named_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError) as e:
        load_lpips("vgg", "")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth") in msg
    assert "lpips_weights=PATH" in msg and "download" in msg
    with pytest.raises(FileNotFoundError, match=r"lpips_weights=.*missing\.pth: file does not exist") as e:
        load_lpips("alex", str(tmp_path / "missing.pth"))
    assert "\n" not in str(e.value)
    # Resolving the config refuses it already (login node, --dry-run), and the launcher prints the line.
    with pytest.raises(config_lib.ConfigError, match=r"^lpips_weights=.*missing\.pth: LPIPS backbone file .* "
                                                     r"does not exist$"):
        config_lib.load_config(AutoencoderJob, "configs/autoencoder/kl_gan.yaml", [
            f"run_dir={tmp_path}/run", "data.urls=/nonexistent", "data.resolution=16", "preset=tiny",
            "disc_layers=2", f"lpips_weights={tmp_path}/missing.pth"])


def test_lpips_backbone_loads_from_a_local_file(tmp_path):
    import torchvision

    features = torchvision.models.alexnet(weights=None).features
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    torch.save(state, tmp_path / "alexnet.pth")
    model = load_lpips("alex", str(tmp_path / "alexnet.pth"))
    assert not model.random_backbone and not any(p.requires_grad for p in model.parameters())
    assert torch.equal(model.net.slice1[0].weight, features[0].weight)
    assert torch.equal(getattr(model.net.slice5, "10").weight, features[10].weight)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="other.pth are not torchvision's alexnet"):
        load_lpips("alex", str(tmp_path / "other.pth"))


def test_config_mismatches_are_one_line_errors():
    for overrides, message in [
        (["objective=vq_gan", "preset=tiny"], "objective=vq_gan needs a vq_\\* preset"),
        (["objective=kl_gan", "preset=vq_tiny"], "objective=kl_gan needs an AutoencoderKL preset"),
        (["objective=kl_gan", "data.resolution=16", "disc_layers=3"], "disc_layers=3 leaves no patches"),
        (["objective=kl_plain", "precision=fp16"], "precision must be fp32 or bf16"),
    ]:
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.load_config(AutoencoderJob, None, ["data.urls=x", *overrides])
    assert patch_grid(16, 2) == 2 and patch_grid(32, 3) == 2 and patch_grid(16, 3) < 1
