"""Each command once, chained as a user runs them, plus their one-line errors on bad input."""
import json
import os

import pytest
from PIL import Image

from conftest import PY, ROOT, run_cmd, run_script
from data_pipeline.shards import write_shards


def _png() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pipeline(tiny_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    ae = run_cmd([PY, "launch/train_autoencoder.py", "--config", "configs/autoencoder/demo.yaml", f"run_dir={root}/ae",
                  f"data.urls={tiny_shards}", "data.resolution=16", "preset=tiny", "batch_per_rank=16",
                  "total_samples=320", "warmup_samples=32", "log_every_samples=32", "checkpoint_every_samples=160",
                  "scaling_samples=64"])
    cache = run_cmd([PY, "launch/cache_latents.py", "--config", "configs/cache/demo.yaml", f"data.urls={tiny_shards}",
                     "data.resolution=16", f"out_url={root}/latents", f"vae={root}/ae/export", "batch_size=32"])
    unet = run_cmd([PY, "launch/train_unet.py", "--config", "configs/unet/demo.yaml", f"run_dir={root}/unet",
                    f"data.urls={root}/latents", "model=tiny", "batch_per_rank=16", "total_samples=320",
                    "warmup_samples=32", "log_every_samples=32", "checkpoint_every_samples=160"])
    sample = run_cmd([PY, "launch/sample.py", "--run", f"{root}/unet", "--prompt", "a red circle at the center on a "
                      "white background", "--prompt", "a blue square at the top left on a black background",
                      "--per-prompt", "3", "--steps", "5", "--out", f"{root}/grid.png"])
    return root, ae, cache, unet, sample


def test_autoencoder_exports_a_diffusers_folder_with_measured_scaling(pipeline):
    root, ae, *_ = pipeline
    cfg = json.load(open(root / "ae" / "export" / "config.json"))
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["scaling_factor"] != 0.18215 and cfg["scaling_factor"] > 0
    assert os.path.exists(root / "ae" / "export" / "diffusion_pytorch_model.safetensors")
    assert os.path.exists(root / "ae" / "loss.png") and "autoencoder exported to" in ae.stdout


def test_cache_records_the_trained_autoencoder(pipeline):
    root, _, cache, *_ = pipeline
    manifest = json.load(open(root / "latents" / "manifest.json"))
    assert manifest["num_samples"] == 96
    assert manifest["vae"]["source"] == str(root / "ae" / "export")
    assert manifest["vae"]["scaling_factor"] == json.load(open(root / "ae" / "export" / "config.json"))["scaling_factor"]


def test_unet_run_and_sample_grid(pipeline):
    root, *_, unet, sample = pipeline
    assert os.path.exists(root / "unet" / "config.yaml") and os.path.exists(root / "unet" / "loss.png")
    assert f"samples: {root}/grid.png" in sample.stdout
    img = Image.open(root / "grid.png")
    assert img.size == (3 * 128, 2 * (128 + 16))


@pytest.mark.parametrize("extra, says", [(["--size", "100000x100000"], "at 100000x100000 need about"),
                                         (["--per-prompt", "100000000"], "x 100000000 image(s) at 16x16 need about")])
def test_a_sample_request_that_cannot_fit_is_refused_before_it_allocates(pipeline, extra, says):
    """#27: sizes with no upper bound (these tried to allocate 64-128 GB, or ended in SIGABRT)."""
    root, *_ = pipeline
    out = run_cmd([PY, "launch/sample.py", "--run", f"{root}/unet", "--prompt", "x", "--steps", "1", *extra,
                   "--out", f"{root}/huge.png"], check=False)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert lines[-1].startswith("error: 1 prompt(s) x ") and says in lines[-1] and "GB free" in lines[-1], lines[-1]
    assert not os.path.exists(root / "huge.png")


def test_a_full_disk_is_one_line_and_leaves_nothing_a_later_run_would_trust(pipeline, tiny_shards, tmp_path):
    """#27: disk full during an export, a cache shard and a checkpoint. Each on a small filesystem of its own
    (a tmpfs in this test's mount namespace, gone with it)."""
    import subprocess

    root, *_ = pipeline
    small = tmp_path / "small"
    small.mkdir()
    run = [f"{PY} launch/train_unet.py --config configs/unet/demo.yaml run_dir={small}/run data.urls={root}/latents "
           "model=tiny batch_per_rank=16 total_samples=64 checkpoint_every_samples=32 validate_every_samples=0 "
           "wandb=disabled"]
    steps = {"export": f"{PY} launch/export.py --run {root}/unet --out {small}/export",
             "cache": f"{PY} launch/cache_latents.py data.urls={tiny_shards} data.resolution=16 out_url={small}/cache "
                      "vae=preset:tiny text_encoder=tiny batch_size=16",
             "train": run[0]}
    script = f"mount -t tmpfs -o size=160k tmpfs {small} || exit 99\n"
    for name, command in steps.items():
        script += (f"echo '== {name}'; {command} 2>&1 | tail -n 3; echo \"rc ${{PIPESTATUS[0]}}\"; "
                   f"find {small} -mindepth 1 | sort; rm -rf {small}/*\n")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    parts = dict(part.split("\n", 1) for part in proc.stdout.split("== ")[1:])
    for name in steps:
        lines = parts[name].strip().splitlines()
        rc = next(line for line in lines if line.startswith("rc "))
        error = lines[lines.index(rc) - 1]
        assert rc != "rc 0" and error.startswith("error: no space left on the device of ") and \
            "MB free" in error and "Traceback" not in parts[name], (name, parts[name])
        left = lines[lines.index(rc) + 1:]
        if name == "export":
            assert left == [] and "nothing was left at" in error, left  # no export folder, no partial one
        elif name == "cache":
            assert not any(p.endswith("manifest.json") for p in left), left
        else:
            assert not any(p.endswith("/COMPLETE") for p in left) and "no COMPLETE marker" in error, left


def test_rerunning_a_finished_unet_run_changes_nothing(pipeline):
    root, *_ = pipeline
    before = open(root / "unet" / "log.jsonl").read()
    out = run_cmd([PY, "launch/train_unet.py", "--config", "configs/unet/demo.yaml", f"run_dir={root}/unet",
                   f"data.urls={root}/latents", "model=tiny", "batch_per_rank=16", "total_samples=320",
                   "warmup_samples=32", "log_every_samples=32", "checkpoint_every_samples=160"])
    assert "resuming from" in out.stdout and open(root / "unet" / "log.jsonl").read() == before


# Refusals before any work run in this process (conftest.run_script); the DataLoader-worker case
# runs as a real process: the one-line error must cross the worker and the process boundary.
@pytest.mark.parametrize("args, message", [
    (["launch/cache_latents.py", "data.urls=/nonexistent/shard-0000.tar", "out_url={out}", "vae=preset:tiny"],
     "shard not found: /nonexistent/shard-0000.tar"),
    (["launch/cache_latents.py", "data.urls={empty}", "out_url={out}", "vae=preset:tiny"], "no .tar shards found under"),
    (["launch/cache_latents.py", "data.urls={shards}", "out_url={out}", "vae={novae}"], "autoencoder path"),
    (["launch/train_unet.py", "--config", "configs/unet/demo.yaml", "adam.lr=1"], "unknown config key 'adam.lr'"),
    (["launch/train_unet.py", "data.urls={empty}", "run_dir={out}"], "manifest.json does not exist"),
    (["launch/sample.py", "--run", "{empty}", "--prompt", "x"], "config.yaml does not exist"),
    (["launch/make_synthetic.py", "--out", "{out}", "--num", "0"], "--num and --per-shard must be positive"),
    (["launch/train_unet.py", "data.urls={cache}", "run_dir={out}", "model=tiny", "cache.vae=0123456789abcdef"],
     "has vae"),
    # Decoding happens in a DataLoader worker: the error still arrives as one line.
    (["launch/train_autoencoder.py", "data.urls={corrupt}", "run_dir={out}", "preset=tiny", "data.resolution=16",
      "batch_per_rank=4"],
     "cannot decode image {corrupt}/bad-000000.tar:00000003"),
])
def test_bad_input_gives_one_line_errors(args, message, tiny_shards, tiny_cache, tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt"
    write_shards(({"__key__": f"{i:08d}", "png": b"\x89PNG not really" if i == 3 else _png(), "txt": b"x"}
                  for i in range(8)), str(corrupt), per_shard=8, prefix="bad")
    subs = {"out": tmp_path / "out", "empty": tmp_path / "empty", "shards": tiny_shards, "novae": tmp_path / "no-vae",
            "corrupt": corrupt, "cache": tiny_cache}
    args = [a.format(**subs) for a in args]
    message = message.format(**subs)
    if args[0] == "launch/train_autoencoder.py":
        proc = run_cmd([PY, *args], check=False, timeout=120)
        code, err = proc.returncode, proc.stderr
        assert "Traceback" not in err, err[-2000:]
    else:
        code, _, err = run_script(args[0], args[1:], capfd)
    assert code != 0
    assert message in err, err[-2000:]


def test_export_writes_a_folder_diffusers_loads(pipeline, tmp_path):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    root, *_ = pipeline
    out = run_cmd([PY, "launch/export.py", "--run", f"{root}/unet", "--out", str(tmp_path / "export")])
    assert f"exported: {tmp_path / 'export'}" in out.stdout
    info = json.load(open(tmp_path / "export" / "ldm.json"))
    assert info["prediction_type"] == "epsilon" and info["vae"]["folder"] == "vae" and info["weights"] == "ema"
    x, t, ctx = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.randn(2, 32, 64)
    # The EMA weights by default, the trained ones on request; each reproduces its checkpoint copy.
    run_cmd([PY, "launch/export.py", "--run", f"{root}/unet", "--out", str(tmp_path / "raw"), "--weights", "raw"])
    outputs = {}
    for folder, export in (("ema_unet", "export"), ("unet", "raw")):
        exported = UNet2DConditionModel.from_pretrained(tmp_path / export / "unet")
        trained = UNet2DConditionModel.from_pretrained(os.path.join(info["checkpoint"], folder))
        outputs[folder] = exported(x, t, ctx).sample
        torch.testing.assert_close(outputs[folder], trained(x, t, ctx).sample)
    assert not torch.allclose(outputs["ema_unet"], outputs["unet"])
    assert DDPMScheduler.from_pretrained(tmp_path / "export" / "scheduler").config.prediction_type == "epsilon"
    AutoencoderKL.from_pretrained(tmp_path / "export" / "vae")
    # A complete pipeline: the OpenCLIP tower converted to a transformers CLIP text model, and the same
    # images as sample.py for the same prompt, seed, initial latents, scheduler and guidance.
    from test_pretrained import _same_pictures

    ours, theirs = _same_pictures(root / "unet", tmp_path / "export")
    assert ours.shape == theirs.shape == (2, 16, 16, 3) and abs(ours - theirs).max() <= 1.0
    again = run_cmd([PY, "launch/export.py", "--run", f"{root}/unet", "--out", str(tmp_path / "export")], check=False)
    assert again.returncode != 0 and "is not empty" in again.stderr and "Traceback" not in again.stderr
