"""SDXL-class training (#16) on a tiny random-weight SDXL pipeline folder (tests/sd_pipelines.py): two text
encoders in the cache, aspect-ratio buckets through the cache and the UNet loader, size and crop conditioning
(time_ids), caption dropout of both encoders, 2-rank ZeRO-2 training with exact and elastic resume, and the
exported StableDiffusionXLPipeline drawing sample.py's non-square picture."""
import io
import itertools
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PY, ranks_of, run_cmd
from sd_pipelines import build_pipeline

# (w, h) of the source images: wide, tall, square and in between, so that four of the five buckets of
# 64 px at step 16 (48x96, 48x80, 64x64, 80x48, 96x48) fill.
SIZES = [(100, 40), (40, 90), (64, 64), (80, 60), (96, 48), (50, 100), (70, 70), (120, 60)]
TRAIN = ("batch_per_rank=2", "warmup_samples=4", "log_every_samples=4", "checkpoint_every_samples=16",
         "ema_halflife_samples=50", "ema_rampup_ratio=0", "lr=1e-3", "zero_stage=0", "data.shuffle_buffer=8",
         "keep_last=3")
ENV = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    return build_pipeline("sdxl", str(tmp_path_factory.mktemp("xl") / "sdxl"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """40 flat-colour images of the eight SIZES in 5 shards, captioned by colour."""
    from data_pipeline.shards import write_shards

    out = tmp_path_factory.mktemp("xl_shards")
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "white": (250, 250, 250)}

    def samples():
        for i in range(40):
            name = list(colours)[i % 4]
            b = io.BytesIO()
            Image.new("RGB", SIZES[i % len(SIZES)], colours[name]).save(b, "PNG")
            yield {"__key__": f"{i:08d}", "png": b.getvalue(), "txt": f"a {name} picture".encode()}
    write_shards(samples(), str(out), 8, prefix="img")
    return str(out)


@pytest.fixture(scope="module")
def cache(xl, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("xl_cache") / "latents"
    run_cmd([PY, "launch/cache_latents.py", f"pretrained={xl}", f"data.urls={shards}", f"out_url={out}",
             "data.resolution=64", "data.buckets=true", "data.bucket_step=16", "batch_size=4"], env=ENV)
    return str(out)


def _train(run, xl, cache, ranks, *extra):
    cmd = [*ranks_of(ranks), "launch/train_unet.py",
           f"run_dir={run}", f"data.urls={cache}", f"pretrained={xl}", *TRAIN, *extra]
    return run_cmd(cmd, env=ENV, check=False)


@pytest.fixture(scope="module")
def runs(xl, cache, tmp_path_factory):
    """2 ranks, ZeRO-0: 48 samples uninterrupted; the same stopped after 16 and resumed. (ZeRO-0: the
    elastic resume below then needs no universal conversion, which took 2 minutes of the file's 6 on this
    UNet; the conversion is tested in test_train_unet.py, test_checkpoint.py and test_slurm.py.)"""
    root = tmp_path_factory.mktemp("xl_runs")
    for name, stops in (("whole", ()), ("split", ("stop_after_samples=16",))):
        for extra in (stops, ()) if stops else ((),):
            out = _train(root / name, xl, cache, 2, "total_samples=48", *extra)
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root


def _losses(run) -> dict:
    with open(os.path.join(run, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


# --- the two text encoders and the bucketed cache --------------------------------------------------------
def test_the_cache_holds_both_encoders_outputs_as_the_sdxl_pipeline_encodes_them(xl, cache):
    from diffusers import StableDiffusionXLPipeline

    from data_pipeline.latents import decode_sample
    from data_pipeline.shards import iter_samples
    from data_pipeline.storage import expand_shards
    from trainer.cache.manifest import Manifest

    manifest = Manifest.read(cache)
    pipe = StableDiffusionXLPipeline.from_pretrained(xl)
    context, _, pooled, _ = pipe.encode_prompt(["a red picture"], device="cpu", do_classifier_free_guidance=False)
    assert manifest.text_emb_shape == (77, 32 + 48) and manifest.pooled_dim == 40
    assert manifest.text_encoder.layer == "penultimate" and manifest.text_encoder.identity
    sample = next(s for s in iter_samples(expand_shards(cache)[0]) if s["txt"] == b"a red picture")
    t = decode_sample(sample)
    torch.testing.assert_close(t["text_emb"].float(), context[0], atol=2e-3, rtol=2e-3)  # stored in fp16
    torch.testing.assert_close(t["pooled"].float(), pooled[0], atol=2e-3, rtol=2e-3)


def test_a_bucketed_cache_encodes_each_image_at_its_bucket_and_counts_them(cache):
    from data_pipeline.latents import CachedSampleDecoder
    from data_pipeline.shards import iter_samples
    from data_pipeline.storage import expand_shards
    from trainer.cache.manifest import Manifest

    manifest = Manifest.read(cache)
    counts = {(b.width, b.height): b.count for b in manifest.buckets if b.count}
    # Nearest aspect ratio: 100x40, 96x48 and 120x60 -> 96x48; 40x90 and 50x100 -> 48x96; 64x64 and 70x70 ->
    # 64x64; 80x60 (4:3) -> 80x48 (5:3), nearer in log ratio than the square.
    assert counts == {(96, 48): 15, (48, 96): 10, (64, 64): 10, (80, 48): 5}
    decode = CachedSampleDecoder(with_time_ids=True, downsample_factor=8, check_shape=True)
    seen = {}
    for url in expand_shards(cache):
        for s in iter_samples(url):
            meta, t = json.loads(s["json"]), decode(s)
            w, h = meta["target_size"]
            assert t["mean"].shape == (4, h // 8, w // 8)
            seen[tuple(meta["original_size"])] = t["time_ids"].tolist()
    # By hand: 100x40 covers 96x48 at scale 1.2 -> 120x48, 12 px cut at the left; SDXL's order is
    # original (h, w), crop (top, left), target (h, w).
    assert seen[(100, 40)] == [40, 100, 0, 12, 48, 96]
    assert seen[(40, 90)] == [90, 40, 6, 0, 96, 48]  # 40x90 -> 48x108: 6 px cut at the top
    assert seen[(80, 60)] == [60, 80, 6, 0, 48, 80]  # 80x60 already covers 80x48: 6 px cut at the top
    assert seen[(64, 64)] == [64, 64, 0, 0, 64, 64]


def test_the_unet_loader_batches_a_bucketed_cache_by_shape(cache):
    from data_pipeline.buckets import LatentBucketer
    from data_pipeline.latents import CachedSampleDecoder, read_cached_shard
    from data_pipeline.loader import ShardBatches, make_loader
    from trainer.cache.manifest import Manifest

    manifest = Manifest.read(cache)
    ds = ShardBatches(manifest.shard_urls(cache), CachedSampleDecoder(True, 8, True), 4, seed=1,
                      counts=[s.count for s in manifest.shards], read_shard=read_cached_shard,
                      checksums=[s.keys_sha256 for s in manifest.shards],
                      bucketer=LatentBucketer(manifest.bucket_shapes()), num_workers=0, shuffle_buffer=8)
    shapes = set()
    for batch in itertools.islice(make_loader(ds), 12):
        assert batch["mean"].ndim == 4 and batch["time_ids"].shape == (4, 6)  # stacked: one shape per batch
        h, w = batch["mean"].shape[2:]
        assert (batch["time_ids"][:, 4:] == torch.tensor([h * 8, w * 8])).all()
        shapes.add((h, w))
    assert len(shapes) >= 3


# --- the step: time_ids and pooled embeddings reach the UNet; dropout takes both encoders ---------------
def test_time_ids_reach_the_unet_and_dropout_zeroes_both_encoders(xl, cache, process_group):
    from data_pipeline.latents import CachedSampleDecoder
    from data_pipeline.shards import iter_samples
    from data_pipeline.storage import expand_shards
    from trainer.cache.manifest import Manifest
    from trainer.core import dist
    from trainer.unet.job import UNetJob
    from trainer.unet.step import build_unet_engine, step_setup, train_step, unet_ds_config

    dist.init()
    manifest = Manifest.read(cache)
    decode = CachedSampleDecoder(True, 8, True)
    samples = [decode(s) for url in expand_shards(cache) for s in iter_samples(url)]
    samples = [s for s in samples if s["mean"].shape == (4, 6, 12)][:8]  # the 96x48 bucket
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]} | {"bytes": 0}
    job = UNetJob(pretrained=xl, batch_per_rank=len(samples), zero_stage=0, precision="fp32", caption_dropout=0.5,
                  seed=5)
    engine = build_unet_engine(job, 4, 8, 80, unet_ds_config(job, 1, "fp32"), pooled_dim=40)
    seen = []
    engine.module.register_forward_pre_hook(lambda m, a, kw: seen.append((a, kw)), with_kwargs=True)
    setup = step_setup(job, rank=0, device=torch.device("cpu"), dtype=torch.float32, shift=torch.tensor(0.0),
                       scale=torch.tensor(manifest.vae.scaling_factor), empty=torch.zeros(77, 80),
                       empty_pooled=torch.zeros(40))
    train_step(engine, iter([batch]), 0, setup)
    (args, kwargs), = seen
    context, added = args[2], kwargs["added_cond_kwargs"]
    torch.testing.assert_close(added["time_ids"], batch["time_ids"])
    dropped = (context.abs().sum((1, 2)) == 0)
    assert 0 < int(dropped.sum()) < len(samples)  # seed 5 drops some captions and keeps some
    assert torch.equal(added["text_embeds"].abs().sum(1) == 0, dropped)  # the pooled embedding goes with them
    kept = ~dropped
    torch.testing.assert_close(added["text_embeds"][kept], batch["pooled"][kept].float())
    torch.testing.assert_close(context[kept], batch["text_emb"][kept].float())


# --- training on 2 ranks: exact resume, elastic resume --------------------------------------------------
def test_two_rank_bucketed_training_resumes_exactly(runs):
    whole, split = _losses(runs / "whole"), _losses(runs / "split")
    assert len(whole) == 12 and whole.keys() == split.keys()
    for step in whole:
        assert split[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-6), step


def test_elastic_resume_of_a_bucketed_run_onto_one_rank(runs, xl, cache, tmp_path):
    import shutil

    # The 2-rank run as it was after its first leg (16 samples), moved to a new run_dir.
    run = tmp_path / "elastic"
    shutil.copytree(runs / "split", run)
    for name in os.listdir(run / "checkpoints"):
        if name.startswith("samples_") and int(name.split("_")[1]) > 16:
            shutil.rmtree(run / "checkpoints" / name)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace(str(runs / "split"), str(run)))
    # (Without elastic_resume=true the same command is refused: tests/test_train_unet.py checks that path.)
    out = _train(run, xl, cache, 1, "total_samples=48", "elastic_resume=true")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "elastic: written by 2 ranks, 16 samples" in out.stdout
    losses = _losses(run)  # 4 steps of 4 samples on 2 ranks, then 16 of 2 on one rank
    assert max(losses) == 24 and all(np.isfinite(v) for v in losses.values())


# --- sampling and export --------------------------------------------------------------------------------
def test_the_exported_sdxl_pipeline_draws_sample_pys_non_square_picture(runs, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from trainer.unet import sampling
    from trainer.unet.export import export_run

    out = export_run(str(runs / "whole"), str(tmp_path / "export"))
    assert json.load(open(os.path.join(out, "model_index.json")))["_class_name"] == "StableDiffusionXLPipeline"
    w, h, steps, guidance = 96, 48, 4, 3.0
    noise = torch.randn((1, 4, h // 8, w // 8), generator=torch.Generator().manual_seed(3))
    unet, vae, te, cfg, manifest = sampling.load_run(str(runs / "whole"))
    original = sampling.sample_latents
    sampling.sample_latents = lambda *a, generator=None, **k: original(*a, **k, noise=noise)
    try:
        rows = sampling.sample_rows(unet, vae, te, manifest, cfg, ["a red picture"], per_prompt=1, guidance=guidance,
                                    steps=steps, size=(w, h))
    finally:
        sampling.sample_latents = original
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a red picture", height=h, width=w, num_inference_steps=steps, guidance_scale=guidance,
                  latents=noise * pipe.scheduler.init_noise_sigma, output_type="np").images[0]
    ours = np.asarray(rows[0][0]).astype(np.float32)
    assert ours.shape == (h, w, 3)
    assert np.abs(ours - (theirs * 255).round()).max() <= 1


def test_sample_py_takes_a_bucket_size_and_refuses_a_bad_one(runs, tmp_path):
    from trainer.core.config import ConfigError
    from trainer.unet.sampling import parse_size

    run_cmd([PY, "launch/sample.py", "--run", str(runs / "whole"), "--prompt", "a blue picture", "--per-prompt", "1",
             "--steps", "2", "--size", "48x96", "--out", str(tmp_path / "s.png")], env=ENV)
    assert Image.open(tmp_path / "s" / "p000_000.png").size == (48, 96)
    assert parse_size("1152x896", 8) == (1152, 896)
    for bad in ("50x96", "96", "0x64", "-8x64", "64x64x3"):
        with pytest.raises(ConfigError, match="multiples of 8"):
            parse_size(bad, 8)


def test_single_file_export_round_trips_through_from_single_file(runs, tmp_path):
    """--format single_file in SDXL's original layout (bigG in OpenCLIP's names): from_single_file gives back
    every weight of the exported pipeline exactly."""
    from diffusers import StableDiffusionXLPipeline

    from trainer.unet.export import export_run

    folder = export_run(str(runs / "whole"), str(tmp_path / "folder"))
    single = export_run(str(runs / "whole"), str(tmp_path / "single"), fmt="single_file")
    ref = StableDiffusionXLPipeline.from_pretrained(folder)
    got = StableDiffusionXLPipeline.from_single_file(os.path.join(single, "model.safetensors"), config=folder)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, have = getattr(ref, part).state_dict(), getattr(got, part).state_dict()
        for key, value in want.items():
            if not key.endswith("position_ids"):
                assert torch.equal(value, have[key]), f"{part}.{key}"


def test_an_sdxl_lora_loads_with_load_lora_weights_and_equals_merge(xl, shards, tmp_path):
    """UNet and both text encoders adapted (lora_text_encoder=true, on a cache of token ids, #29): diffusers'
    file loaded and fused equals --merge's pipeline in all three models, and kohya's file (lora_te1_, lora_te2_)
    loads into the same text encoders."""
    from diffusers import StableDiffusionXLPipeline

    from trainer.unet.export import export_run

    cache = tmp_path / "tokens"
    run_cmd([PY, "launch/cache_latents.py", f"pretrained={xl}", f"data.urls={shards}", f"out_url={cache}",
             "data.resolution=64", "data.buckets=true", "data.bucket_step=16", "batch_size=4", "text=tokens"], env=ENV)
    run = tmp_path / "lora"
    out = run_cmd([PY, "launch/train_unet.py", f"run_dir={run}", f"data.urls={cache}", f"pretrained={xl}",
                   "batch_per_rank=2", "total_samples=8", "zero_stage=0", "precision=fp32", "lr=1e-2", "lora_rank=4",
                   "lora_text_encoder=true", "data.num_workers=0", "wandb=disabled"], env=ENV)
    assert out.returncode == 0
    lora = export_run(str(run), str(tmp_path / "lora_export"))
    kohya = export_run(str(run), str(tmp_path / "kohya"), fmt="kohya")
    merged = export_run(str(run), str(tmp_path / "merged"), merge=True)
    want = StableDiffusionXLPipeline.from_pretrained(merged)
    pipe = StableDiffusionXLPipeline.from_pretrained(xl)
    base = {k: v.clone() for k, v in pipe.text_encoder_2.state_dict().items()}
    pipe.load_lora_weights(lora)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    for part in ("unet", "text_encoder", "text_encoder_2"):
        fused, merged_state = getattr(pipe, part).state_dict(), getattr(want, part).state_dict()
        assert set(fused) == set(merged_state), part
        for key, value in merged_state.items():
            torch.testing.assert_close(fused[key], value, atol=1e-6, rtol=1e-5, msg=f"{part}: {key}")
    assert any(not torch.equal(base[k], pipe.text_encoder_2.state_dict()[k]) for k in base)  # adapted
    tokens = want.tokenizer_2(["a red picture"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    from_kohya = StableDiffusionXLPipeline.from_pretrained(xl)
    from_kohya.load_lora_weights(kohya, weight_name="lora_kohya.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(from_kohya.text_encoder_2(tokens, output_hidden_states=True).hidden_states[-2],
                                   want.text_encoder_2(tokens, output_hidden_states=True).hidden_states[-2],
                                   atol=1e-5, rtol=1e-4)


def test_sampling_conditions_on_the_original_size_and_crop_given(runs):
    """--original-size and --crop reach the UNet: the same seed draws another image; they are refused in one
    line where they would mean nothing (malformed)."""
    from trainer.core.config import ConfigError
    from trainer.unet.sampling import generate

    kw = dict(per_prompt=1, steps=2, size="96x48", seed=1)
    plain = np.asarray(generate(str(runs / "whole"), ["a red picture"], **kw)[0][0]).astype(int)
    again = np.asarray(generate(str(runs / "whole"), ["a red picture"], **kw)[0][0]).astype(int)
    small = np.asarray(generate(str(runs / "whole"), ["a red picture"], original_size="48x24", crop="4,8",
                                **kw)[0][0]).astype(int)
    assert np.array_equal(plain, again) and not np.array_equal(plain, small)
    with pytest.raises(ConfigError, match="crop must be TOP,LEFT"):
        generate(str(runs / "whole"), ["x"], crop="4", **kw)


# --- from scratch: a pair of OpenCLIP towers --------------------------------------------------------------
def test_an_openclip_pair_reads_as_sdxl_and_exports_to_the_pipelines_encoders():
    """text_encoder=A+B (SDXL from scratch): both towers' penultimate states before ln_final, concatenated, and
    the second's pooled projection; exported as CLIPTextModel + CLIPTextModelWithProjection that give the same
    (what StableDiffusionXLPipeline reads: hidden_states[-2] of both, text_embeds of the second)."""
    from models.text_encoder import DualTextEncoder, load_text_encoder
    from trainer.unet.export import sdxl_text_encoders

    pair = load_text_encoder("tiny+tiny")
    assert isinstance(pair, DualTextEncoder) and pair.width == 128 and pair.pooled_dim == 64
    captions = ["a red circle at the top left", ""]
    ours = pair.embed(captions)
    (first, tok), (second, tok_2) = sdxl_text_encoders(pair)
    ids = [t(captions, padding="max_length", max_length=pair.context_length, truncation=True,
             return_tensors="pt").input_ids for t in (tok, tok_2)]
    assert torch.equal(torch.stack(ids, 1), pair.tokenize(captions).long())
    a, b = first(ids[0], output_hidden_states=True), second(ids[1], output_hidden_states=True)
    torch.testing.assert_close(torch.cat([a.hidden_states[-2], b.hidden_states[-2]], -1), ours["text_emb"],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.text_embeds, ours["pooled"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec, says", [("tiny+", "two OpenCLIP specs joined by '+'"),
                                        ("tiny+tiny+tiny", "two OpenCLIP specs joined by '+'"),
                                        ("tiny+ViT-H-15", "unknown text encoder 'ViT-H-15'")])
def test_a_bad_text_encoder_pair_is_refused_in_one_line(spec, says):
    from trainer.core.config import ConfigError
    from trainer.core.job_checks import check_text_encoder_spec

    with pytest.raises(ConfigError, match=says.replace("+", r"\+")):
        check_text_encoder_spec(spec)
