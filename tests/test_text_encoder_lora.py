"""#29: lora_text_encoder=true trains LoRA adapters on the text encoder beside the UNet's, on a cache of token ids
(a tiny random-weight SD 1.5-layout folder, tests/sd_pipelines.py; 2 ranks at ZeRO-2): only the adapters change,
and every export (diffusers' file, kohya's, merged) gives the text encoder the run trained."""
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import PY, ranks_of, run_cmd
from sd_pipelines import build_pipeline
from trainer.core import checkpoint

QUIET = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
PREFIX = "lora_text_encoder."


@pytest.fixture(scope="module")
def te_run(tmp_path_factory):
    """(pipeline folder, run folder, embeddings cache): 48 samples of UNet and text-encoder LoRA, with a grid."""
    root = tmp_path_factory.mktemp("te_lora")
    folder = build_pipeline("sd15", str(root / "sd15"))
    run_cmd([PY, "launch/make_synthetic.py", "--out", str(root / "shards"), "--num", "32", "--per-shard", "16",
             "--resolution", "32"])
    caches = {}
    for text in ("tokens", "embeddings"):
        caches[text] = str(root / f"cache-{text}")
        run_cmd([PY, "launch/cache_latents.py", f"data.urls={root / 'shards'}", "data.resolution=32",
                 f"out_url={caches[text]}", "batch_size=16", f"pretrained={folder}", f"text={text}"], env=QUIET)
    run = root / "run"
    run_cmd([*ranks_of(2), "launch/train_unet.py", f"run_dir={run}", f"data.urls={caches['tokens']}",
             f"pretrained={folder}", "lora_rank=4", "lora_text_encoder=true", "zero_stage=2", "lr=1e-2",
             "batch_per_rank=8", "total_samples=48", "warmup_samples=0", "log_every_samples=16",
             "checkpoint_every_samples=48", "validate_every_samples=48", "validation_prompts=[a red circle]",
             "validation_steps=2", "data.num_workers=0"], env=QUIET)
    return folder, run, caches["embeddings"]


def _tokens(text_encoder, prompt="a red circle at the center"):
    return text_encoder.tokenize([prompt, ""])


def test_only_the_adapters_change_and_the_checkpoint_holds_both(te_run):
    from transformers import CLIPTextModel

    from trainer.unet.sampling import load_run

    folder, run, _ = te_run
    ckpt = checkpoint.latest(str(run / "checkpoints"))
    saved = load_file(os.path.join(ckpt, "unet", "diffusion_pytorch_model.safetensors"))
    text_keys = [k for k in saved if k.startswith(PREFIX)]
    assert text_keys and all(".lora_" in k for k in saved)  # adapters alone, of both models
    assert any(not k.startswith(PREFIX) for k in saved)
    assert {k.rsplit(".lora_", 1)[0].rsplit(".", 1)[1] for k in text_keys} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert any(saved[k].abs().max() > 0 for k in text_keys if ".lora_B." in k)  # B starts at zero: it trained
    assert (run / "samples" / "step_000000003.png").exists()  # the grid drew with the adapted encoder
    unet, _, text_encoder, _, _ = load_run(str(run), "raw")
    base = CLIPTextModel.from_pretrained(f"{folder}/text_encoder").state_dict()
    for name, tensor in text_encoder.model.state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(tensor, base[name.replace(".base_layer", "")]), name


def _hidden(model, tokens):
    with torch.no_grad():
        return model(tokens).last_hidden_state


def test_every_export_gives_the_text_encoder_the_run_trained(te_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    from trainer.unet.export import export_run
    from trainer.unet.sampling import load_run

    folder, run, _ = te_run
    unet, _, text_encoder, _, _ = load_run(str(run))
    tokens = _tokens(text_encoder)
    with torch.no_grad():
        want = text_encoder(tokens)
    plain = _hidden(StableDiffusionPipeline.from_pretrained(folder).text_encoder, tokens)
    assert (want - plain).abs().max() > 1e-4  # the adapters do something
    outs = {}
    for fmt, name in (("diffusers", "pytorch_lora_weights.safetensors"), ("kohya", "lora_kohya.safetensors")):
        out = export_run(str(run), str(tmp_path / fmt), fmt=fmt)
        with safe_open(os.path.join(out, name), "pt") as f:
            keys = list(f.keys())
        if fmt == "kohya":  # A1111's and ComfyUI's names: transformers 4's module path
            assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
            assert any(k.startswith("lora_unet_") for k in keys)
        else:
            assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
        pipe = StableDiffusionPipeline.from_pretrained(folder)
        pipe.load_lora_weights(out, weight_name=name)
        outs[fmt] = _hidden(pipe.text_encoder, tokens)
    merged = export_run(str(run), str(tmp_path / "merged"), merge=True)
    outs["merged"] = _hidden(StableDiffusionPipeline.from_pretrained(merged).text_encoder, tokens)
    for fmt, got in outs.items():
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=fmt)


def test_text_encoder_lora_needs_a_cache_of_token_ids_and_lora_rank(te_run, tmp_path):
    folder, _, embeddings = te_run
    run_dir = tmp_path / "run"
    dry = run_cmd([PY, "launch/train_unet.py", "--dry-run", f"run_dir={run_dir}", f"data.urls={embeddings}",
                   f"pretrained={folder}", "lora_rank=4", "lora_text_encoder=true", "zero_stage=2"],
                  check=False, env=QUIET, timeout=300)
    assert dry.returncode != 0 and "lora_text_encoder=true needs a cache made with text=tokens" in dry.stderr
    assert not run_dir.exists() or not (run_dir / "config.yaml").exists()
    from trainer.core.config import ConfigError
    from trainer.core.data import LatentData
    from trainer.unet.job import UNetJob

    with pytest.raises(ConfigError, match="set lora_rank > 0"):
        UNetJob(data=LatentData(urls="/c"), run_dir="/r", pretrained=folder, lora_text_encoder=True).validate()
