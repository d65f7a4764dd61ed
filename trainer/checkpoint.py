"""Checkpoints that count only when complete, found again by rerunning the same command.

Layout: `run_dir/checkpoints/step_000000100/` holds DeepSpeed's files (every rank writes
its shard: a save gated on rank 0 hangs under ZeRO, diffusers #2606), the model in
diffusers format under `unet/`, and `COMPLETE`, written last by rank 0 after all ranks
finished. A directory without `COMPLETE` is an interrupted save and is ignored.
"""
from __future__ import annotations

import json
import os
import shutil

from . import dist

MARKER = "COMPLETE"


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def tag_for(step: int) -> str:
    return f"step_{step:09d}"


def complete_tags(run_dir: str) -> list[str]:
    root = checkpoint_dir(run_dir)
    if not os.path.isdir(root):
        return []
    return sorted(t for t in os.listdir(root) if t.startswith("step_") and os.path.exists(os.path.join(root, t, MARKER)))


def latest(run_dir: str) -> str | None:
    """Path of the newest complete checkpoint, or None."""
    tags = complete_tags(run_dir)
    return os.path.join(checkpoint_dir(run_dir), tags[-1]) if tags else None


def save(engine, run_dir: str, step: int, state: dict, keep_last: int = 2) -> str:
    """Collective: every rank calls it. Returns the checkpoint path."""
    from .engine import full_weights  # deepspeed is imported only by jobs that use it

    root, tag = checkpoint_dir(run_dir), tag_for(step)
    path = os.path.join(root, tag)
    engine.save_checkpoint(root, tag=tag, client_state=state, save_latest=False)
    with full_weights(engine) as module:
        if dist.world().is_main:
            module.save_pretrained(os.path.join(path, "unet"), safe_serialization=True)
    dist.barrier()
    if dist.world().is_main:
        mark_complete(path, {"step": step, **{k: v for k, v in state.items() if isinstance(v, (int, float, str))}})
        prune(run_dir, keep_last)
    dist.barrier()
    return path


def mark_complete(path: str, info: dict) -> None:
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump(info, f)


def prune(run_dir: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and interrupted saves
    older than the newest complete one. Called only after a checkpoint is complete, so
    the newest complete checkpoint is never deleted before its successor exists."""
    root, tags = checkpoint_dir(run_dir), complete_tags(run_dir)
    if not tags:
        return
    for old in tags[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    for t in os.listdir(root):
        if t.startswith("step_") and t < tags[-1] and t not in tags:
            shutil.rmtree(os.path.join(root, t), ignore_errors=True)


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded, named in one line."""


def verify_files(path: str, rank: int) -> None:
    """Refuse checkpoint files that hold anything but tensors and plain data, before any
    code unpickles them for real.

    DeepSpeed loads its files with the unrestricted unpickler (weights_only off), which runs whatever a
    pickle says. Each file this rank will load is first read with the restricted unpickler
    (`weights_only=True`), allowing only the three DeepSpeed classes its own files contain;
    a file with any other object fails here, without executing it.
    """
    import re

    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    other_rank = re.compile(r"zero_pp_rank_(\d+)_")
    for name in sorted(os.listdir(path)):
        m = other_rank.search(name)
        if not name.endswith(".pt") or (m and int(m.group(1)) != rank):
            continue
        try:
            with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
                torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
        except Exception as e:
            text = str(e)
            found = re.search(r"GLOBAL ([\w.]+)", text)
            detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
            what = (f"it holds {found.group(1)}" if found else
                    f"it is not plain tensor data ({detail.group(1) if detail else type(e).__name__})")
            raise CheckpointError(f"refusing checkpoint file {os.path.join(path, name)}: {what}, which this "
                                  "trainer never writes; it was not loaded") from None


def load(engine, path: str) -> dict:
    """Collective: restore model, optimizer and the client state saved with it."""
    verify_files(path, dist.world().rank)
    root, tag = os.path.dirname(path), os.path.basename(path)
    loaded, state = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                           load_lr_scheduler_states=False)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    return state
