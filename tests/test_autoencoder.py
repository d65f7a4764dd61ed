"""The first-stage objectives: where each loss term's gradient goes, the adaptive GAN weight,
the VQ straight-through estimator, LPIPS weights, and short kl_gan / vq_gan runs through the
launch script that resume exactly, export, and load in the cache job."""
import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import PY, ROOT
from models.autoencoder import build_autoencoder, downsample_factor, encode_moments, load_autoencoder
from models.discriminator import build_discriminator, patch_grid
from models.perceptual import load_lpips
from trainer.core import checkpoint
from trainer.core import config as config_lib
from trainer.autoencoder.losses import (CodebookUsage, FirstStageLoss, adaptive_weight, codebook_losses, hinge_d_loss,
                                        hinge_g_loss, restart_dead_codes, vq_forward)
from trainer.autoencoder.job import AutoencoderJob
from trainer.autoencoder.train import train_autoencoder


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


# --- short runs through the launcher: resume, export, cache ----------------------------------------------

TINY_RUN = ["data.resolution=16", "data.num_workers=0", "batch_per_rank=4", "total_samples=16", "warmup_samples=4",
            "log_every_samples=4", "checkpoint_every_samples=8", "scaling_samples=8", "disc_start_samples=4",
            "disc_layers=2", "disc_channels=8", "lpips_weights=random", "wandb=disabled"]
RUNS = {"kl_gan": ["preset=tiny"],
        "vq_gan": ["preset=vq_tiny", "codebook_size=0", "ema_decay=0.5", "codebook_window_batches=1",
                   "codebook_restart_batches=1"]}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the reference run in this process uses one thread too: same arithmetic


def _overrides(kind: str, run_dir, shards) -> list[str]:
    return [f"run_dir={run_dir}", f"data.urls={shards}", *TINY_RUN, *RUNS[kind]]


def _launch(kind: str, run_dir, shards) -> subprocess.Popen:
    return _start(["launch/train_autoencoder.py", "--config", f"configs/autoencoder/{kind}.yaml",
                   *_overrides(kind, run_dir, shards), "stop_after_samples=8"])


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **ONE_THREAD}
    return subprocess.Popen([PY, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{proc.args} failed:\n{out[-3000:]}\n{err[-3000:]}"
    return out


def _in_process(kind: str, run_dir, shards, *extra: str) -> str:
    """The same job in this process, on one thread like the subprocesses (same arithmetic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_autoencoder(config_lib.load_config(AutoencoderJob, f"configs/autoencoder/{kind}.yaml",
                                                        [*_overrides(kind, run_dir, shards), *extra]))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tiny_shards, tmp_path_factory):
    """Per objective: a run interrupted by stop_after_samples and continued by the launcher in a
    new process (both objectives at once), and an uninterrupted reference run."""
    root = tmp_path_factory.mktemp("ae")
    stopped = {k: _in_process(k, root / f"{k}_resumed", tiny_shards, "stop_after_samples=8") for k in RUNS}
    resumed = {k: _launch(k, root / f"{k}_resumed", tiny_shards) for k in RUNS}
    for kind in RUNS:
        _in_process(kind, root / f"{kind}_ref", tiny_shards)
    return root, stopped, {k: _finish(p) for k, p in resumed.items()}


def _losses(path) -> list[dict]:
    rows = [json.loads(ln) for ln in open(path) if ln.strip()]
    return [{k: v for k, v in r.items() if k not in ("images_per_s",)} for r in rows if "loss" in r]


@pytest.mark.parametrize("kind", list(RUNS))
def test_resumed_run_equals_the_uninterrupted_one(runs, kind):
    root, stopped, outs = runs
    assert stopped[kind].endswith("samples_000000000008")  # the checkpoint it stopped at, not an export
    assert "resuming from" in outs[kind] and "autoencoder exported to" in outs[kind]
    assert "LPIPS backbone is random: values are not perceptual" in outs[kind]
    ref, resumed = _losses(root / f"{kind}_ref" / "log.jsonl"), _losses(root / f"{kind}_resumed" / "log.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] and resumed[0]["disc_active"] is False
    assert resumed[-1]["disc_active"] is True and "d_loss" in resumed[-1] and "g_loss" in resumed[-1]
    for a, b in zip(ref, resumed):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["step"], k)
    cfg_ref = json.load(open(root / f"{kind}_ref" / "export" / "config.json"))
    cfg_res = json.load(open(root / f"{kind}_resumed" / "export" / "config.json"))
    assert cfg_res["scaling_factor"] == pytest.approx(cfg_ref["scaling_factor"], rel=1e-5)
    assert cfg_res["_class_name"] == {"kl_gan": "AutoencoderKL", "vq_gan": "VQModel"}[kind]
    if kind == "vq_gan":
        assert "perplexity" in resumed[-1] and 0 <= resumed[-1]["dead_codes"] < 64
        assert resumed[-1]["codes_restarted"] > resumed[1]["codes_restarted"] > 0  # before and after the resume


def test_export_is_the_autoencoder_alone_with_ema_weights(runs):
    root, *_ = runs
    run = root / "vq_gan_resumed"
    exported = load_file(run / "export" / "diffusion_pytorch_model.safetensors")
    ckpt = sorted(os.listdir(run / "checkpoints"))[-1]
    ema, raw = (load_file(run / "checkpoints" / ckpt / f) for f in ("ema.safetensors", "model.safetensors"))
    assert exported.keys() == raw.keys()  # no discriminator, no LPIPS
    assert all(torch.equal(exported[k], ema[k]) for k in exported)
    assert any(not torch.equal(exported[k], raw[k]) for k in exported)
    assert os.path.exists(run / "checkpoints" / ckpt / "discriminator.safetensors")


def test_exports_load_as_the_caches_frozen_vae(runs, tiny_shards):
    from trainer.cache.job import CacheJob, cache_latents
    from trainer.core.data import ImageData

    root, *_ = runs
    vq = _start(["launch/cache_latents.py", f"data.urls={tiny_shards}", "data.resolution=16",
                 f"out_url={root}/vq_latents", f"vae={root}/vq_gan_resumed/export", "batch_size=32"])
    cache_latents(CacheJob(data=ImageData(urls=tiny_shards, resolution=16, num_workers=0),
                           out_url=str(root / "kl_latents"), vae=str(root / "kl_gan_resumed" / "export"), batch_size=32))
    _finish(vq)
    for kind, latents in (("kl_gan", "kl_latents"), ("vq_gan", "vq_latents")):
        manifest = json.load(open(root / latents / "manifest.json"))
        export = root / f"{kind}_resumed" / "export"
        assert manifest["num_samples"] == 96 and manifest["latent_shape"] == [4, 4, 4]
        assert manifest["vae"]["scaling_factor"] == json.load(open(export / "config.json"))["scaling_factor"]
        stds = manifest["latent_channel_stats"]["std"]
        assert len(stds) == 4 and all(s > 0 for s in stds)
    vae = load_autoencoder(str(root / "vq_gan_resumed" / "export"))
    x = _images(2)
    mean, std = encode_moments(vae, x)
    assert type(vae).__name__ == "VQModel" and torch.equal(std, torch.zeros_like(mean))
    assert vae.decode(mean).sample.shape == x.shape  # sampling decodes (and quantises) the cached latent


LAUNCHERS = {"torchrun": ["torchrun", "--standalone", "--nproc_per_node", "2"],
             "accelerate": ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                            "--mixed_precision", "no", "--dynamo_backend", "no"]}


def _torchrun(run_dir, shards, *extra: str, launcher: str = "torchrun") -> str:
    """vq_gan on 2 ranks: codebook counts summed over ranks, restarts broadcast."""
    cmd = LAUNCHERS[launcher]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **ONE_THREAD}
    proc = subprocess.run([os.path.join(os.path.dirname(PY), cmd[0]), *cmd[1:], "launch/train_autoencoder.py", "--config", "configs/autoencoder/vq_gan.yaml",
                           *_overrides("vq_gan", run_dir, shards), "total_samples=32", "checkpoint_every_samples=16",
                           *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_two_ranks_average_gradients_and_resume_exactly(tiny_shards, tmp_path):
    """2 ranks x 4 images: 4 steps of 8. Run once straight (accelerate launch), once as 2 + 2
    steps with a restart (torchrun); the logs, the weights and the export agree, and each
    checkpoint's replica check passed (without the gradient all-reduce it fails at step 2)."""
    straight = _torchrun(tmp_path / "straight", tiny_shards, launcher="accelerate")  # the same ranks as torchrun's
    assert "autoencoder exported to" in straight
    first = _torchrun(tmp_path / "resumed", tiny_shards, "stop_after_samples=16")
    assert "stopped after stop_after_samples=16 at step 2 of 4" in first
    assert os.path.getsize(tmp_path / "resumed" / "loss.png") > 1000  # drawn while the run goes, not only at its end
    second = _torchrun(tmp_path / "resumed", tiny_shards)
    assert second.count("resuming from") == 1 and "(step 2)" in second  # printed by rank 0 only
    a, b = _losses(tmp_path / "straight" / "log.jsonl"), _losses(tmp_path / "resumed" / "log.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4] and [r["samples"] for r in b] == [8, 16, 24, 32]
    assert all(r["grad_norm"] > 0 for r in a + b)  # logged beside the loss (and equal after the resume, below)
    for ra, rb in zip(a, b):
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), (ra["step"], k)
    wa = load_file(str(tmp_path / "straight" / "export" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(tmp_path / "resumed" / "export" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    state = torch.load(os.path.join(checkpoint.latest(str(tmp_path / "resumed")), "optimizer.pt"), weights_only=True)
    assert state["world_size"] == 2 and len(state["loaders"]) == 2
