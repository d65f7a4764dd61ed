"""#30: the latent cache of SD3 and Flux pipelines (tiny random-weight folders, tests/flow_pipelines.py): 16-channel
latents with the VAE's shift and scale, CLIP's pooled (and SD3's per-token) states, and T5's states stored at each
caption's own length in bf16, which the loader pads back with zeros: the round trip is exact."""
import glob
import json
import tarfile

import pytest
import torch
from safetensors.torch import load

from conftest import PY, QUIET, run_cmd

CAPTIONS = ["a red circle at the center", "a blue square at the top left on a black background", ""]


def _samples(cache):
    for path in sorted(glob.glob(f"{cache}/*.tar")):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".safetensors")):
            key = name[:-len(".safetensors")]
            yield {"__key__": key, "__url__": path,
                   **{ext: members[f"{key}.{ext}"] for ext in ("safetensors", "txt", "json", "sha256")}}


def test_the_manifest_records_the_vae_shift_and_the_variable_length_t5_store(flow_caches):
    from trainer.cache.manifest import Manifest

    sd3, flux = (Manifest.read(flow_caches[f, "embeddings"]) for f in ("sd3", "flux"))
    assert sd3.latent_shape == (16, 4, 4) and sd3.vae.shift_factor == pytest.approx(0.0609)
    assert flux.vae.shift_factor == pytest.approx(0.1159) and flux.vae.scaling_factor == pytest.approx(0.3611)
    shift, scale = flux.latent_affine("scaling_factor")
    assert float(shift.flatten()[0]) == pytest.approx(0.1159) and float(scale.flatten()[0]) == pytest.approx(0.3611)
    assert (sd3.text_emb_shape, flux.text_emb_shape) == ((256, 64), (48, 64))  # SD3's default; text_max_tokens
    assert flux.text_encoder.max_tokens == 48 and flux.text_encoder.load().context_length == 48
    assert sd3.text_lengths == flux.text_lengths == "variable" and sd3.text_emb_dtype == "bfloat16"
    assert (sd3.flow, flux.flow, Manifest.read(flow_caches["flux", "tokens"]).flow) == ("sd3", "flux", "flux")
    assert sd3.clip_emb_shape == (77, 16 + 32) and flux.clip_emb_shape == ()
    assert (sd3.pooled_dim, flux.pooled_dim) == (16 + 24, 24)
    raw = json.loads(open(f"{flow_caches['flux', 'tokens']}/manifest.json").read())
    assert raw["text"] == "tokens" and "text_lengths" not in raw


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_variable_length_t5_store_round_trips_exactly(flow_folders, flow_caches, family):
    """What the loader hands the trainer is the encoder's output: T5's states of the caption's own tokens (in bf16),
    then zeros to the cache's length; CLIP's pooled (and SD3's per-token) states as the cache job computed them."""
    from data_pipeline.latents import CachedSampleDecoder
    from models.text_encoder import load_text_encoder
    from trainer.cache.manifest import Manifest

    cache = flow_caches[family, "embeddings"]
    m = Manifest.read(cache)
    decode = CachedSampleDecoder(False, 8, False, expect={
        "latent_shape": m.latent_shape, "text": m.text, "text_emb_shape": m.text_emb_shape, "pooled_dim": m.pooled_dim,
        "text_lengths": m.text_lengths, "clip_emb_shape": m.clip_emb_shape})
    encoder = m.text_encoder.load()  # at the cache's T5 length
    for sample in list(_samples(cache))[:4]:
        stored = load(sample["safetensors"])
        got = decode(sample)
        with torch.no_grad():
            want = encoder.embed([sample["txt"].decode()])
        n = int(want["text_len"][0])
        assert stored["text_emb"].shape == (n, 64) and stored["text_emb"].dtype == torch.bfloat16
        assert got["text_emb"].shape == (m.text_emb_shape[0], 64)
        assert torch.equal(got["text_emb"][:n], want["text_emb"][0, :n].to(torch.bfloat16))
        assert not got["text_emb"][n:].any()
        assert torch.equal(got["pooled"], want["pooled"][0].half())
        if family == "sd3":
            assert torch.equal(got["clip_emb"], want["clip_emb"][0].half())


def test_the_encoders_read_captions_as_the_pipelines_do(flow_folders):
    """The states of a caption's own tokens are the pipeline's encode_prompt output (SD3: after its CLIP states,
    zero-padded to T5's width), and the token-id path gives the same as the caption path."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from models.text_encoder import load_text_encoder

    for family, cls in (("sd3", StableDiffusion3Pipeline), ("flux", FluxPipeline)):
        encoder, pipe = load_text_encoder(flow_folders[family]), cls.from_pretrained(flow_folders[family])
        with torch.no_grad():
            ours = encoder.embed(CAPTIONS)
            again = encoder.embed_tokens(encoder.tokenize(CAPTIONS))
            if family == "sd3":
                theirs, _, pooled, _ = pipe.encode_prompt(CAPTIONS, CAPTIONS, CAPTIONS, device="cpu",
                                                          do_classifier_free_guidance=False)
                clip = torch.nn.functional.pad(ours["clip_emb"], (0, 64 - 48))
                torch.testing.assert_close(theirs, torch.cat([clip, ours["text_emb"]], dim=1), atol=1e-5, rtol=1e-5)
            else:
                theirs, pooled, _ = pipe.encode_prompt(CAPTIONS, CAPTIONS, device="cpu")
                torch.testing.assert_close(theirs, ours["text_emb"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled, ours["pooled"], atol=1e-5, rtol=1e-5)
        assert encoder.tokenize(CAPTIONS).shape[1] == 77 * (2 if family == "sd3" else 1) + encoder.context_length
        for key in ours:
            assert torch.equal(ours[key], again[key]), key
        assert ours["text_len"].tolist()[-1] == 1  # "" is </s> alone


def test_alternative_captions_are_zeroed_past_their_own_length():
    from data_pipeline.latents import pad_text, trim_text

    emb = torch.randn(3, 10, 4)
    out = trim_text({"text_emb": emb[0], "text_len": torch.tensor(4), "text_emb_alt": emb[1:],
                     "text_len_alt": torch.tensor([2, 6])})
    assert out.keys() == {"text_emb", "text_emb_alt"} and out["text_emb"].shape == (4, 4)
    alt = pad_text(out["text_emb_alt"], 10)
    assert alt.shape == (2, 10, 4) and not alt[0, 2:].any() and not alt[1, 6:].any()
    assert torch.equal(alt[1, :6], emb[2, :6].to(torch.bfloat16))


def test_a_unet_job_refuses_a_flow_cache_and_a_transformer_another_familys(flow_caches, tmp_path):
    for cache, model, says in ((flow_caches["flux", "tokens"], "tiny", "is a cache of an SD3 or Flux pipeline's text"),
                               (flow_caches["flux", "embeddings"], "tiny_sd3", "was not made with an sd3 pipeline's")):
        dry = run_cmd([PY, "launch/train_unet.py", "--dry-run", f"run_dir={tmp_path / 'run'}", f"data.urls={cache}",
                       f"model={model}"], check=False, env=QUIET, timeout=300)
        assert dry.returncode != 0 and says in dry.stderr, dry.stderr[-1500:]
