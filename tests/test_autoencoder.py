"""Short kl_gan / vq_gan runs of the first-stage job through the launch script: they resume exactly
(locally, from S3, on two ranks), checkpoint in the common format (older layouts and planted pickles
refused), export the autoencoder alone, and load in the cache job."""
import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import PY, ROOT
from models.autoencoder import encode_moments, load_autoencoder
from trainer.core import checkpoint
from trainer.core import config as config_lib
from trainer.autoencoder.job import AutoencoderJob
from trainer.autoencoder.train import train_autoencoder
from test_autoencoder_losses import _images



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
    ema, raw = (load_file(run / "checkpoints" / ckpt / f)
                for f in ("ema/diffusion_pytorch_model.safetensors", "model.safetensors"))
    assert exported.keys() == raw.keys()  # no discriminator, no LPIPS
    assert all(torch.equal(exported[k], ema[k]) for k in exported)
    assert any(not torch.equal(exported[k], raw[k]) for k in exported)
    assert os.path.exists(run / "checkpoints" / ckpt / "discriminator.safetensors")


def test_resume_from_s3_skips_an_interrupted_save_and_equals_the_uninterrupted_run(runs, tiny_shards, s3_bucket,
                                                                                   tmp_path, monkeypatch):
    """kl_gan with checkpoint_url on S3 (moto): 2 steps, a save of step 4 that died before its
    marker, then the rest. The resumed run ignores the interrupted save, resumes from the
    complete one, replaces the interrupted save with its own, and its log and export equal
    the uninterrupted local run's (the `runs` fixture's reference)."""
    import s3fs

    url, endpoint = s3_bucket
    root = f"{url}/ae"
    monkeypatch.setenv("CHECKPOINT_LOCAL_DIR", str(tmp_path / "node"))
    s3 = ("checkpoint_url=" + root, "checkpoint_endpoint_url=" + endpoint, "keep_last=1")
    stopped = _in_process("kl_gan", tmp_path / "run", tiny_shards, *s3, "stop_after_samples=8")
    assert stopped == f"{root}/samples_000000000008"
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing on local disk but the staging folder
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    names = sorted(p.split("samples_000000000008/")[1] for p in fs.find(stopped))
    assert names == ["COMPLETE", "STARTED", "discriminator.safetensors", "model.safetensors", "training_state.pt"]
    assert checkpoint.info(stopped, endpoint) == {"step": 2, "samples": 8, "world_size": 1}
    fs.pipe(f"{root}/samples_000000000016/STARTED", b"")  # an interrupted save: started, no COMPLETE
    fs.pipe(f"{root}/samples_000000000016/model.safetensors", b"half-written")
    assert checkpoint.latest(root, endpoint) == stopped

    out = _in_process("kl_gan", tmp_path / "run", tiny_shards, *s3)
    assert out == str(tmp_path / "run" / "export")
    assert checkpoint.complete_tags(root, endpoint) == ["samples_000000000016"]  # keep_last=1 pruned step 2
    ref, resumed = _losses(runs[0] / "kl_gan_ref" / "log.jsonl"), _losses(tmp_path / "run" / "log.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(ref, resumed):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["step"], k)
    wa = load_file(runs[0] / "kl_gan_ref" / "export" / "diffusion_pytorch_model.safetensors")
    wb = load_file(tmp_path / "run" / "export" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_checkpoint_of_the_older_layout_is_refused_in_one_line(tiny_shards, tmp_path):
    """The layout before the common checkpoint format: model.safetensors + optimizer.pt."""
    old = tmp_path / "run" / "checkpoints" / checkpoint.tag_for(8)
    os.makedirs(old)
    for name in ("model.safetensors", "optimizer.pt"):
        (old / name).write_bytes(b"old")
    (old / checkpoint.MARKER).write_text(json.dumps({"step": 2, "samples": 8}))
    with pytest.raises(checkpoint.CheckpointError) as e:
        _in_process("kl_gan", tmp_path / "run", tiny_shards)
    assert str(e.value) == (f"checkpoint {old} is in the older autoencoder layout (model.safetensors + optimizer.pt), "
                            "which this version does not read: retrain in a new run_dir, or resume and export it "
                            "with the previous version")


def test_autoencoder_parts_are_verified_before_anything_loads(tmp_path):
    """A training_state.pt holding an object other than tensors and plain data is refused by
    the restricted unpickler, and no part (the weights first in the list) was loaded."""
    import pickle

    model, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    canary = tmp_path / "canary"
    path = checkpoint.save(str(tmp_path / "checkpoints"), 8, [checkpoint.SafetensorsPart("model", other),
                                                              checkpoint.TorchState("training_state", {"step": 2})])

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    with open(os.path.join(path, "training_state.pt"), "wb") as f:
        pickle.dump({"step": Payload()}, f, protocol=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(checkpoint.CheckpointError, match="^refusing checkpoint file .*training_state.pt: it holds "
                       "posix.system, which this trainer never writes; it was not loaded$"):
        checkpoint.load(path, [checkpoint.SafetensorsPart("model", model), checkpoint.TorchState("training_state")])
    assert not canary.exists() and all(torch.equal(before[k], model.state_dict()[k]) for k in before)


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
    state = torch.load(os.path.join(checkpoint.latest(str(tmp_path / "resumed")), "training_state.pt"),
                       weights_only=True)
    assert state["world_size"] == 2 and len(state["loaders"]) == 2
