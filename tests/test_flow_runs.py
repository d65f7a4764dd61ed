"""#30: SD3 and Flux.1 transformers trained with rectified flow on the same cache, launcher, checkpoints and
exports as the UNets (tiny random-weight folders, tests/flow_pipelines.py): cache -> 2-rank fine-tune (ZeRO-2;
Flux at ZeRO-3) -> export -> the diffusers pipeline draws launch/sample.py's picture; step-0 weights are the
folder's; resume is exact; LoRA loads with load_lora_weights."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import PY, QUIET, ranks_of, run_cmd

PROMPT = "a red circle at the center"
TRAIN = ("batch_per_rank=4", "lr=1e-3", "warmup_samples=0", "log_every_samples=8", "checkpoint_every_samples=16",
         "ema_halflife_samples=64", "data.num_workers=0")


def _train(run, folder, cache, ranks, *extra, check=True):
    return run_cmd([*ranks_of(ranks), "launch/train_unet.py", f"run_dir={run}", f"data.urls={cache}",
                    f"pretrained={folder}", *TRAIN, *extra], env=QUIET, check=check)


@pytest.fixture(scope="module")
def flow_runs(flow_folders, flow_caches, tmp_path_factory):
    """SD3 on 2 ranks at ZeRO-2: 32 samples whole, and stopped after 16 and resumed; Flux on 2 ranks at ZeRO-3."""
    root = tmp_path_factory.mktemp("flow_runs")
    sd3 = (flow_folders["sd3"], flow_caches["sd3", "embeddings"])
    _train(root / "sd3-whole", *sd3, 2, "total_samples=32", "zero_stage=2")
    _train(root / "sd3-split", *sd3, 2, "total_samples=32", "zero_stage=2", "stop_after_samples=16")
    _train(root / "sd3-split", *sd3, 2, "total_samples=32", "zero_stage=2")
    _train(root / "flux", flow_folders["flux"], flow_caches["flux", "embeddings"], 2, "total_samples=32",
           "zero_stage=3")
    return root


def _losses(run):
    return [(r["samples"], r["loss"]) for r in map(json.loads, open(run / "log.jsonl")) if "loss" in r]


def test_a_finetune_starts_from_the_folders_transformer(flow_folders):
    import diffusers

    from trainer.core.data import LatentData
    from trainer.core.ema import EMA
    from trainer.unet.job import UNetJob
    from trainer.unet.pretrained import build_model, resolve, training_schedule

    for family, cls, dims in (("sd3", "SD3Transformer2DModel", (16, 4, 64, 40)),
                              ("flux", "FluxTransformer2DModel", (16, 4, 64, 24))):
        cfg = resolve(UNetJob(data=LatentData(urls="/c"), pretrained=flow_folders[family]))
        model = build_model(cfg, *dims[:3], pooled_dim=dims[3])
        want = getattr(diffusers, cls).from_pretrained(flow_folders[family], subfolder="transformer").state_dict()
        got = EMA(model, 100).full_state()  # parameters and buffers (SD3's position table), as checkpoints hold them
        assert model.state_dict().keys() == want.keys() == got.keys()
        assert all(torch.equal(model.state_dict()[k], want[k]) and torch.equal(got[k], want[k]) for k in want)
        assert cfg.prediction_type == "flow"
        schedule = training_schedule(cfg).config
        assert schedule.shift == 3.0 and bool(schedule.use_dynamic_shifting) == (family == "flux")


def test_resume_is_exact(flow_runs):
    from safetensors.torch import load_file

    from trainer.core import checkpoint

    whole, split = _losses(flow_runs / "sd3-whole"), _losses(flow_runs / "sd3-split")
    assert [s for s, _ in whole] == [8, 16, 24, 32] and all(np.isfinite(v) for _, v in whole)
    assert split == whole
    a, b = (load_file(os.path.join(checkpoint.latest(str(flow_runs / r / "checkpoints")), "ema_unet",
                                   "diffusion_pytorch_model.safetensors")) for r in ("sd3-whole", "sd3-split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_exported_pipeline_draws_sample_pys_picture(flow_runs, flow_folders, family, tmp_path):
    """export.py writes a StableDiffusion3Pipeline / FluxPipeline folder; from_pretrained(OUT) with the same noise,
    steps and guidance draws launch/sample.py's images (to 8-bit rounding). SD3 guides against "", Flux-dev
    embeds the guidance scale."""
    import diffusers

    from models.flow_model import pack
    from trainer.unet.export import export_run
    from trainer.unet.sampling import generate

    run = flow_runs / ("sd3-whole" if family == "sd3" else "flux")
    out = export_run(str(run), str(tmp_path / "export"))
    cls = diffusers.StableDiffusion3Pipeline if family == "sd3" else diffusers.FluxPipeline
    parts = {"sd3": ["text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"],
             "flux": ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]}[family]
    assert sorted(os.listdir(out)) == sorted(["README.md", "ldm.json", "model_index.json", "scheduler", "transformer",
                                              "vae", *parts])
    rows = generate(str(run), [PROMPT], per_prompt=2, guidance=3.0, steps=4, seed=7)
    ours = np.stack([np.asarray(im) for im in rows[0]]).astype(np.float32)
    noise = torch.randn((2, 16, 4, 4), generator=torch.Generator().manual_seed(7))
    pipe = cls.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    length = 256 if family == "sd3" else 48  # the cache's T5 length (Flux's: text_max_tokens=48)
    images = pipe([PROMPT] * 2, latents=noise if family == "sd3" else pack(noise), num_inference_steps=4,
                  guidance_scale=3.0, height=32, width=32, output_type="np", max_sequence_length=length).images
    theirs = (images * 255).round().astype(np.float32)
    assert ours.shape == theirs.shape == (2, 32, 32, 3)
    assert np.abs(ours - theirs).max() <= 1.0
    base = cls.from_pretrained(flow_folders[family])
    for part in ("vae", "text_encoder"):
        a, b = getattr(pipe, part).state_dict(), getattr(base, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), part


def test_a_flux_lora_on_token_ids_loads_with_load_lora_weights(flow_folders, flow_caches, tmp_path):
    """LoRA on the transformer's attention projections, trained on a cache of token ids (CLIP and T5 run in the
    step): diffusers' file, loaded into FluxPipeline, gives the adapted transformer's output."""
    from diffusers import FluxPipeline

    from models.flow_model import velocity
    from trainer.unet.export import export_run
    from trainer.unet.sampling import load_run

    run = tmp_path / "lora"
    _train(run, flow_folders["flux"], flow_caches["flux", "tokens"], 1, "total_samples=8", "zero_stage=0",
           "lora_rank=4", "lr=1e-2")
    out = export_run(str(run), str(tmp_path / "export"))
    assert "pytorch_lora_weights.safetensors" in os.listdir(out)
    saved = (run / "config.yaml").read_text()  # the default targets became both streams' attention and MLPs
    assert "attn.add_q_proj" in saved and "ff_context.net.2" in saved
    trained, *_ = load_run(str(run))
    pipe = FluxPipeline.from_pretrained(flow_folders["flux"])
    x, sigmas = torch.randn(2, 16, 4, 4), torch.tensor([0.3, 0.8])
    context, pooled, guidance = torch.randn(2, 48, 64), torch.randn(2, 24), torch.full((2,), 3.5)
    with torch.no_grad():
        plain = velocity(pipe.transformer, "flux", x, sigmas, context, pooled, guidance)
        pipe.load_lora_weights(out)
        loaded = velocity(pipe.transformer, "flux", x, sigmas, context, pooled, guidance)
        want = velocity(trained, "flux", x, sigmas, context, pooled, guidance)
    assert (want - plain).abs().max() > 1e-4  # the adapters do something
    torch.testing.assert_close(loaded, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("settings, message", [
    (["min_snr_gamma=5"], "min_snr_gamma=5.0 belongs to the DDPM objective"),
    (["latent_norm=per_channel"], "decode with their VAE's shift_factor and scaling_factor"),
    (["prediction_type=epsilon"], "trained with rectified flow (prediction_type=flow or auto)"),
    (["timestep_sampler=lognormal"], "timestep_sampler must be one of logit_normal, mode, uniform"),
])
def test_what_does_not_apply_to_a_flow_transformer_is_refused(flow_folders, flow_caches, tmp_path, settings, message):
    dry = run_cmd([PY, "launch/train_unet.py", "--dry-run", f"run_dir={tmp_path / 'run'}",
                   f"data.urls={flow_caches['sd3', 'embeddings']}", f"pretrained={flow_folders['sd3']}", *settings],
                  check=False, env=QUIET, timeout=300)
    assert dry.returncode != 0 and message in dry.stderr, dry.stderr[-2000:]


def test_a_unet_job_refuses_flow_settings():
    from trainer.core.config import ConfigError
    from trainer.core.data import LatentData
    from trainer.unet.job import UNetJob

    with pytest.raises(ConfigError, match="loss_weighting=cosmap sets the rectified-flow objective"):
        UNetJob(data=LatentData(urls="/c"), run_dir="/r", model="tiny", loss_weighting="cosmap").validate()


def test_a_transformer_from_scratch_trains_validates_and_exports(flow_caches, tmp_path):
    """model=tiny_sd3 (no pretrained folder): the preset at the cache's widths, gradient checkpointing, a validation
    grid, and an export built from the cache's own VAE and text encoders that StableDiffusion3Pipeline loads."""
    from diffusers import StableDiffusion3Pipeline

    from trainer.unet.export import export_run

    run = tmp_path / "scratch"
    out = run_cmd([PY, "launch/train_unet.py", f"run_dir={run}", f"data.urls={flow_caches['sd3', 'embeddings']}",
                   "model=tiny_sd3", "total_samples=8", "zero_stage=0", "gradient_checkpointing=true",
                   "validate_every_samples=8", f"validation_prompts=[{PROMPT}]", "validation_steps=2", *TRAIN],
                  env=QUIET)
    assert "validation grid at step 2" in out.stdout and (run / "samples" / "step_000000002.png").exists()
    assert all(np.isfinite(v) for _, v in _losses(run))
    pipe = StableDiffusion3Pipeline.from_pretrained(export_run(str(run), str(tmp_path / "export")))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPT, num_inference_steps=2, height=32, width=32, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    more = run_cmd([PY, "launch/train_unet.py", f"run_dir={tmp_path / 'more'}", f"init_from={run}", "model=tiny_sd3",
                    f"data.urls={flow_caches['sd3', 'embeddings']}", "total_samples=4", "zero_stage=0", *TRAIN],
                   env=QUIET)  # a new run from this one's transformer (its EMA), as for a UNet
    assert "init_from: the EMA weights of" in more.stdout


def test_flux_trains_on_aspect_ratio_buckets_and_samples_a_bucket_shape(flow_folders, tmp_path):
    """Flux's 2x2 packing and its (row, column) position ids on non-square latents: a bucketed cache (multiples
    of 16 px, so every latent side is even) trains, and sample.py draws a 48x32 picture that FluxPipeline draws
    the same from the same noise."""
    import io

    from diffusers import FluxPipeline
    from PIL import Image

    from data_pipeline.shards import write_shards
    from models.flow_model import pack
    from trainer.unet.export import export_run
    from trainer.unet.sampling import generate

    def samples():
        for i, size in enumerate([(64, 32), (32, 64), (48, 32), (32, 48)] * 2):
            b = io.BytesIO()
            Image.new("RGB", size, (200, 40 * i % 255, 30)).save(b, "PNG")
            yield {"__key__": f"{i:08d}", "png": b.getvalue(), "txt": b"a red picture"}
    write_shards(samples(), str(tmp_path / "shards"), 8, prefix="img")
    cache, run = tmp_path / "cache", tmp_path / "run"
    run_cmd([PY, "launch/cache_latents.py", f"pretrained={flow_folders['flux']}", f"data.urls={tmp_path / 'shards'}",
             f"out_url={cache}", "data.resolution=48", "data.buckets=true", "data.bucket_step=16", "batch_size=4",
             "text_max_tokens=16"], env=QUIET)
    _train(run, flow_folders["flux"], cache, 1, "total_samples=8", "zero_stage=0", "batch_per_rank=2")
    assert all(np.isfinite(v) for _, v in _losses(run))
    rows = generate(str(run), ["a red picture"], per_prompt=1, guidance=3.5, steps=3, seed=5, size="48x32")
    ours = np.asarray(rows[0][0]).astype(np.float32)
    assert ours.shape == (32, 48, 3)
    pipe = FluxPipeline.from_pretrained(export_run(str(run), str(tmp_path / "export")))
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 16, 4, 6), generator=torch.Generator().manual_seed(5))
    image = pipe("a red picture", latents=pack(noise), num_inference_steps=3, guidance_scale=3.5, height=32, width=48,
                 output_type="np", max_sequence_length=16).images[0]
    assert np.abs(ours - (image * 255).round()).max() <= 1.0
