"""UNet training under the real DeepSpeed launcher (CPU ranks, gloo), and exact resume."""
import os

import pytest
from safetensors.torch import load_file

from conftest import DEEPSPEED, PY, UNET_TWO_RANKS, free_port, run_cmd
from trainer.core import checkpoint
from trainer.core.metrics import read_log



def _args(run_dir, cache, *extra):
    return ["launch/train_unet.py", f"run_dir={run_dir}", f"data.urls={cache}", "model=tiny", "batch_per_rank=8",
            "lr=0.002", "warmup_samples=32", *extra]


# One run per ZeRO stage, 2 ranks under the deepspeed launcher, otherwise the same config
# (ZeRO-2's is conftest's two_rank_run, shared with the multi-node tests, 60 steps); the others
# stop at 30 steps (ZeRO-0 steps take twice as long on gloo).
STAGE_ARGS = tuple(a for a in UNET_TWO_RANKS if a not in _args("", "")[1:] and not a.startswith("zero_stage=")
                   and not a.startswith("total_samples=")) + ("total_samples=480",)
STAGE_EXTRA = {0: ("channels_last=true",),  # NHWC weights (ZeRO-0), gradients all-reduced through one flat copy
               1: ("offload_optimizer=true",),  # ZeRO-Offload: optimizer state in host memory
               3: ("validate_every_samples=240", "validation_prompts=[a red circle]", "validation_steps=2",
                   "validation_guidance=3", "validation_negative_prompt=a blue square")}
STEPS = {0: 30, 1: 30, 2: 60, 3: 30}


def _launch(run_dir, cache, *extra, port=None):
    return [DEEPSPEED, "--num_gpus", "2", "--master_port", str(port or free_port()), *_args(run_dir, cache, *extra)]


def _weights(run_dir, folder="unet", ckpt=None):
    ckpt = ckpt or checkpoint.latest(str(run_dir))
    return load_file(os.path.join(ckpt, folder, "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def stage_runs(tiny_cache, two_rank_run, tmp_path_factory):
    runs, ports = {2: two_rank_run[0]}, [two_rank_run[1]]
    for stage in (0, 1, 3):
        runs[stage] = tmp_path_factory.mktemp(f"zero{stage}") / "run"
        ports.append(free_port())
        run_cmd(_launch(runs[stage], tiny_cache, f"zero_stage={stage}", *STAGE_ARGS, *STAGE_EXTRA.get(stage, ()),
                        port=ports[-1]))
    runs["ports"] = ports
    return runs


def test_cpu_runs_leave_nothing_in_dev_shm(stage_runs):
    """DeepSpeed's CPU backend would map a 69 MB /dev/shm buffer per rank under its launcher and
    never unlink it (trainer/core/dist.py keeps it from doing so): four 2-rank runs would leave 550 MB
    of RAM behind, and a CI machine that runs the suite fills up."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this system")
    left = [n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_")
            and any(f"_{port}_" in n for port in stage_runs["ports"])]
    assert left == []


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_zero_stage_trains_and_checkpoints(stage_runs, stage):
    run_dir = stage_runs[stage]
    rows = [r for r in read_log(run_dir / "log.jsonl") if "loss" in r]
    losses = [r["loss"] for r in rows]
    assert len(losses) == STEPS[stage]  # samples / (8 per rank x 2 ranks), logged every step
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    assert rows[-1]["nonfinite_steps"] == 0 and rows[-1]["images_per_s"] > 0 and rows[-1]["tflops_per_device"] > 0
    assert all(r["grad_norm"] > 0 for r in rows)  # every stage, also ZeRO-0 in fp32 where DeepSpeed drops it
    end = STEPS[stage] * 16
    assert checkpoint.complete_tags(str(run_dir)) == [checkpoint.tag_for(end - 160), checkpoint.tag_for(end)]
    # Every parameter saved in full, also under ZeRO-3 (DeepSpeed #2056: a plain state_dict() is empty there).
    raw, ema = _weights(run_dir), _weights(run_dir, "ema_unet")
    assert raw.keys() == ema.keys() and raw["conv_in.weight"].shape == (32, 4, 3, 3)
    assert all(t.numel() > 0 and t.isfinite().all() for t in ema.values())
    assert max((raw[k] - ema[k]).abs().max() for k in raw) > 1e-3  # the average lags the weights
    assert os.path.getsize(run_dir / "loss.png") > 1000
    if stage == 3:  # validation grids sampled with the gathered EMA weights
        assert sorted(os.listdir(run_dir / "samples")) == ["step_000000015", "step_000000015.png",
                                                           "step_000000030", "step_000000030.png"]
        full_size = run_dir / "samples" / "step_000000030"  # each image at its own size beside the grid
        assert sorted(os.listdir(full_size)) == [f"p000_{c:03d}.png" for c in range(4)] + ["prompts.json"]


def test_ema_under_zero3_equals_ema_under_zero0(stage_runs):
    """Under ZeRO-3 each rank averages its own slice of every parameter; gathered, the
    average must be the one ZeRO-0 keeps of the full tensors (DeepSpeed #2056, #6987)."""
    e0, e3 = _weights(stage_runs[0], "ema_unet"), _weights(stage_runs[3], "ema_unet")
    w0 = _weights(stage_runs[0])
    for k in e0:
        assert (e0[k] - e3[k]).abs().max() <= 1e-4 + 1e-3 * e0[k].abs().max(), k
    assert max((e0[k] - w0[k]).abs().max() for k in e0) > 1e-3


def test_nan_losses_stop_the_run_after_k_consecutive_steps(tiny_cache, tmp_path):
    """lr=1e30 blows the weights up after one step; every later loss is inf/NaN and each
    such step is skipped, so the weights stay finite; after 3 the run stops in one line."""
    run_dir = tmp_path / "run"
    out = run_cmd([PY, *_args(run_dir, tiny_cache, "lr=1e30", "warmup_samples=0", "lr_schedule=constant",
                              "total_samples=320", "checkpoint_every_samples=8", "log_every_samples=8",
                              "max_nonfinite_steps=3")], check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "error: loss or gradients were NaN/inf for 3 consecutive steps (up to step 4)" in out.stderr, out.stderr[-1000:]
    assert "newest complete checkpoint: " + str(run_dir / "checkpoints" / "samples_000000000024") in out.stderr
    assert all(t.isfinite().all() for t in _weights(run_dir).values())
    assert [r["nonfinite_steps"] for r in read_log(run_dir / "log.jsonl")][-1] == 3


def test_resume_reproduces_the_uninterrupted_run(tiny_cache, tmp_path):
    # With every objective option on, so each of them is shown to resume exactly too.
    common = ("zero_stage=1", "grad_accum=2", "data.num_workers=2", "total_samples=384",
              "prediction_type=v_prediction", "zero_terminal_snr=true", "min_snr_gamma=5", "offset_noise=0.1",
              "lr_schedule=linear", "checkpoint_every_samples=64", "log_every_samples=16")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cmd([PY, *_args(straight, tiny_cache, *common)])
    # Stop after 10 of 24 steps: the checkpoint at step 10 is written on the way out.
    run_cmd([PY, *_args(resumed, tiny_cache, *common, "stop_after_samples=160")])
    assert checkpoint.latest(str(resumed)).endswith("samples_000000000160")
    out = run_cmd([PY, *_args(resumed, tiny_cache, *common)])
    assert "resuming from" in out.stdout and "step 10" in out.stdout

    a, b = read_log(straight / "log.jsonl"), read_log(resumed / "log.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 25))
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5, (ra, rb)
        assert ra["lr"] == rb["lr"]
    for folder in ("unet", "ema_unet"):  # the EMA is saved and resumed with the checkpoint
        wa, wb = _weights(straight, folder), _weights(resumed, folder)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert (wa[k] - wb[k]).abs().max() <= 1e-6, (folder, k)

    # The same run directory with a different config is refused, in one line.
    bad = run_cmd([PY, *_args(resumed, tiny_cache, *common[:-1], "log_every_samples=32")], check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert f"run directory {resumed} holds a different config (log_every_samples" in bad.stderr


def test_a_checkpoint_with_a_malicious_pickle_is_refused_without_running_it(tiny_cache, tmp_path):
    import pickle

    run_dir, canary = tmp_path / "run", tmp_path / "canary"
    args = [PY, *_args(run_dir, tiny_cache, "total_samples=64", "checkpoint_every_samples=32", "stop_after_samples=32")]
    run_cmd(args)
    ckpt = checkpoint.latest(str(run_dir))

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    target = os.path.join(ckpt, "mp_rank_00_model_states.pt")
    for protocol, says in ((2, "it holds posix.system"), (4, "it is not plain tensor data")):
        with open(target, "wb") as f:
            pickle.dump({"module": Payload()}, f, protocol=protocol)
        out = run_cmd(args, check=False)
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert f"refusing checkpoint file {target}: {says}" in out.stderr, out.stderr[-1000:]
        assert not canary.exists()


def test_elastic_resume_onto_more_ranks_then_back_keeps_the_newest_checkpoint(tiny_cache, tmp_path):
    """1 rank -> 2 ranks -> requeue on 1 rank, keep_last=2. The step falls when the global
    batch grows (20 steps of 8 = 10 steps of 16); checkpoints named by samples keep growing,
    so no new checkpoint is pruned or overwrites one, and the newest is the furthest."""
    run_dir = tmp_path / "run"
    common = ("zero_stage=2", "total_samples=320", "log_every_samples=16", "checkpoint_every_samples=32",
              "keep_last=2", "elastic_resume=true", "data.virtual_ranks=2")

    def newest_is_furthest(samples):
        latest = checkpoint.latest(str(run_dir))
        assert checkpoint.info(latest)["samples"] == samples, (latest, checkpoint.complete_tags(str(run_dir)))
        tags = checkpoint.complete_tags(str(run_dir))
        assert [checkpoint.info(str(run_dir / "checkpoints" / t))["samples"] for t in tags] == [samples - 32, samples]

    run_cmd([PY, *_args(run_dir, tiny_cache, *common, "stop_after_samples=160")])
    newest_is_furthest(160)
    out = run_cmd(_launch(run_dir, tiny_cache, *common, "stop_after_samples=96"))
    assert "at step 10 (elastic: written by 1 ranks, 160 samples)" in out.stdout
    newest_is_furthest(256)
    out = run_cmd([PY, *_args(run_dir, tiny_cache, *common)])
    assert "at step 32 (elastic: written by 2 ranks, 256 samples)" in out.stdout
    newest_is_furthest(320)
    assert checkpoint.complete_tags(str(run_dir)) == [checkpoint.tag_for(288), checkpoint.tag_for(320)]
    rows = [r for r in read_log(run_dir / "log.jsonl") if "loss" in r]
    assert [r["samples"] for r in rows] == list(range(16, 321, 16))


def test_checkpoints_on_s3_resume_sample_and_export(tiny_cache, s3_bucket, tmp_path):
    from diffusers import UNet2DConditionModel

    url, endpoint = s3_bucket
    run_dir = tmp_path / "run"
    args = [PY, *_args(run_dir, tiny_cache, "total_samples=128", "checkpoint_every_samples=32", "keep_last=2",
                       f"checkpoint_url={url}/unet-run", f"checkpoint_endpoint_url={endpoint}")]
    env = {"CHECKPOINT_LOCAL_DIR": str(tmp_path / "node-local")}
    run_cmd([*args, "stop_after_samples=64"], env=env)
    assert checkpoint.complete_tags(f"{url}/unet-run", endpoint) == ["samples_000000000032", "samples_000000000064"]
    assert not (run_dir / "checkpoints").exists()
    out = run_cmd(args, env=env)
    assert f"resuming from {url}/unet-run/samples_000000000064 at step 8" in out.stdout
    assert checkpoint.complete_tags(f"{url}/unet-run", endpoint) == ["samples_000000000096", "samples_000000000128"]
    run_cmd([PY, "launch/export.py", "--run", str(run_dir), "--out", str(tmp_path / "export")], env=env)
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "export" / "unet")
    fetched = checkpoint.fetch(f"{url}/unet-run/samples_000000000128", str(tmp_path / "check"), endpoint, parts=("ema_unet",))
    ema = load_file(os.path.join(fetched, "ema_unet", "diffusion_pytorch_model.safetensors"))
    for k, v in exported.state_dict().items():
        assert (v - ema[k]).abs().max() == 0, k
