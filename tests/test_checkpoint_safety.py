"""Untrusted checkpoints: object keys that would escape the download folder, symbolic links
inside a checkpoint, and a node-local folder that another user could plant files in.
Naming by samples: a complete checkpoint is never overwritten, and pruning keeps the newest."""
import json
import os
import pickle
import subprocess
import sys

import pytest

from conftest import PY, ROOT, ranks_of, run_cmd
from trainer.core import checkpoint
from trainer.core.checkpoint_deepspeed import EnginePart, to_universal

DRIVER = "tests/ckpt_driver.py"


class _Engine:
    """What `load` asks of an engine before DeepSpeed reads a file."""

    def __init__(self, stage):
        self.stage = stage

    def zero_optimization_stage(self):
        return self.stage


def _interrupted(path):
    """A save that stopped before its marker: the checkpointer's STARTED and a file."""
    os.makedirs(path, exist_ok=True)
    (path / checkpoint.STARTED).write_bytes(b"")
    (path / "half.pt").write_bytes(b"x")
    return path


def _fake_checkpoint(path, samples, **marker):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, checkpoint.MARKER), "w") as f:
        json.dump({"samples": samples, "world_size": 1, "zero_stage": 0, **marker}, f)
    return str(path)


# --- names and pruning ------------------------------------------------------------------------

def test_checkpoints_are_ordered_by_samples_and_pruning_never_drops_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    # Older layout: named by step, ordered by the samples in its marker (step 20 of 8 = 160 samples).
    _fake_checkpoint(root / "step_000000020", 160, step=20)
    _fake_checkpoint(root / checkpoint.tag_for(96), 96)
    _interrupted(root / checkpoint.tag_for(100))  # an interrupted save behind the newest: pruned
    _interrupted(root / checkpoint.tag_for(900))  # an interrupted save ahead: kept, never loaded
    os.makedirs(root / "step_000000004" / "unet")  # named like one, not a checkpointer's (an export): kept
    assert checkpoint.complete_tags(str(root)) == [checkpoint.tag_for(96), "step_000000020"]
    assert checkpoint.latest(str(root)) == str(root / "step_000000020")
    _fake_checkpoint(root / checkpoint.tag_for(256), 256)
    checkpoint.prune(str(root), keep_last=2)
    assert sorted(os.listdir(root)) == [checkpoint.tag_for(256), checkpoint.tag_for(900), "step_000000004",
                                        "step_000000020"]
    checkpoint.prune(str(root), keep_last=0)  # 0 still keeps the newest complete one
    assert checkpoint.complete_tags(str(root)) == [checkpoint.tag_for(256)]


def test_a_complete_checkpoint_is_never_overwritten(tmp_path):
    path = _fake_checkpoint(tmp_path / checkpoint.tag_for(64), 64)
    with pytest.raises(checkpoint.CheckpointError, match=f"^refusing to overwrite the complete checkpoint {path}:"):
        checkpoint.begin(path)
    assert os.path.exists(os.path.join(path, checkpoint.MARKER))
    interrupted = _interrupted(tmp_path / checkpoint.tag_for(72))
    checkpoint.begin(str(interrupted))  # an interrupted save is cleared for the new one
    assert sorted(os.listdir(interrupted)) == [checkpoint.STARTED]
    foreign = tmp_path / checkpoint.tag_for(80)
    os.makedirs(foreign)  # e.g. an export into a folder named like a checkpoint: never deleted, never written into
    (foreign / "model.safetensors").write_bytes(b"mine")
    with pytest.raises(checkpoint.CheckpointError, match=f"^refusing to save a checkpoint into {foreign}: that "
                                                          "folder was not written by a checkpointer"):
        checkpoint.begin(str(foreign))
    assert (foreign / "model.safetensors").read_bytes() == b"mine"


# --- S3 object keys ---------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["zero/../../../../escaped.pt", "zero//x.pt", "./x.pt"], ids=["dotdot", "empty", "dot"])
def test_crafted_keys_refused(s3_bucket, tmp_path, key):
    """A crafted bucket: `fetch` must not write anything outside its local folder."""
    import boto3

    url, endpoint = s3_bucket
    bucket = url.removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=endpoint)
    tag = checkpoint.tag_for(8)
    client.put_object(Bucket=bucket, Key=f"run/{tag}/{checkpoint.MARKER}", Body=b'{"samples": 8}')
    client.put_object(Bucket=bucket, Key=f"run/{tag}/{key}", Body=b"planted")
    local = tmp_path / "node" / "a" / "b" / "c"
    with pytest.raises(checkpoint.CheckpointError, match=f"^refusing checkpoint object {url}/run/{tag}/"):
        checkpoint.fetch(f"{url}/run/{tag}", local_dir=str(local), endpoint_url=endpoint)
    written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
    assert not any(open(p, "rb").read() == b"planted" for p in written), written


# --- symbolic links in a checkpoint --------------------------------------------------------------

def test_a_symlinked_folder_in_a_universal_checkpoint_is_refused_before_unpickling(tmp_path):
    """The pickle check walks real folders; DeepSpeed's universal loader follows links. A
    `universal/zero` that links to planted pickles must be refused, not loaded."""
    common = ("--root", tmp_path / "ckpt", "--zero", 2)
    run_cmd([*ranks_of(2), DRIVER, *map(str, common),
             "--steps", "2", "--save-every", "2"])
    ckpt = checkpoint.latest(str(tmp_path / "ckpt"))
    to_universal(ckpt)  # converted once, as an elastic resume would
    canary, evil = tmp_path / "canary", tmp_path / "elsewhere"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    # Each parameter's folder under universal/zero becomes a link to planted pickles (the walk
    # of the pickle check lists a linked folder but does not enter it).
    zero = os.path.join(ckpt, "universal", "zero")
    params = sorted(d for d in os.listdir(zero) if os.path.isdir(os.path.join(zero, d)))
    for param in params:
        for name in os.listdir(os.path.join(zero, param)):
            os.makedirs(evil / param, exist_ok=True)
            with open(evil / param / name, "wb") as f:
                pickle.dump({"param": Payload()}, f, protocol=2)
        os.rename(os.path.join(zero, param), os.path.join(tmp_path, f"real-{param}"))
        os.symlink(evil / param, os.path.join(zero, param))
    out = run_cmd([PY, DRIVER, *map(str, common), "--steps", "3", "--resume", "--universal"], check=False)
    assert out.returncode != 0 and not canary.exists(), out.stdout[-2000:]
    assert f"refusing checkpoint {ckpt}: {zero}/{params[0]} is a symbolic link" in out.stderr, out.stderr[-2000:]


def test_a_checkpoint_that_is_or_holds_a_link_is_refused(tmp_path):
    real = _fake_checkpoint(tmp_path / "real", 8)
    linked = tmp_path / "checkpoints" / checkpoint.tag_for(8)
    os.makedirs(linked.parent)
    os.symlink(real, linked)
    with pytest.raises(checkpoint.CheckpointError, match="is a symbolic link; checkpoints must be real folders"):
        checkpoint.load(str(linked), [EnginePart(_Engine(0))])
    os.symlink("/etc/passwd", os.path.join(real, "mp_rank_00_model_states.pt"))
    with pytest.raises(checkpoint.CheckpointError, match="mp_rank_00_model_states.pt is a symbolic link"):
        checkpoint.load(real, [EnginePart(_Engine(0))])
    with pytest.raises(checkpoint.CheckpointError, match="is a symbolic link"):
        checkpoint.fetch(real)


# --- the node-local folder --------------------------------------------------------------------------

def _local_base_in_subprocess(env: dict) -> subprocess.CompletedProcess:
    code = "from trainer.core import checkpoint_io; print(checkpoint_io.local_base())"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True)


def test_the_default_node_local_folder_is_private_to_the_user(tmp_path):
    env = {"TMPDIR": str(tmp_path)}
    env.pop("CHECKPOINT_LOCAL_DIR", None)
    out = _local_base_in_subprocess({**env, "CHECKPOINT_LOCAL_DIR": ""})
    made = tmp_path / f"ldm-checkpoints-{os.geteuid()}"
    assert out.returncode == 0 and out.stdout.strip() == str(made), out.stderr
    assert (os.stat(made).st_mode & 0o777) == 0o700


@pytest.mark.parametrize("planted", ["symlink", "world_writable", "other_owner"])
def test_a_node_local_folder_another_user_could_write_is_refused(tmp_path, planted):
    base = tmp_path / f"ldm-checkpoints-{os.geteuid()}"
    if planted == "symlink":  # e.g. another user made it a link to a folder of theirs
        os.makedirs(tmp_path / "theirs")
        os.symlink(tmp_path / "theirs", base)
        why = "it is a symbolic link"
    elif planted == "world_writable":
        os.makedirs(base)
        os.chmod(base, 0o777)
        why = "group or others may write it (mode 777)"
    else:
        if os.geteuid() != 0:
            pytest.skip("making a folder owned by another user needs root")
        os.makedirs(base)
        os.chown(base, 65534, 65534)
        why = "it belongs to uid 65534"
    out = _local_base_in_subprocess({"TMPDIR": str(tmp_path), "CHECKPOINT_LOCAL_DIR": ""})
    assert out.returncode != 0 and f"refusing node-local checkpoint folder {base}: {why}" in out.stderr, out.stderr
    # An explicit CHECKPOINT_LOCAL_DIR gets the same checks.
    out = _local_base_in_subprocess({"CHECKPOINT_LOCAL_DIR": str(base)})
    assert out.returncode != 0 and f"refusing node-local checkpoint folder {base}: {why}" in out.stderr


# --- damaged checkpoints (#27): one line naming it, and resume falls back to the one before ----------

def _three_checkpoints(root):
    import torch

    model = torch.nn.Linear(3, 2)
    for samples in (8, 16, 24):
        with torch.no_grad():
            model.weight.fill_(samples)
        checkpoint.save(str(root), samples, [checkpoint.SafetensorsPart("model", model),
                                             checkpoint.TorchState("state", {"samples": samples})], keep_last=3)
    return model


@pytest.mark.parametrize("damage", ["empty marker", "list marker", "truncated weights", "truncated state",
                                    "missing state"])
def test_resume_passes_over_a_damaged_checkpoint_and_says_so(tmp_path, capsys, damage):
    root = tmp_path / "checkpoints"
    model = _three_checkpoints(root)
    newest = root / checkpoint.tag_for(24)
    if damage == "empty marker":
        (newest / checkpoint.MARKER).write_bytes(b"")
    elif damage == "list marker":
        (newest / checkpoint.MARKER).write_text("[1, 2]")
    elif damage == "truncated weights":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[:len(data) // 2])
    elif damage == "truncated state":
        data = (newest / "state.pt").read_bytes()
        (newest / "state.pt").write_bytes(data[:len(data) // 2])
    else:
        os.remove(newest / "state.pt")
    state = checkpoint.TorchState("state")
    path, meta, _ = checkpoint.resume(str(root), lambda p, m: [checkpoint.SafetensorsPart("model", model), state])
    assert path == str(root / checkpoint.tag_for(16)) and meta["samples"] == 16 and state.state == {"samples": 16}
    assert float(model.weight.detach()[0, 0]) == 16
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and said[0].startswith(f"checkpoint") and str(newest) in said[0], said
    assert said[0].endswith("passing over it for the checkpoint before it")


def test_resume_with_no_intact_checkpoint_names_them(tmp_path):
    root = tmp_path / "checkpoints"
    model = _three_checkpoints(root)
    for samples in (8, 16, 24):
        (root / checkpoint.tag_for(samples) / checkpoint.MARKER).write_text('"x"')
    with pytest.raises(checkpoint.DamagedCheckpoint, match=f"^no intact checkpoint under {root}: .* are damaged "
                                                           r"\(the newest: .*\); move them aside to start the run "
                                                           "afresh$"):
        checkpoint.resume(str(root), lambda p, m: [checkpoint.SafetensorsPart("model", model)])


def test_missing_model_states_are_damage_not_a_traceback(tmp_path):
    class Engine(_Engine):
        def zero_optimization(self):
            return self.stage > 0

        def zero_elastic_checkpoint(self):
            return False

    folder = tmp_path / checkpoint.tag_for(8)
    os.makedirs(folder)
    with pytest.raises(checkpoint.DamagedCheckpoint, match=f"^checkpoint {folder} is damaged: it has no model states"):
        EnginePart(Engine(2)).verify(str(folder))
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(checkpoint.DamagedCheckpoint, match="it has no optimizer states of rank 0"):
        EnginePart(Engine(2)).verify(str(folder))
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(checkpoint.DamagedCheckpoint, match="mp_rank_00_model_states.pt is damaged: it cannot be read"):
        EnginePart(Engine(2)).verify(str(folder))
