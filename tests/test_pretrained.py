"""Starting from Stable Diffusion pipeline folders and handing back to them (#15), on tiny random-weight
folders of the SD 1.x and SD 2.x architectures (tests/sd_pipelines.py): cache -> fine-tune on 2 ranks
(ZeRO-2) -> export -> StableDiffusionPipeline; LoRA; single-file; the decoder-only VAE fine-tune."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import PY, ranks_of, run_cmd
from sd_pipelines import build_pipeline
from trainer.core import checkpoint

PROMPT = "a red circle at the center on a white background"
TRAIN = ("batch_per_rank=8", "warmup_samples=16", "log_every_samples=16", "checkpoint_every_samples=32",
         "ema_halflife_samples=100", "ema_rampup_ratio=0")


def _quiet(env=None):
    return {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", **(env or {})}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {family: build_pipeline(family, str(root / family)) for family in ("sd15", "sd21")}


@pytest.fixture(scope="module")
def shards32(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards32")
    run_cmd([PY, "launch/make_synthetic.py", "--out", str(out), "--num", "64", "--per-shard", "16",
             "--resolution", "32"])
    return str(out)


def _cache(shards, out, *args):
    run_cmd([PY, "launch/cache_latents.py", f"data.urls={shards}", "data.resolution=32", f"out_url={out}",
             "batch_size=16", *args], env=_quiet())
    return str(out)


@pytest.fixture(scope="module")
def caches(folders, shards32, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    return {family: _cache(shards32, root / family, f"pretrained={folder}") for family, folder in folders.items()}


@pytest.fixture(scope="module")
def finetune(folders, caches, tmp_path_factory):
    """SD 1.x fine-tuned on 2 ranks at ZeRO-2."""
    run = tmp_path_factory.mktemp("ft15") / "run"
    run_cmd([*ranks_of(2), "launch/train_unet.py",
             f"run_dir={run}", f"data.urls={caches['sd15']}", f"pretrained={folders['sd15']}", "total_samples=32",
             "zero_stage=2", "lr=1e-3", *TRAIN], env=_quiet())
    return run


def _lora_args(run, folders, caches, *extra):
    return [*ranks_of(2), "launch/train_unet.py", f"run_dir={run}",
            f"data.urls={caches['sd15']}", f"pretrained={folders['sd15']}", "total_samples=64", "zero_stage=2",
            "lr=1e-2", "lora_rank=4", *TRAIN, *extra]


@pytest.fixture(scope="module")
def lora_runs(folders, caches, tmp_path_factory):
    """A LoRA run stopped after 32 samples and resumed, and the same run uninterrupted."""
    root = tmp_path_factory.mktemp("lora")
    run_cmd(_lora_args(root / "split", folders, caches, "stop_after_samples=32"), env=_quiet())
    resumed = run_cmd(_lora_args(root / "split", folders, caches), env=_quiet())
    run_cmd(_lora_args(root / "whole", folders, caches), env=_quiet())
    return root / "split", root / "whole", resumed


def _export(run, out, **kwargs):
    """launch/export.py's function, in this process (each export command would spend 8 s importing)."""
    from trainer.unet.export import export_run

    return export_run(str(run), str(out), **kwargs)


def _same_pictures(run, export, guidance=3.0, steps=4, seed=7):
    """launch/sample.py's images and the exported pipeline's, for the same prompt, seed (hence
    initial latents: sample_rows draws row i's noise from seed + i), scheduler and guidance."""
    from diffusers import StableDiffusionPipeline

    from trainer.cache.manifest import Manifest
    from trainer.core.config import load_config
    from trainer.unet.job import UNetJob
    from trainer.unet.sampling import generate

    rows = generate(str(run), [PROMPT], per_prompt=2, guidance=guidance, steps=steps, seed=seed)
    ours = np.stack([np.asarray(im) for im in rows[0]]).astype(np.float32)
    cfg = load_config(UNetJob, os.path.join(run, "config.yaml"))
    manifest = Manifest.read(cfg.data.urls)
    c, h, w = manifest.latent_shape
    noise = torch.randn((2, c, h, w), generator=torch.Generator().manual_seed(seed))
    pipe = StableDiffusionPipeline.from_pretrained(export)
    pipe.set_progress_bar_config(disable=True)
    f = manifest.vae.downsample_factor
    images = pipe([PROMPT] * 2, latents=noise, num_inference_steps=steps, guidance_scale=guidance, height=h * f,
                  width=w * f, output_type="np").images
    return ours, (images * 255).round().astype(np.float32)


# --- the cache ------------------------------------------------------------------------------------------
def test_cache_takes_the_vae_and_text_encoder_from_the_pipeline_folder(folders, caches):
    from diffusers import StableDiffusionPipeline

    from data_pipeline.latents import decode_sample, read_cached_shard
    from trainer.cache.manifest import Manifest

    for family, folder in folders.items():
        manifest = Manifest.read(caches[family])
        assert manifest.vae.source == os.path.join(folder, "vae") and manifest.text_encoder.spec == folder
        assert manifest.vae.scaling_factor == 0.18215 and manifest.text_emb_shape == (77, 32)
        assert manifest.latent_shape == (4, 4, 4)
    # The cached embeddings are what the pipeline's own encode_prompt gives (fp16 storage).
    pipe = StableDiffusionPipeline.from_pretrained(folders["sd21"])
    manifest = Manifest.read(caches["sd21"])
    raw = next(iter(read_cached_shard(manifest.shard_urls(caches["sd21"])[0])))
    want, _ = pipe.encode_prompt(raw["txt"].decode(), "cpu", 1, False)
    torch.testing.assert_close(decode_sample(raw)["text_emb"].float(), want[0].half().float())


def test_bad_pipeline_folders_are_one_line_errors(folders, shards32, tmp_path):
    from trainer.cache.job import CacheJob
    from trainer.core.config import ConfigError, load_config
    from trainer.unet.job import UNetJob

    (tmp_path / "nofolder").mkdir()
    broken = tmp_path / "broken"
    os.makedirs(broken / "vae")
    (broken / "model_index.json").write_text("{}")
    cases = [
        (CacheJob, [f"pretrained={tmp_path / 'missing'}"], "no such folder"),
        (CacheJob, [f"pretrained={tmp_path / 'nofolder'}"], "has no model_index.json"),
        (CacheJob, [f"pretrained={broken}"], "the pipeline folder has no vae/config.json"),
        (CacheJob, [f"text_encoder={broken}", "vae=preset:tiny"], "has no text_encoder/config.json"),
        (UNetJob, [f"pretrained={folders['sd15']}", "model=sd15"], "both name the UNet"),
        (UNetJob, ["lora_rank=4"], "lora_rank > 0 needs pretrained="),
        (UNetJob, [f"pretrained={folders['sd15']}", "lora_rank=4", "zero_stage=3"], "zero_stage 0-2"),
        (UNetJob, [f"pretrained={folders['sd15']}", "prediction_type=x"], "prediction_type must be one of"),
        (UNetJob, [f"pretrained={folders['sd15']}", "lora_rank=4", "elastic_resume=true"], "elastic_resume with lora"),
        (UNetJob, [f"pretrained={broken}"], "the pipeline folder has no unet/config.json"),
    ]
    for job, args, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
            load_config(job, None, [f"data.urls={shards32}", f"out_url={tmp_path / 'out'}" if job is CacheJob
                                    else "run_dir=x", *args])
        assert "\n" not in str(e.value)
    # Through the command line: one line, no traceback, before anything is loaded.
    proc = run_cmd([PY, "launch/train_unet.py", "--dry-run", "data.urls=/nowhere", f"pretrained={broken}"], check=False)
    assert proc.returncode != 0 and "has no unet/config.json" in proc.stderr and "Traceback" not in proc.stderr


def test_a_cache_made_with_another_pipelines_encoders_is_refused(folders, caches, shards32, tmp_path):
    proc = run_cmd([PY, "launch/train_unet.py", f"run_dir={tmp_path / 'run'}", f"data.urls={caches['sd15']}",
                    f"pretrained={folders['sd21']}", "total_samples=8", "batch_per_rank=8"], check=False, env=_quiet())
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"was made with the VAE {folders['sd15']}/vae, not pretrained={folders['sd21']}'s vae/" in proc.stderr
    # The right VAE and another text encoder: refused for the text encoder (the job's check, in this process).
    from trainer.cache.manifest import Manifest
    from trainer.unet.job import UNetJob
    from trainer.unet.pretrained import cache_mismatch

    mixed = _cache(shards32, tmp_path / "mixed", f"vae={folders['sd15']}/vae", f"text_encoder={folders['sd21']}")
    message = cache_mismatch(UNetJob(pretrained=folders["sd15"]), Manifest.read(mixed), mixed)
    assert f"was made with the text encoder {folders['sd21']}" in message
    assert cache_mismatch(UNetJob(pretrained=folders["sd15"]), Manifest.read(caches["sd15"]), caches["sd15"]) is None


# --- fine-tuning ----------------------------------------------------------------------------------------
def test_a_finetune_starts_from_the_folders_weights(folders, caches):
    from diffusers import UNet2DConditionModel

    from trainer.core.ema import EMA
    from trainer.unet.job import UNetJob
    from trainer.unet.pretrained import build_model, resolve, training_schedule

    for family in ("sd15", "sd21"):
        cfg = resolve(UNetJob(data=UNetJob().data, pretrained=folders[family]))
        unet = build_model(cfg, 4, 4, 32)
        want = UNet2DConditionModel.from_pretrained(folders[family], subfolder="unet").state_dict()
        got = EMA(unet, 100).full_state()
        assert unet.state_dict().keys() == want.keys() and got.keys() == want.keys()
        assert all(torch.equal(unet.state_dict()[k], want[k]) and torch.equal(got[k], want[k]) for k in want)
        assert cfg.prediction_type == ("v_prediction" if family == "sd21" else "epsilon")
        assert training_schedule(cfg).config.beta_schedule == "scaled_linear"


def test_finetune_on_two_ranks_exports_a_pipeline_that_generates_the_same_pictures(finetune, folders, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    rows = [json.loads(line) for line in open(finetune / "log.jsonl") if '"loss"' in line]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    result = run_cmd([PY, "launch/export.py", "--run", str(finetune), "--out", str(tmp_path / "export")], env=_quiet())
    out = str(tmp_path / "export")
    assert f"exported: {out}" in result.stdout
    assert sorted(os.listdir(out)) == ["README.md", "ldm.json", "model_index.json", "scheduler", "text_encoder",
                                       "tokenizer", "unet", "vae"]
    # The EMA weights, as the checkpoint holds them; the frozen parts as the folder has them.
    ema = load_file(os.path.join(checkpoint.latest(str(finetune)), "ema_unet", "diffusion_pytorch_model.safetensors"))
    exported = UNet2DConditionModel.from_pretrained(out, subfolder="unet").state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    base = StableDiffusionPipeline.from_pretrained(folders["sd15"])
    for part in ("vae", "text_encoder"):
        a, b = getattr(pipe, part).state_dict(), getattr(base, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)
    ours, theirs = _same_pictures(finetune, out)
    assert ours.shape == theirs.shape == (2, 32, 32, 3)
    assert np.abs(ours - theirs).max() <= 1.0  # 8-bit rounding of the same float image


def test_single_file_export_round_trips_through_from_single_file(finetune, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = _export(finetune, tmp_path / "export")
    single = _export(finetune, tmp_path / "single", fmt="single_file")
    keys = load_file(os.path.join(single, "model.safetensors")).keys()
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys and "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    want = StableDiffusionPipeline.from_pretrained(folder)
    got = StableDiffusionPipeline.from_single_file(os.path.join(single, "model.safetensors"), config=folder,
                                                   safety_checker=None)
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(want, part).state_dict(), getattr(got, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_sd2_v_prediction_with_per_channel_latents_exports_the_same_pictures(folders, caches, tmp_path):
    """An SD 2.x folder (v-prediction, linear projections) fine-tuned on per-channel normalised latents:
    the statistics are folded into the exported VAE, and the pipeline decodes what sample.py decodes."""
    run = tmp_path / "run"
    run_cmd([PY, "launch/train_unet.py", f"run_dir={run}", f"data.urls={caches['sd21']}",
             f"pretrained={folders['sd21']}", "total_samples=16", "latent_norm=per_channel", "lr=1e-3", *TRAIN],
            env=_quiet())
    assert "prediction_type: v_prediction" in (run / "config.yaml").read_text()  # auto, saved resolved
    out = _export(run, tmp_path / "export")
    info = json.load(open(os.path.join(out, "ldm.json")))
    assert info["latent_norm"]["folded_into_vae"] and info["prediction_type"] == "v_prediction"
    assert json.load(open(os.path.join(out, "vae", "config.json")))["scaling_factor"] == 1.0
    ours, theirs = _same_pictures(run, out)
    assert np.abs(ours - theirs).max() <= 2.0 and np.abs(ours - theirs).mean() < 0.1
    # The SD 2.x architecture in one file too.
    single = _export(run, tmp_path / "single", fmt="single_file")
    from diffusers import StableDiffusionPipeline

    got = StableDiffusionPipeline.from_single_file(os.path.join(single, "model.safetensors"), config=out,
                                                   safety_checker=None)
    want = StableDiffusionPipeline.from_pretrained(out)
    assert all(torch.equal(v, got.unet.state_dict()[k]) for k, v in want.unet.state_dict().items())


# --- LoRA ----------------------------------------------------------------------------------------------
def test_lora_resumes_exactly_and_checkpoints_hold_only_the_adapter(lora_runs):
    split, whole, resumed = lora_runs
    assert "resuming from" in resumed.stdout
    losses = [[json.loads(line)["loss"] for line in open(run / "log.jsonl") if '"loss"' in line] for run in lora_runs[:2]]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    last = [checkpoint.latest(str(run)) for run in (split, whole)]
    for folder in ("unet", "ema_unet"):
        a, b = (load_file(os.path.join(c, folder, "diffusion_pytorch_model.safetensors")) for c in last)
        assert a.keys() == b.keys() and all(".lora_" in k for k in a) and len(a) == 64
        assert all(torch.equal(a[k], b[k]) for k in a)
    model_states = os.path.getsize(os.path.join(last[0], "mp_rank_00_model_states.pt"))
    assert model_states < 300_000  # the adapters alone: the UNet itself is 8 MB


@pytest.mark.parametrize("stage", [0, 2])
def test_lora_trains_only_the_adapter(stage, folders, caches, process_group):
    """Under DeepSpeed the frozen base stays bit for bit the folder's while the adapters move."""
    from diffusers import UNet2DConditionModel

    from data_pipeline.latents import decode_sample, read_cached_shard
    from trainer.cache.manifest import Manifest
    from trainer.core import dist
    from trainer.unet.job import UNetJob
    from trainer.unet.step import build_unet_engine, step_setup, train_step, unet_ds_config

    cfg = UNetJob(pretrained=folders["sd15"], lora_rank=4, zero_stage=stage, batch_per_rank=4, lr=1e-2,
                  caption_dropout=0.0)
    engine = build_unet_engine(cfg, 4, 4, 32, unet_ds_config(cfg, 1, "fp32"))
    manifest = Manifest.read(caches["sd15"])
    samples = [decode_sample(s) for s in read_cached_shard(manifest.shard_urls(caches["sd15"])[0])][:4]
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("mean", "std", "text_emb")} | {"bytes": 0}
    shift, scale = manifest.latent_affine("scaling_factor")
    setup = step_setup(cfg, rank=0, device=dist.device(), dtype=torch.float32, shift=shift, scale=scale,
                       empty=torch.zeros(77, 32))
    before = {k: v.clone() for k, v in engine.module.named_parameters()}
    for step in range(2):
        assert train_step(engine, iter([batch]), step, setup).applied
    base = UNet2DConditionModel.from_pretrained(folders["sd15"], subfolder="unet").state_dict()
    after = dict(engine.module.named_parameters())
    lora = [k for k in after if ".lora_" in k]
    assert lora and all(not after[k].requires_grad for k in after if ".lora_" not in k)
    assert any(not torch.equal(after[k], before[k]) for k in lora)
    for name, tensor in after.items():
        if ".lora_" not in name:
            assert torch.equal(tensor, base[name.replace(".base_layer", "")]), name


def test_lora_exports_load_lora_weights_and_merge(lora_runs, folders, tmp_path):
    from diffusers import StableDiffusionPipeline

    from trainer.unet.sampling import load_run

    split, *_ = lora_runs
    lora = _export(split, tmp_path / "lora")
    assert sorted(os.listdir(lora)) == ["README.md", "ldm.json", "pytorch_lora_weights.safetensors"]
    merged = _export(split, tmp_path / "merged", merge=True)
    trained, *_ = load_run(str(split))  # the base with the EMA adapters, as sample.py samples
    pipe = StableDiffusionPipeline.from_pretrained(folders["sd15"])
    x, t, c = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    plain = pipe.unet(x, t, c).sample
    pipe.load_lora_weights(lora)
    with torch.no_grad():
        want = trained(x, t, c).sample
        loaded = pipe.unet(x, t, c).sample
        folded = StableDiffusionPipeline.from_pretrained(merged).unet(x, t, c).sample
    assert (want - plain).abs().max() > 1e-3  # the adapters do something
    torch.testing.assert_close(loaded, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(folded, want, atol=1e-5, rtol=1e-4)
    from trainer.core.config import ConfigError

    with pytest.raises(ConfigError, match="add --merge"):
        _export(split, tmp_path / "x", vae_source=f"{folders['sd15']}/vae")


# --- OpenCLIP towers into transformers -------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_an_openclip_tower_converts_to_a_transformers_clip_text_model(layer, tmp_path):
    from transformers import CLIPTokenizer

    from models.clip_convert import openclip_to_transformers, write_clip_tokenizer
    from models.text_encoder import load_text_encoder

    tower = load_text_encoder("tiny", layer)
    model = openclip_to_transformers(tower.tower, layer)
    captions = ["a red circle at the center on a white background", "", "a 3d cat, blue; ok? " * 8, "Ünïcode text"]
    tokens = tower.tokenize(captions)
    torch.testing.assert_close(model(tokens).last_hidden_state, tower(tokens), atol=1e-5, rtol=1e-5)
    write_clip_tokenizer(str(tmp_path), tower.context_length, pad_token="!")
    hf = CLIPTokenizer.from_pretrained(str(tmp_path))
    ids = hf(captions, padding="max_length", max_length=tower.context_length, truncation=True,
             return_tensors="pt").input_ids
    assert torch.equal(ids, tokens)  # the same ids, truncation and padding ("!" in a caption differs: see README)


def test_a_pipeline_text_encoder_read_at_its_penultimate_layer_exports_as_the_last(folders):
    from models.text_encoder import load_text_encoder
    from trainer.unet.export import pipeline_text_encoder

    encoder = load_text_encoder(folders["sd15"], "penultimate")
    model, tokenizer = pipeline_text_encoder(encoder)
    assert model.config.num_hidden_layers == 1 and encoder.model.config.num_hidden_layers == 2
    tokens = encoder.tokenize([PROMPT, ""])
    torch.testing.assert_close(model(tokens).last_hidden_state, encoder(tokens))


# --- the first stage ------------------------------------------------------------------------------------
def test_a_decoder_only_vae_finetune_keeps_the_cache_valid(folders, shards32, finetune, tmp_path):
    from models.autoencoder import encoder_identity, load_autoencoder

    run = tmp_path / "ae"
    run_cmd([PY, "launch/train_autoencoder.py", f"run_dir={run}", f"data.urls={shards32}", "data.resolution=32",
             f"pretrained={folders['sd15']}", "train_encoder=false", "objective=kl_gan", "lpips_weights=random",
             "batch_per_rank=8", "total_samples=32", "warmup_samples=8", "disc_start_samples=8", "disc_layers=2",
             "log_every_samples=16", "checkpoint_every_samples=32"], env=_quiet())
    before, after = load_autoencoder(f"{folders['sd15']}/vae"), load_autoencoder(str(run / "export"))
    a, b = before.state_dict(), after.state_dict()
    frozen = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
    assert after.config.scaling_factor == 0.18215 and encoder_identity(before) == encoder_identity(after)
    # The fine-tuned decoder ships with a UNet trained on the old cache; another encoder is refused.
    out = _export(finetune, tmp_path / "export", vae_source=str(run / "export"))
    assert json.load(open(os.path.join(out, "ldm.json")))["vae"]["decoder_from"] == str(run / "export")
    from trainer.core.config import ConfigError

    with pytest.raises(ConfigError, match="has another encoder"):
        _export(finetune, tmp_path / "x", vae_source=f"{folders['sd21']}/vae")


def test_a_lora_rank_past_every_adapted_layer_is_refused_before_allocating(folders):
    """#27: lora_rank=1000000000 tried to allocate rank x (in + out) per layer. A rank above the smaller side of
    every adapted layer adds nothing: refused in one line naming the largest useful rank."""
    from trainer.core.config import ConfigError
    from trainer.unet.job import UNetJob
    from trainer.unet.pretrained import build_model

    cfg = UNetJob(pretrained=folders["sd15"], lora_rank=1_000_000_000)
    with pytest.raises(ConfigError, match=r"^lora_rank=1000000000 is above the smaller side of every adapted layer "
                                          r"\(at most \d+ in \["):
        build_model(cfg, 4, 4, 32)
    assert any(p.requires_grad for p in build_model(UNetJob(pretrained=folders["sd15"], lora_rank=4), 4, 4, 32)
               .parameters())


@pytest.mark.parametrize("part, file, field, value, says", [
    ("unet", "config.json", "in_channels", [4], "field 'in_channels' is [4]"),
    ("unet", "config.json", "block_out_channels", [32, 10 ** 9], "field 'block_out_channels' is [32, 1000000000]"),
    ("scheduler", "scheduler_config.json", "num_train_timesteps", 0, "field 'num_train_timesteps' is 0"),
    ("scheduler", "scheduler_config.json", "num_train_timesteps", 10 ** 10, "field 'num_train_timesteps' is 10000000000"),
    ("scheduler", "scheduler_config.json", "beta_end", 1.5, "field 'beta_end' is 1.5"),
    ("scheduler", "scheduler_config.json", "beta_start", float("nan"), "field 'beta_start' is nan"),
    ("text_encoder", "config.json", "pad_token_id", 10 ** 6, "field 'pad_token_id' is 1000000, outside the embedding "
                                                            "table of vocab_size"),
    ("vae", "config.json", "scaling_factor", -1.0, "field 'scaling_factor' is -1.0"),
    ("tokenizer", None, None, None, "tokenizer/ has no vocabulary"),
])
def test_a_broken_pipeline_folder_is_one_line_naming_the_file_and_the_field(folders, tmp_path, part, file, field,
                                                                            value, says):
    """#27: fields a job sizes, indexes or divides by, checked before anything is built from them."""
    import json
    import shutil

    from models import pipeline
    from models.pipeline_checks import BrokenPipelineFolder

    broken = tmp_path / "broken"
    shutil.copytree(folders["sd15"], broken)
    pipeline.check_folder(str(broken), ("unet", "vae", "text_encoder", "tokenizer", "scheduler"))  # as built: fine
    if file is None:
        for name in ("vocab.json", "merges.txt", "tokenizer.json"):
            (broken / part / name).unlink(missing_ok=True)
    else:
        config = json.loads((broken / part / file).read_text())
        config[field] = value
        (broken / part / file).write_text(json.dumps(config))
    with pytest.raises(BrokenPipelineFolder, match=rf"^pretrained={broken}: {part}/") as e:
        pipeline.check_folder(str(broken), (part,))
    assert says in str(e.value) and "\n" not in str(e.value)
    if part == "unet":  # through a job's command line: one line, no traceback
        proc = run_cmd([PY, "launch/train_unet.py", "--dry-run", "data.urls=/nowhere", f"pretrained={broken}"],
                       check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr and says in proc.stderr, proc.stderr[-1500:]


def test_a_unet_whose_cross_attention_does_not_take_the_caches_text_is_refused_before_flops(folders, caches, tmp_path):
    """#27: cross_attention_dim other than the text encoder's width crashed in flops.py."""
    import json
    import shutil

    broken = tmp_path / "wide"
    shutil.copytree(folders["sd15"], broken)
    config = json.loads((broken / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 48
    (broken / "unet" / "config.json").write_text(json.dumps(config))
    proc = run_cmd([PY, "launch/train_unet.py", f"run_dir={tmp_path / 'run'}", f"data.urls={caches['sd15']}",
                    f"pretrained={broken}", "total_samples=8", "batch_per_rank=8"], check=False, env=_quiet())
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "its UNet expects 48-d text embeddings, the cache holds 32-d ones" in proc.stderr.strip().splitlines()[-1]


def test_a_lora_adapter_is_never_applied_silently_to_another_base(lora_runs, folders, tmp_path):
    """#27: the base's fingerprint is recorded with every LoRA checkpoint (and export); sampling or exporting
    the run against a pretrained folder whose UNet weights changed is refused in one line."""
    import shutil

    from safetensors.torch import save_file

    from trainer.core.config import ConfigError
    from trainer.unet.sampling import load_run

    split, *_ = lora_runs
    recorded = checkpoint.info(checkpoint.latest(str(split)))["lora_base"]
    assert json.load(open(os.path.join(_export(split, tmp_path / "lora"), "ldm.json")))["base_fingerprint"] == recorded
    other = tmp_path / "other_base"
    shutil.copytree(folders["sd15"], other)
    weights = other / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(str(weights)).items()}, str(weights))  # another fine-tune of it
    run = tmp_path / "run"
    shutil.copytree(split, run, ignore=shutil.ignore_patterns("run.lock"))
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(folders["sd15"], str(other)))
    with pytest.raises(ConfigError, match=rf"^the LoRA adapter of {run} was trained on a base UNet whose weights "
                                          rf"differ from pretrained={other}'s now \(fingerprint {recorded}, now "):
        load_run(str(run))
    load_run(str(split))  # its own base: fine


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
def test_weights_of_another_shape_than_the_config_are_one_line(folders, tmp_path, part):
    """#27: mismatched shapes in a pipeline folder's weights: one line naming the folder, not a traceback."""
    import shutil

    from safetensors.torch import save_file

    from models.autoencoder import load_autoencoder
    from models.pipeline import load_unet, part_spec
    from models.text_encoder import load_text_encoder

    broken = tmp_path / "broken"
    shutil.copytree(folders["sd15"], broken)
    name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
    weights = load_file(str(broken / part / name))
    key = next(k for k, v in weights.items() if v.dim() == 2)
    weights[key] = torch.zeros(weights[key].shape[0] + 3, weights[key].shape[1])
    save_file(weights, str(broken / part / name))
    load = {"unet": lambda: load_unet(str(broken)), "vae": lambda: load_autoencoder(part_spec(str(broken), "vae")),
            "text_encoder": lambda: load_text_encoder(str(broken))}[part]
    with pytest.raises(FileNotFoundError) as e:
        load()
    assert "\n" not in str(e.value) and str(broken) in str(e.value), str(e.value)


def test_a_short_lora_run_with_the_finetune_config_exports_what_it_trained(folders, caches, tmp_path, capsys):
    """#29: the finetune config's EMA (half-life 200,000 samples, no ramp-up) exported an adapter of 1.5e-7
    after a short LoRA run where 1e-3 was trained. A LoRA adapter's EMA now ramps up: the EMA export is
    within 10% of the trained adapter's norm, and the export says which weights it holds."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    out = run_cmd([PY, "launch/train_unet.py", "--config", "configs/unet/sd15_finetune.yaml", f"run_dir={run}",
                   f"data.urls={caches['sd15']}", f"pretrained={folders['sd15']}", "cache.resolution=32",
                   "lora_rank=4", "lr=1e-3", "total_samples=64", "batch_per_rank=8", "warmup_samples=0",
                   "data.num_workers=0", "validate_every_samples=0", "wandb=disabled"], env=_quiet()).stdout
    assert "LoRA: the adapters start at zero, so their EMA ramps up (ema_rampup_ratio=0.05)" in out
    norms = {}
    for weights in ("ema", "raw"):
        _export(run, tmp_path / weights, weights=weights)
        said = capsys.readouterr().out
        assert ("exporting the EMA weights (half-life 200000 samples, ramped up" if weights == "ema" else
                "exporting the trained weights (64 samples)") in said and "warning" not in said
        state = load_file(str(tmp_path / weights / "pytorch_lora_weights.safetensors"))
        norms[weights] = sum(float(v.float().norm() ** 2) for k, v in state.items() if "lora_B" in k or "lora.up" in k) ** 0.5
    assert norms["raw"] > 1e-4
    assert abs(norms["ema"] - norms["raw"]) <= 0.1 * norms["raw"], norms


def test_an_ema_behind_its_half_life_is_named_when_exported():
    from trainer.unet.job import UNetJob, ema_note

    text, warn = ema_note(UNetJob(pretrained="x", ema_halflife_samples=200_000, ema_rampup_ratio=0.0), 20_000)
    assert warn and "the EMA still holds 93% of pretrained's weights, the trained weights 7%" in text
    assert "--weights raw" in text
    assert not ema_note(UNetJob(pretrained="x", ema_halflife_samples=200_000, ema_rampup_ratio=0.0), 400_000)[1]
    assert not ema_note(UNetJob(pretrained="x", lora_rank=4, ema_halflife_samples=200_000, ema_rampup_ratio=0.0),
                        64)[1]


def test_init_from_a_lora_run_continues_its_adapter(lora_runs, folders, caches, tmp_path):
    """#29: a LoRA run started with init_from=<another LoRA run> starts from that run's adapter (its EMA)."""
    from safetensors.torch import load_file

    from trainer.core import checkpoint
    from trainer.unet.lora import WEIGHTS

    split, _, _ = lora_runs
    run = tmp_path / "more"
    out = run_cmd(_lora_args(run, folders, caches, f"init_from={split}", "total_samples=16", "lr=1e-12",
                             "ema_halflife_samples=0"), env=_quiet()).stdout
    src = checkpoint.latest(str(split / "checkpoints"))
    assert f"init_from: the EMA weights of {src}" in out
    want = load_file(f"{src}/ema_unet/{WEIGHTS}")
    got = load_file(f"{checkpoint.latest(str(run / 'checkpoints'))}/unet/{WEIGHTS}")
    assert want.keys() == got.keys() and max(float((want[k] - got[k]).abs().max()) for k in want) < 1e-6
    # The saved config says what was trained, not the unused preset (#29: it read `model: demo`).
    saved = (run / "config.yaml").read_text()
    assert f"model: demo  # not used: this run trains LoRA adapters (rank 4) on {folders['sd15']}'s unet/ " \
           "(UNet2DConditionModel, block_out_channels [32, 64]" in saved


def test_kohya_lora_export_loads_with_load_lora_weights_and_gives_the_same_unet(lora_runs, folders, tmp_path):
    """#29: --format kohya (and single_file on a LoRA run) writes the adapter alone in kohya's layout; diffusers'
    load_lora_weights reads it into the same UNet output as the diffusers-format file."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from trainer.core.config import ConfigError

    split, *_ = lora_runs
    kohya = _export(split, tmp_path / "kohya", fmt="kohya")
    assert sorted(os.listdir(kohya)) == ["README.md", "ldm.json", "lora_kohya.safetensors"]
    with safe_open(os.path.join(kohya, "lora_kohya.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["ss_network_dim"] == "4"
    assert all(k.startswith("lora_unet_") for k in keys)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert any(k.endswith("to_out_0.alpha") for k in keys)
    single = _export(split, tmp_path / "single", fmt="single_file")
    assert sorted(os.listdir(single)) == ["README.md", "ldm.json", "lora_kohya.safetensors"]  # not a 100 MB model
    diffusers_file = _export(split, tmp_path / "diffusers")
    x, t, c = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    outs = []
    for folder, name in ((diffusers_file, "pytorch_lora_weights.safetensors"), (kohya, "lora_kohya.safetensors")):
        pipe = StableDiffusionPipeline.from_pretrained(folders["sd15"])
        pipe.load_lora_weights(folder, weight_name=name)
        with torch.no_grad():
            outs.append(pipe.unet(x, t, c).sample)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="--format kohya writes a LoRA adapter file: .*leave out --merge"):
        _export(split, tmp_path / "x", fmt="kohya", merge=True)


def test_an_export_has_a_model_card_and_push_to_hub_fails_in_one_line_offline(lora_runs, tmp_path, monkeypatch):
    """#29: OUT/README.md in the hub's layout (YAML front matter, what was trained, how to load it, the newest
    validation grid); --push-to-hub without network is one line that keeps the export."""
    import huggingface_hub.constants
    import yaml

    from trainer.core.config import ConfigError
    from trainer.unet.model_card import push_to_hub

    split, *_ = lora_runs
    out = _export(split, tmp_path / "card", trigger="sks toy")
    text = open(os.path.join(out, "README.md")).read()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "diffusers" and "lora" in front["tags"] and front["instance_prompt"] == "sks toy"
    assert "LoRA adapters (rank 4" in text and 'pipe.load_lora_weights("<this folder or repo>", ' \
        'weight_name="pytorch_lora_weights.safetensors")' in text and "- trigger words: `sks toy`" in text
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"^--push-to-hub me/toy: the upload failed .*the export is complete at"):
        push_to_hub(out, "me/toy")
