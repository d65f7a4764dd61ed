"""UNet training under the real DeepSpeed launcher (CPU ranks, gloo), and exact resume."""
import os

from safetensors.torch import load_file

from conftest import PY, free_port, run_cmd
from trainer import checkpoint
from trainer.metrics import read_log

DEEPSPEED = os.path.join(os.path.dirname(PY), "deepspeed")


def _args(run_dir, cache, *extra):
    return ["launch/train_unet.py", f"run_dir={run_dir}", f"data.urls={cache}", "model=tiny", "batch_per_rank=8",
            "lr=0.002", "warmup_samples=32", *extra]


def test_deepspeed_two_ranks_zero2_loss_decreases(tiny_cache, tmp_path):
    run_dir = tmp_path / "run"
    run_cmd([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()),
             *_args(run_dir, tiny_cache, "zero_stage=2", "total_samples=1280", "log_every_samples=16",
                    "checkpoint_every_samples=640")])
    losses = [r["loss"] for r in read_log(run_dir / "log.jsonl")]
    assert len(losses) == 80  # 1280 samples / (8 per rank x 2 ranks), logged every step
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    final = checkpoint.latest(str(run_dir))
    assert final.endswith("step_000000080")
    assert os.path.exists(os.path.join(final, "unet", "diffusion_pytorch_model.safetensors"))
    assert checkpoint.complete_tags(str(run_dir)) == ["step_000000040", "step_000000080"]
    assert os.path.getsize(run_dir / "loss.png") > 1000


def test_resume_reproduces_the_uninterrupted_run(tiny_cache, tmp_path):
    common = ("zero_stage=1", "grad_accum=2", "data.num_workers=2", "total_samples=384",
              "checkpoint_every_samples=64", "log_every_samples=16")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cmd([PY, *_args(straight, tiny_cache, *common)])
    # Stop after 10 of 24 steps: the checkpoint at step 10 is written on the way out.
    run_cmd([PY, *_args(resumed, tiny_cache, *common, "stop_after_samples=160")])
    assert checkpoint.latest(str(resumed)).endswith("step_000000010")
    out = run_cmd([PY, *_args(resumed, tiny_cache, *common)])
    assert "resuming from" in out.stdout and "step 10" in out.stdout

    a, b = read_log(straight / "log.jsonl"), read_log(resumed / "log.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 25))
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5, (ra, rb)
        assert ra["lr"] == rb["lr"]
    wa = load_file(os.path.join(checkpoint.latest(str(straight)), "unet", "diffusion_pytorch_model.safetensors"))
    wb = load_file(os.path.join(checkpoint.latest(str(resumed)), "unet", "diffusion_pytorch_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() <= 1e-6, k

    # The same run directory with a different config is refused, in one line.
    bad = run_cmd([PY, *_args(resumed, tiny_cache, *common[:-1], "log_every_samples=32")], check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert f"run directory {resumed} holds a different config (log_every_samples" in bad.stderr


def test_zero3_checkpoint_holds_the_full_gathered_weights(tiny_cache, tmp_path):
    """Under ZeRO-3 each rank holds a shard of every parameter; the diffusers export in the
    checkpoint must be gathered (DeepSpeed #2056: a plain state_dict() is empty tensors)."""
    from diffusers import UNet2DConditionModel

    run_dir = tmp_path / "run"
    run_cmd([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()),
             *_args(run_dir, tiny_cache, "zero_stage=3", "total_samples=320", "log_every_samples=16",
                    "checkpoint_every_samples=320")])
    losses = [r["loss"] for r in read_log(run_dir / "log.jsonl")]
    assert sum(losses[-5:]) < sum(losses[:5])
    unet = UNet2DConditionModel.from_pretrained(os.path.join(checkpoint.latest(str(run_dir)), "unet"))
    params = dict(unet.named_parameters())
    assert all(p.numel() > 0 for p in params.values())
    assert params["conv_in.weight"].shape == (32, 4, 3, 3) and params["conv_in.weight"].abs().sum() > 0


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
