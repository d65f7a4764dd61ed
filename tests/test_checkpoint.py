"""Checkpoints on S3 (moto on 127.0.0.1) and elastic resume through DeepSpeed's universal
checkpoint, with a tiny MLP under the real launcher (tests/ckpt_driver.py, CPU ranks, gloo).

The driver's global batch is the same at every world size, so a run resumed at another
world size must continue with the losses the original run had.
"""
import json
import os
import pickle

import pytest

from conftest import PY, ranks_of, run_cmd
from trainer.core import checkpoint
from trainer.core.checkpoint_deepspeed import CONVERTED, EnginePart, to_universal
from trainer.core.checkpoint_trust import verify_files

DRIVER = "tests/ckpt_driver.py"


def _driver(ranks: int, *args) -> list[str]:
    if ranks == 1:
        return [PY, DRIVER, *map(str, args)]
    return [*ranks_of(ranks), DRIVER, *map(str, args)]


def _losses(log, zero: int | None = None) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, open(log)) if zero is None or r["zero"] == zero}


def _close(a: dict, b: dict, steps, tol: float) -> None:
    for s in steps:
        assert abs(a[s] - b[s]) <= tol, (s, a[s], b[s])


@pytest.fixture(scope="module")
def s3_run(s3_endpoint, tmp_path_factory):
    """2 ranks, ZeRO-2, 8 steps saved every 2 to S3 (keep 2); the save at step 8 dies after
    every rank uploaded its files and before rank 0 wrote the marker."""
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir("ckpt-tests")
    tmp = tmp_path_factory.mktemp("s3run")
    root = "s3://ckpt-tests/run"
    common = ("--root", root, "--endpoint-url", s3_endpoint, "--zero", 2, "--local-dir", tmp / "local")
    out = run_cmd(_driver(2, *common, "--steps", 8, "--save-every", 2, "--crash-before-marker", 8,
                          "--loss-log", tmp / "straight.jsonl"), check=False)
    assert out.returncode != 0, out.stdout[-2000:]
    return root, s3_endpoint, common, _losses(tmp / "straight.jsonl"), tmp


def _moto_keys(bucket: str) -> dict:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    return dict(s3_backends[DEFAULT_ACCOUNT_ID]["global"].buckets[bucket].keys.items())


def test_s3_checkpoint_counts_only_with_its_marker_written_last(s3_run):
    root, endpoint, _, losses, tmp = s3_run
    assert sorted(losses) == list(range(1, 9))
    assert checkpoint.complete_tags(root, endpoint) == ["samples_000000000032", "samples_000000000048"]  # 16 pruned
    assert checkpoint.latest(root, endpoint) == f"{root}/samples_000000000048"
    assert checkpoint.info(f"{root}/samples_000000000048", endpoint) == {"step": 6, "samples": 48, "world_size": 2, "zero_stage": 2}

    keys = _moto_keys("ckpt-tests")
    assert not any(k.startswith("run/samples_000000000016/") for k in keys)
    interrupted = sorted(k for k in keys if k.startswith("run/samples_000000000064/"))
    assert interrupted == ["run/samples_000000000064/STARTED", "run/samples_000000000064/mp_rank_00_model_states.pt",
                           "run/samples_000000000064/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                           "run/samples_000000000064/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    for tag in ("samples_000000000032", "samples_000000000048"):
        files = {k: v.last_modified for k, v in keys.items() if k.startswith(f"run/{tag}/")}
        marker = files.pop(f"run/{tag}/{checkpoint.MARKER}")
        assert len(files) == 4 and marker >= max(files.values())  # STARTED first, then 3 DeepSpeed files
    with pytest.raises(checkpoint.CheckpointError, match=r"samples_000000000064 is not a complete checkpoint"):
        checkpoint.info(f"{root}/samples_000000000064", endpoint)

    local = checkpoint.fetch(f"{root}/samples_000000000048", local_dir=str(tmp / "fetched"), endpoint_url=endpoint)
    assert local.startswith(str(tmp / "fetched")) and os.path.basename(local) == "samples_000000000048"
    assert sorted(os.listdir(local)) == [checkpoint.MARKER, checkpoint.STARTED, "mp_rank_00_model_states.pt",
                                         "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                         "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_zero2_on_s3_resumes_on_one_rank_through_a_universal_checkpoint(s3_run):
    root, endpoint, common, straight, tmp = s3_run
    run_cmd(_driver(1, *common, "--steps", 8, "--resume-from", f"{root}/samples_000000000048", "--universal",
                    "--loss-log", tmp / "elastic.jsonl"))
    # the weights (step 7) and the optimizer state (step 8) are the 2-rank run's
    _close(straight, _losses(tmp / "elastic.jsonl"), (7, 8), 1e-5)
    keys = _moto_keys("ckpt-tests")
    assert "run/samples_000000000048/universal/CONVERTED" in keys
    assert "run/samples_000000000048/universal/zero/0.weight/exp_avg.pt" in keys
    # converted once: a second call finds it
    assert to_universal(f"{root}/samples_000000000048", endpoint) == f"{root}/samples_000000000048/universal"
    assert _moto_keys("ckpt-tests")["run/samples_000000000048/universal/CONVERTED"].last_modified == \
        keys["run/samples_000000000048/universal/CONVERTED"].last_modified


def test_resume_from_s3_skips_the_interrupted_save_and_continues_exactly(s3_run):
    root, endpoint, common, straight, tmp = s3_run
    out = run_cmd(_driver(2, *common, "--steps", 10, "--save-every", 2, "--keep-last", 3, "--resume",
                          "--loss-log", tmp / "resumed.jsonl"))
    assert f"resumed from {root}/samples_000000000048 at step 6" in out.stdout
    resumed = _losses(tmp / "resumed.jsonl")
    assert sorted(resumed) == [7, 8, 9, 10]
    _close(straight, resumed, (7, 8), 1e-6)
    # the new save of step 8 replaced the interrupted one's files, its marker came last
    assert checkpoint.complete_tags(root, endpoint) == ["samples_000000000048", "samples_000000000064", "samples_000000000080"]
    files = {k: v.last_modified for k, v in _moto_keys("ckpt-tests").items() if k.startswith("run/samples_000000000064/")}
    assert max(files, key=files.get) == f"run/samples_000000000064/{checkpoint.MARKER}" and len(files) == 5  # + STARTED


def test_zero3_and_zero0_saved_by_two_ranks_resume_on_one(tmp_path):
    """ZeRO-3 through a universal checkpoint; ZeRO-0 as it is: it keeps the whole optimizer
    state in the model file, so `load(universal=True)` makes no conversion for it."""
    run_cmd(_driver(2, "--root", tmp_path, "--zero", "3,0", "--steps", 6, "--save-every", 4,
                    "--loss-log", tmp_path / "a.jsonl"))
    z3, z0 = (checkpoint.latest(str(tmp_path / f"zero{z}" / "checkpoints")) for z in (3, 0))
    assert checkpoint.info(z3)["zero_stage"] == 3
    assert sorted(n for n in os.listdir(z0) if n.endswith(".pt")) == ["mp_rank_00_model_states.pt"]

    class Engine:  # load() checks the marker against the engine before DeepSpeed sees anything
        def __init__(self, stage):
            self.stage = stage

        def zero_optimization_stage(self):
            return self.stage

    with pytest.raises(checkpoint.CheckpointError, match=f"^checkpoint {z3} was written by 2 ranks at ZeRO-3, "
                       "this job has 1: load it with universal=True$"):
        checkpoint.load(z3, [EnginePart(Engine(3))])
    with pytest.raises(checkpoint.CheckpointError, match="written at ZeRO-3, this engine runs ZeRO-2: resume it at "):
        checkpoint.load(z3, [EnginePart(Engine(2), universal=True)])

    run_cmd(_driver(1, "--root", tmp_path, "--zero", "3,0", "--steps", 6, "--resume", "--universal",
                    "--loss-log", tmp_path / "b.jsonl"))
    for zero in (3, 0):
        _close(_losses(tmp_path / "a.jsonl", zero), _losses(tmp_path / "b.jsonl", zero), (5, 6), 1e-5)
    assert os.path.exists(os.path.join(z3, "universal", CONVERTED))
    assert not os.path.exists(os.path.join(z0, "universal")) and to_universal(z0) == z0

    # the converted files are checked with the restricted unpickler too
    target = os.path.join(z3, "universal", "zero", "0.weight", "fp32.pt")

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    with open(target, "wb") as f:
        pickle.dump({"param": Payload()}, f, protocol=2)
    with pytest.raises(checkpoint.CheckpointError, match=f"refusing checkpoint file {target}: it holds posix.system"):
        verify_files(os.path.join(z3, "universal"), 0)
