"""Checkpoints that count only when complete, on local disk or any fsspec URL (s3://...), in
one format for every job.

Layout: ROOT/samples_000000012800/ holds `STARTED` (written first), the files of the job's named
*parts* and `COMPLETE` (JSON: samples, world_size and each part's scalars such as step and
zero_stage), written last by rank 0 after all ranks finished. A directory without `COMPLETE` is an
interrupted save and is ignored; one without `STARTED` or `COMPLETE` was not written by a
checkpointer (an export, a user's folder) and is never deleted, whatever its name (#27). The
UNet job's parts are its DeepSpeed engine (every rank writes its shard: a save gated on rank 0
hangs under ZeRO, diffusers #2606; the model in diffusers format under `unet/`;
trainer/core/checkpoint_deepspeed.py) and its EMA (`ema_unet/`); the autoencoder's are its
weights (`model.safetensors`, `discriminator.safetensors`), its EMA (`ema/`) and
`training_state.pt` (optimizers, codebook usage, loader positions, step).

A part is any object with (the registry of torchtitan's Stateful, EDM2's CheckpointIO):
    save(folder)    collective: each rank writes its own files, if any, into `folder` (local)
    wants(rel)      whether this rank reads the checkpoint file `rel` (path below the folder)
    load(folder)    collective: restore from the local folder holding (at least) those files
and optionally marker() -> dict (scalars for COMPLETE), check(path, meta) (refuse in one line
before any file is read), prepare(path, meta, endpoint_url, local_dir) (collective work before
the download, e.g. a conversion) and verify(folder) (refuse files before any part loads).

Checkpoints are named and ordered by samples seen, the one count that only grows: a step
number does not (an elastic resume onto more ranks makes the global batch larger and the
step smaller). A complete checkpoint is never overwritten, and is deleted only by `prune`,
when `keep_last` complete checkpoints further in samples exist. `resume` loads the newest intact
checkpoint: one whose marker or files are damaged (empty, cut short, missing) is named and passed
over for the one before it. Folders named `step_*` (the older layout) are still found and
ordered by the samples in their marker.

ROOT is `default_root(run_dir)` or a URL; a URL is written through a private node-local
staging folder and read through a per-rank download (trainer/core/checkpoint_io.py). A
checkpoint holding a symbolic link is refused, and files are checked before they are loaded
(trainer/core/checkpoint_trust.py).
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from data_pipeline import storage

from trainer.core import dist
from trainer.core.checkpoint_io import cache, download, is_url, local_path, naming, remove, staging, upload
from trainer.core.checkpoint_trust import (CheckpointError, DamagedCheckpoint, check_safetensors, refuse_links,
                                          unreadable)

MARKER = "COMPLETE"
STARTED = "STARTED"  # the checkpointer's own mark, written before any part: what prune may delete

__all__ = ["CheckpointError", "DamagedCheckpoint", "MARKER", "STARTED", "SafetensorsPart", "TorchState", "begin",
           "complete_tags", "default_root", "fetch", "info", "latest", "load", "mark_complete", "prune",
           "refuse_links", "resolve_root", "resume", "save", "tag_for"]


def default_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


checkpoint_dir = default_root  # the older name


def resolve_root(root: str) -> str:
    """A URL (file:// included) is the root itself. A bare local path is the root when its
    last part is `checkpoints`, else it is a run directory (the older call form): its root is
    `default_root(path)`."""
    if is_url(root):
        return root.rstrip("/")
    if root.startswith("file://"):
        return local_path(root)
    return root if os.path.basename(os.path.normpath(root)) == "checkpoints" else default_root(root)


def tag_for(samples: int) -> str:
    """A checkpoint's folder name: the samples seen (all ranks together) when it was saved."""
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    return f"samples_{samples:012d}"


_TAG = re.compile(r"^(samples|step)_(\d+)$")


def _listing(root: str, endpoint_url: str | None) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(every checkpoint folder, the complete ones) as (samples, name), both sorted by samples.
    An interrupted save of the older `step_*` layout has no samples to order it by: -1."""
    fs, base = storage.filesystem(root, endpoint_url)
    base = base.rstrip("/")
    with naming(root):
        fs.invalidate_cache()
        try:
            names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(base, detail=False)]
        except FileNotFoundError:
            return [], []
        every, complete = [], []
        for name in names:
            m = _TAG.match(name)
            if not m:
                continue
            done = fs.exists(f"{base}/{name}/{MARKER}")
            samples = int(m.group(2))
            if m.group(1) == "step":  # the older layout: the marker says how far it got
                try:
                    samples = _checked_marker(fs.cat_file(f"{base}/{name}/{MARKER}"), name)["samples"] if done else -1
                except DamagedCheckpoint:
                    samples, done = -1, False
            every.append((samples, name))
            if done:
                complete.append((samples, name))
        return sorted(every), sorted(complete)


def complete_tags(root: str, endpoint_url: str | None = None) -> list[str]:
    """The complete checkpoints' folder names, oldest (fewest samples) first."""
    return [name for _, name in _listing(resolve_root(root), endpoint_url)[1]]


def latest(root: str, endpoint_url: str | None = None) -> str | None:
    """Path (or URL) of the newest complete checkpoint, or None."""
    tags = complete_tags(root, endpoint_url)
    return storage.join(resolve_root(root), tags[-1]) if tags else None


def _checked_marker(raw: bytes, path: str) -> dict:
    """A marker's JSON: an object with whole `samples` >= 0 and `world_size` >= 1 (when given)."""
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        meta = None
    good = isinstance(meta, dict) and type(meta.get("samples")) is int and meta["samples"] >= 0
    if good and "world_size" in meta:
        good = type(meta["world_size"]) is int and meta["world_size"] >= 1
    if not good:
        shown = raw[:60].decode("utf-8", "replace") if raw else "empty"
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: its {MARKER} marker is not a JSON object with "
                                f"samples and world_size (it holds {shown!r})")
    return meta


def info(path: str, endpoint_url: str | None = None) -> dict:
    """The JSON of a checkpoint's marker (samples, world_size, step, zero_stage, ...)."""
    url = storage.join(path, MARKER)
    with naming(url):
        if not storage.exists(url, endpoint_url):
            raise CheckpointError(f"{path} is not a complete checkpoint (it has no {MARKER})")
        return _checked_marker(storage.read_bytes(url, endpoint_url), path)


def mark_complete(path: str, info: dict, endpoint_url: str | None = None) -> None:
    with naming(path):
        storage.write_bytes_atomic(storage.join(path, MARKER), json.dumps(info).encode(), endpoint_url)


def prune(root: str, keep_last: int, endpoint_url: str | None = None) -> None:
    """Delete the complete checkpoints that have `keep_last` (at least 1) complete ones further
    in samples, and interrupted saves (`STARTED`, no `COMPLETE`) behind the newest complete one.
    Called only after a checkpoint is complete, so the newest is never deleted before its
    successor exists. A folder the checkpointer did not write is left alone, whatever its name."""
    root = resolve_root(root)
    every, complete = _listing(root, endpoint_url)
    if not complete:
        return
    newest = complete[-1][0]
    old = [name for _, name in complete[:-max(1, keep_last)]]
    interrupted = [n for s, n in every if s < newest and (s, n) not in complete
                   and storage.exists(storage.join(root, n, STARTED), endpoint_url)]
    for name in old + interrupted:
        remove(storage.join(root, name), endpoint_url)


def begin(path: str, endpoint_url: str | None = None) -> None:
    """Make way for a new save at `path`: an interrupted save there is removed; a complete
    checkpoint is refused, never overwritten (it can only exist when two runs share a root)."""
    if storage.exists(storage.join(path, MARKER), endpoint_url):
        raise CheckpointError(f"refusing to overwrite the complete checkpoint {path}: another run writes to the same "
                              "checkpoint folder, or this one restarted behind it; give each run its own")
    if storage.exists(path, endpoint_url) and not storage.exists(storage.join(path, STARTED), endpoint_url):
        raise CheckpointError(f"refusing to save a checkpoint into {path}: that folder was not written by a "
                              "checkpointer (it has no STARTED); move it out of the checkpoint folder")
    remove(path, endpoint_url)
    with naming(path):
        storage.write_bytes_atomic(storage.join(path, STARTED), b"", endpoint_url)


def scalars(state: dict) -> dict:
    """The plain numbers and strings of a state dict: what a part copies into the marker."""
    return {k: v for k, v in state.items() if isinstance(v, (int, float, str))}


def fetch(path: str, local_dir: str | None = None, endpoint_url: str | None = None,
          parts: tuple[str, ...] | None = None) -> str:
    """A local folder with a complete checkpoint's files: `path` itself when it is local, else
    this rank's copy of the URL's objects under `local_dir` (see `save`). `parts` limits it
    to these top-level names, e.g. ("unet", "ema_unet") for sampling."""
    info(path, endpoint_url)
    if not is_url(path):
        refuse_links(local_path(path))
        return local_path(path)
    keep = None if parts is None else (lambda rel: rel.split("/")[0] in parts or rel == MARKER)
    return download(path, cache(path, local_dir), endpoint_url, keep)


def save(root: str, samples: int, parts: list, keep_last: int = 2, endpoint_url: str | None = None,
         local_dir: str | None = None) -> str:
    """Collective: every rank calls it with the same parts. Returns the checkpoint's path (or
    URL), named by `samples`, the samples seen (all ranks together) so far.

    Each part writes its files into the rank's folder: the checkpoint's own for a local root,
    else a node-local staging folder whose files the rank uploads. `local_dir`: the node-local
    folder for staging and downloads (default $CHECKPOINT_LOCAL_DIR, else the temp dir's
    `ldm-checkpoints-UID`). The marker (each part's marker() plus samples and world_size) is
    written when every rank is done, then older checkpoints beyond `keep_last` are pruned."""
    root, tag, w = resolve_root(root), tag_for(samples), dist.world()
    path, remote = storage.join(root, tag), is_url(root)
    error = None
    if w.is_main:  # an interrupted earlier save here must not mix with the new files
        try:
            begin(path, endpoint_url)
        except CheckpointError as e:
            error = str(e)
    error = dist.all_gather_objects(error)[0]  # every rank stops, none waits at a barrier
    if error:
        raise CheckpointError(error)
    local = os.path.join(staging(root, w.rank, local_dir) if remote else root, tag)
    if remote:
        shutil.rmtree(local, ignore_errors=True)
    os.makedirs(local, exist_ok=True)
    try:
        for part in parts:
            part.save(local)
        if remote:
            upload(local, path, endpoint_url)
    except Exception as e:
        if not storage.is_disk_full(e):
            raise
        error = storage.disk_full(local, f"checkpoint {path}", _size(_previous(root, tag, endpoint_url)))
        error += "; the save has no COMPLETE marker, so no run loads it: free space or set checkpoint_url elsewhere"
    finally:
        if remote:
            shutil.rmtree(local, ignore_errors=True)
    error = next((e for e in dist.all_gather_objects(error) if e), None)  # every rank stops, none waits
    if error:
        raise CheckpointError(error)
    if w.is_main:
        meta = {}
        for part in parts:
            meta.update(part.marker() if hasattr(part, "marker") else {})
        mark_complete(path, {**meta, "samples": samples, "world_size": w.size}, endpoint_url)
        prune(root, keep_last, endpoint_url)
    dist.barrier()
    return path


def _previous(root: str, tag: str, endpoint_url: str | None) -> str | None:
    """The newest complete local checkpoint before `tag` (to size a new one by), or None."""
    older = [n for n in complete_tags(root, endpoint_url) if n < tag]
    return None if is_url(root) or not older else os.path.join(root, older[-1])


def _size(folder: str | None) -> int | None:
    if folder is None:
        return None
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def load(path: str, parts: list, endpoint_url: str | None = None, local_dir: str | None = None) -> dict:
    """Collective: restore every part from the complete checkpoint at `path`; returns its marker.

    In order: the marker is read, each part's check() may refuse, a local checkpoint holding a
    link is refused, each part's prepare() runs, a URL's wanted files are downloaded to this
    rank's node-local copy, every part's verify() reads its files, and only then do the parts load."""
    meta = info(path, endpoint_url)
    for part in parts:
        if hasattr(part, "check"):
            part.check(path, meta)
    if not is_url(path):
        refuse_links(local_path(path))
    for part in parts:
        if hasattr(part, "prepare"):
            part.prepare(path, meta, endpoint_url, local_dir)
    folder = local_path(path)
    if is_url(path):
        folder = download(path, cache(path, local_dir), endpoint_url,
                          lambda rel: rel == MARKER or any(part.wants(rel) for part in parts))
    error = None
    try:
        for part in parts:
            if hasattr(part, "verify"):
                part.verify(folder)
    except CheckpointError as e:
        error = e
    errors = [e for e in dist.all_gather_objects(None if error is None else (type(error) is DamagedCheckpoint,
                                                                             str(error))) if e]
    if errors:  # every rank stops before any loads (a rank loading alone would wait in a collective)
        damaged, text = errors[0]
        raise (DamagedCheckpoint if damaged else CheckpointError)(text)
    for part in parts:
        part.load(folder)
    return meta


def resume(root: str, parts_for, endpoint_url: str | None = None, local_dir: str | None = None):
    """Collective: load the newest intact complete checkpoint under `root` into the parts that
    `parts_for(path, meta)` returns for it (it may refuse one in a CheckpointError or ConfigError,
    which stops the run). A damaged checkpoint is named and passed over for the one before it.
    Returns (path, meta, parts), or (None, None, []) when there is none."""
    root, damaged, reasons = resolve_root(root), [], []
    for name in reversed(complete_tags(root, endpoint_url)):
        path = storage.join(root, name)
        try:
            meta = info(path, endpoint_url)
            parts = parts_for(path, meta)
            load(path, parts, endpoint_url, local_dir)
        except DamagedCheckpoint as e:
            damaged.append(path)
            reasons.append(str(e))
            if dist.world().is_main:
                print(f"{e}; passing over it for the checkpoint before it", flush=True)
            continue
        return path, meta, parts
    if damaged:
        raise DamagedCheckpoint(f"no intact checkpoint under {root}: {', '.join(damaged)} "
                                f"{'is' if len(damaged) == 1 else 'are'} damaged (the newest: {reasons[0]}); move "
                                f"{'it' if len(damaged) == 1 else 'them'} aside to start the run afresh")
    return None, None, []


# --- parts for replicated state (every rank holds the same; rank 0 writes it) ---------------------

def _file(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise DamagedCheckpoint(f"checkpoint {folder} has no {name}: it is damaged, or was written by a run "
                                "without this part")
    return path


class SafetensorsPart:
    """A module's state dict as NAME.safetensors (tensors only: nothing in it is executed)."""

    def __init__(self, name: str, module: torch.nn.Module):
        self.name, self.module = name, module

    def save(self, folder: str) -> None:
        if dist.world().is_main:
            save_file({k: v.contiguous() for k, v in self.module.state_dict().items()},
                      os.path.join(folder, f"{self.name}.safetensors"))

    def wants(self, rel: str) -> bool:
        return rel == f"{self.name}.safetensors"

    def verify(self, folder: str) -> None:
        check_safetensors(_file(folder, f"{self.name}.safetensors"), folder)

    def load(self, folder: str) -> None:
        path = _file(folder, f"{self.name}.safetensors")
        try:
            self.module.load_state_dict(load_file(path))
        except RuntimeError as e:  # torch's message: a header line, then the missing/unexpected/mismatched keys
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            detail = lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__
            detail = detail if len(detail) <= 200 else detail[:197] + "..."
            raise CheckpointError(f"{path} does not fit this run's {self.name}: {detail}") from None


class TorchState:
    """A dict of tensors and plain data (optimizer states, loader positions, counters) as
    NAME.pt, read back with the restricted unpickler (weights_only=True): a file holding any
    other object is refused without running it. Set `state` before a save; `load` sets it."""

    def __init__(self, name: str, state: dict | None = None):
        self.name, self.state = name, state

    def marker(self) -> dict:
        return scalars(self.state)

    def save(self, folder: str) -> None:
        if dist.world().is_main:
            torch.save(self.state, os.path.join(folder, f"{self.name}.pt"))

    def wants(self, rel: str) -> bool:
        return rel == f"{self.name}.pt"

    def verify(self, folder: str) -> None:
        path = _file(folder, f"{self.name}.pt")
        try:
            self.state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise unreadable(path, e) from None

    def load(self, folder: str) -> None:
        pass  # read (and so checked) by verify, before any part loaded
