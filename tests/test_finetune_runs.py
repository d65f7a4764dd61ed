"""#29: runs that behave as a user expects: a failed start does not lock the folder, total_samples
may grow on resume (not shrink)."""
from __future__ import annotations

import pytest

from conftest import PY, run_cmd
from trainer.core.metrics import read_log


def _train(run_dir, cache, *extra, check=True):
    return run_cmd([PY, "launch/train_unet.py", f"run_dir={run_dir}", f"data.urls={cache}", "model=tiny",
                    "batch_per_rank=8", "warmup_samples=8", "log_every_samples=16", "checkpoint_every_samples=32",
                    "wandb=disabled", "data.num_workers=0", *extra], check=check, timeout=600)


def test_a_failed_start_does_not_lock_the_run_folder(tiny_cache, tmp_path):
    run_dir = tmp_path / "run"
    # What the cache can answer is refused before config.yaml is written, and by --dry-run alike.
    early = _train(run_dir, tiny_cache, "total_samples=32", "random_flip=true", check=False)
    assert early.returncode != 0 and "random_flip needs a cache made with flip=true" in early.stderr
    assert not (run_dir / "config.yaml").exists()
    dry = run_cmd([PY, "launch/train_unet.py", "--dry-run", f"run_dir={run_dir}", f"data.urls={tiny_cache}",
                   "model=tiny", "random_flip=true"], check=False, timeout=300)
    assert dry.returncode != 0 and dry.stderr.strip().splitlines()[-1] == (
        f"error: random_flip needs a cache made with flip=true; {tiny_cache} has none")
    # A value found bad later (the loader's streams) fails after config.yaml is written: the corrected
    # command is not refused as a different config.
    late = _train(run_dir, tiny_cache, "total_samples=32", "data.virtual_ranks=1000", check=False)
    assert late.returncode != 0 and "fewer than the 1000 data streams" in late.stderr
    assert (run_dir / "config.yaml").exists()
    good = _train(run_dir, tiny_cache, "total_samples=32")
    assert "was written by a start that made no checkpoint; replaced by this config (data.virtual_ranks" in good.stdout
    assert "virtual_ranks: 0" in (run_dir / "config.yaml").read_text()
    # The default tracker (wandb, here disabled) writes no TensorBoard events and no wandb folder.
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "wandb").exists()
    # Once a checkpoint exists the folder binds: another config is refused.
    again = _train(run_dir, tiny_cache, "total_samples=32", "lr=0.5", check=False)
    assert again.returncode != 0 and "holds a different config (lr:" in again.stderr


@pytest.fixture(scope="module")
def grown_run(tiny_cache, tmp_path_factory):
    """A run of 32 samples (with an EMA), then resumed with total_samples=64: (run_dir, the resume's stdout)."""
    run_dir = tmp_path_factory.mktemp("grown") / "run"
    _train(run_dir, tiny_cache, "total_samples=32", "ema_halflife_samples=64")
    return run_dir, _train(run_dir, tiny_cache, "total_samples=64", "ema_halflife_samples=64")


def test_total_samples_may_grow_on_resume_and_not_shrink(grown_run, tiny_cache):
    run_dir, grown = grown_run
    assert "total_samples grew from 32 to 64: training continues to the new end" in grown.stdout
    assert "the cosine schedule is stretched to it" in grown.stdout
    rows = [r for r in read_log(str(run_dir / "log.jsonl")) if "loss" in r]
    assert [r["samples"] for r in rows] == [16, 32, 48, 64]
    shrunk = _train(run_dir, tiny_cache, "total_samples=48", "ema_halflife_samples=64", check=False)
    assert shrunk.returncode != 0 and "total_samples may grow on resume" in shrunk.stderr
    assert "Traceback" not in shrunk.stderr


@pytest.mark.parametrize("old, new, grows", [(10, 20, True), (20, 10, False)])
def test_save_resolved_lets_a_grow_key_grow(tmp_path, old, new, grows):
    import dataclasses

    from trainer.core.config import ConfigError, save_resolved

    @dataclasses.dataclass
    class Job:
        steps: int = 0  # length
        lr: float = 0.1  # rate

    save_resolved(Job(steps=old), str(tmp_path), grow=("steps",))
    if grows:
        save_resolved(Job(steps=new), str(tmp_path), grow=("steps",))
    else:
        with pytest.raises(ConfigError, match="steps may grow on resume"):
            save_resolved(Job(steps=new), str(tmp_path), grow=("steps",))
    notes = []
    save_resolved(Job(steps=1, lr=0.2), str(tmp_path), grow=("steps",), bound=False, say=notes.append)
    assert notes and "replaced by this config" in notes[0]


def test_accelerate_launch_settings_the_job_would_ignore_are_refused_in_one_line(tiny_cache, tmp_path):
    import os

    from conftest import ROOT
    from trainer.core.dist import check_accelerate
    from trainer.core.errors import LaunchError

    check_accelerate({"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "True", "ACCELERATE_DYNAMO_BACKEND": "NO"})
    for var, value, instead in (("ACCELERATE_USE_DEEPSPEED", "true", "zero_stage="),
                                ("ACCELERATE_USE_FSDP", "true", "zero_stage=3"),
                                ("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR", "compile=true")):
        with pytest.raises(LaunchError, match=f"accelerate launch set {var}={value}, .*use {instead}"):
            check_accelerate({var: value})
    accelerate = os.path.join(os.path.dirname(PY), "accelerate")
    proc = run_cmd([accelerate, "launch", "--num_processes", "1", "--mixed_precision", "bf16", "--cpu",
                    os.path.join(ROOT, "launch/train_unet.py"), f"run_dir={tmp_path / 'run'}", f"data.urls={tiny_cache}",
                    "model=tiny"], check=False, timeout=300)
    assert proc.returncode != 0
    assert ("error: accelerate launch set ACCELERATE_MIXED_PRECISION=bf16, which this job does not read: use "
            "precision=bf16|fp16|fp32 in the job's config") in proc.stderr


def test_init_from_starts_a_new_run_from_another_runs_weights(grown_run, tiny_cache, tmp_path):
    """#29: init_from=RUN takes RUN's newest checkpoint's EMA weights (its trained ones without an EMA) with a
    fresh optimizer and schedule; a UNet of another architecture is refused in one line."""
    from safetensors.torch import load_file

    from models.unet import build_unet
    from trainer.core import checkpoint
    from trainer.core.errors import ConfigError
    from trainer.unet.job import UNetJob
    from trainer.unet.pretrained import init_from_run

    first = grown_run[0]
    second = tmp_path / "second"
    out = _train(second, tiny_cache, "total_samples=8", f"init_from={first}", "lr=1e-12", "warmup_samples=0",
                 "ema_halflife_samples=0").stdout
    src = checkpoint.latest(str(first / "checkpoints"))
    assert f"init_from: the EMA weights of {src}; a fresh optimizer, schedule and EMA" in out
    want = load_file(f"{src}/ema_unet/diffusion_pytorch_model.safetensors")
    got = load_file(f"{checkpoint.latest(str(second / 'checkpoints'))}/unet/diffusion_pytorch_model.safetensors")
    assert want.keys() == got.keys()
    assert max(float((want[k] - got[k]).abs().max()) for k in want) < 1e-6  # one step at lr 1e-12
    other = _train(tmp_path / "third", tiny_cache, "total_samples=8", f"init_from={first}", "model=demo", check=False)
    assert other.returncode != 0 and "Traceback" not in other.stderr
    assert f"init_from={first}: " in other.stderr and "holds another UNet architecture" in other.stderr
    with pytest.raises(ConfigError, match=f"init_from={tmp_path / 'nowhere'} holds no complete checkpoint"):
        init_from_run(build_unet("tiny", 4, 4, 64), UNetJob(init_from=str(tmp_path / "nowhere")))


def test_tensorboard_tracker_writes_the_loss_and_wandb_settings_keep_working(tiny_cache, tmp_path):
    """#29: tracker=tensorboard writes run_dir/tensorboard event files holding the loss (and no wandb run);
    the default tracker=wandb with wandb=disabled writes neither."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    _train(run, tiny_cache, "total_samples=32", "tracker=tensorboard", "wandb=offline")
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    losses = acc.Scalars("loss")
    assert [e.step for e in losses] == [2, 4]
    rows = [r for r in read_log(str(run / "log.jsonl")) if "loss" in r]
    assert [round(e.value, 5) for e in losses] == [round(r["loss"], 5) for r in rows]
    assert "lr" in acc.Tags()["scalars"] and not (run / "wandb").exists()
    from trainer.core.config import ConfigError, load_config
    from trainer.unet.job import UNetJob

    with pytest.raises(ConfigError, match="tracker must be one of wandb, tensorboard, none, got 'mlflow'"):
        load_config(UNetJob, None, ["data.urls=x", "tracker=mlflow"]).validate()
