"""Model construction and loading: presets, saved folders, and the errors for missing weights."""
import os

import pytest
import torch

from models.autoencoder import autoencoder_identity, build_autoencoder, load_autoencoder
from models.diffusion import noise_schedule, sample_latents, training_loss
from models.text_encoder import load_text_encoder, save_tiny
from models.unet import build_unet


def test_autoencoder_roundtrips_through_a_diffusers_folder(tmp_path):
    vae = build_autoencoder("tiny")
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_autoencoder(str(tmp_path / "vae"))
    assert loaded.config.scaling_factor == 0.5
    assert autoencoder_identity(loaded) == autoencoder_identity(vae)
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean)


def test_autoencoder_identity_changes_with_weights():
    a, b = build_autoencoder("tiny", seed=0), build_autoencoder("tiny", seed=1)
    assert autoencoder_identity(a) != autoencoder_identity(b)


def test_missing_autoencoder_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_autoencoder(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_autoencoder(str(tmp_path / "empty"))
    vae = build_autoencoder("tiny")
    vae.save_pretrained(tmp_path / "noweights")
    os.remove(tmp_path / "noweights" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match="noweights"):
        load_autoencoder(str(tmp_path / "noweights"))
    with pytest.raises(ValueError, match="unknown autoencoder preset 'huge'"):
        load_autoencoder("preset:huge")


def test_text_encoder_loads_saved_weights_and_uses_openclip_tokens(tmp_path):
    save_tiny(str(tmp_path / "te.safetensors"), seed=3)
    a = load_text_encoder(f"tiny:{tmp_path / 'te.safetensors'}")
    b = load_text_encoder("tiny")
    tokens = a.tokenize(["a red circle"])
    assert tokens.shape == (1, 32) and tokens[0, 0] == 49406  # OpenCLIP's start-of-text token
    assert a.identity() != b.identity()
    emb = a.encode(["a red circle", "a blue square"])
    assert emb.shape == (2, 32, 64) and torch.isfinite(emb).all()
    assert not torch.allclose(emb[0], emb[1])
    penultimate = load_text_encoder(f"tiny:{tmp_path / 'te.safetensors'}", layer="penultimate")
    assert not torch.allclose(penultimate.encode(["a red circle"]), emb[:1])
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_text_encoder(f"tiny:{tmp_path / 'missing.safetensors'}")
    with pytest.raises(ValueError, match="unknown text encoder 'NoSuchModel'"):
        load_text_encoder("NoSuchModel")
    with pytest.raises(FileNotFoundError, match="/no/such/open_clip.bin"):
        load_text_encoder("ViT-B-32:/no/such/open_clip.bin")


def test_unet_presets_check_the_context_width():
    unet = build_unet("tiny", latent_channels=4, latent_size=4, context_dim=64)
    assert unet.config.cross_attention_dim == 64 and unet.config.sample_size == 4
    with pytest.raises(ValueError, match="expects 768-d text embeddings"):
        build_unet("sd15", 4, 64, context_dim=1024)
    with pytest.raises(ValueError, match="unknown UNet preset"):
        build_unet("nope", 4, 8, 64)


def test_training_loss_targets_and_guided_sampling_shapes():
    unet = build_unet("tiny", 4, 4, 64)
    z0, ctx = torch.randn(3, 4, 4, 4), torch.randn(3, 32, 64)
    for kind in ("epsilon", "v_prediction"):
        loss = training_loss(unet, z0, ctx, noise_schedule(kind), torch.Generator().manual_seed(0))
        assert loss.ndim == 0 and loss.item() > 0
        loss.backward()
    z = sample_latents(unet, ctx[:2], ctx[2:], dict(noise_schedule().config), steps=3, guidance=3.0,
                       generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 4, 4) and torch.isfinite(z).all()
