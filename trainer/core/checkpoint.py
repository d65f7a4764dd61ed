"""Checkpoints that count only when complete, on local disk or any fsspec URL (s3://...).

Layout: ROOT/samples_000000012800/ holds DeepSpeed's files (every rank writes its shard: a
save gated on rank 0 hangs under ZeRO, diffusers #2606), the model in diffusers format under
`unet/`, and `COMPLETE` (JSON: step, samples, world_size, zero_stage, ...), written last by
rank 0 after all ranks finished. A directory without `COMPLETE` is an interrupted save and is
ignored.

Checkpoints are named and ordered by samples seen, the one count that only grows: a step
number does not (an elastic resume onto more ranks makes the global batch larger and the
step smaller). A complete checkpoint is never overwritten, and is deleted only by `prune`,
when `keep_last` complete checkpoints further in samples exist. Folders named `step_*` (the
older layout) are still found and ordered by the samples in their marker.

ROOT is `default_root(run_dir)` or a URL. DeepSpeed reads and writes local files only, so a
save to a URL is staged in a node-local folder and each rank uploads what it wrote; a load
downloads only what the rank reads. That folder is private to the user ($CHECKPOINT_LOCAL_DIR,
else TMPDIR/ldm-checkpoints-UID): created with mode 0700, and refused when it is a link, is
owned by another user or is writable by others, since whatever is planted there is loaded.
Downloaded object keys must stay inside it, and a checkpoint holding a symbolic link is
refused: DeepSpeed follows links when it unpickles, and the pickle check reads real files
(those checks live in trainer/core/checkpoint_trust.py).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import tempfile
from typing import Callable

from data_pipeline import storage

from trainer.core import dist
from trainer.core.checkpoint_trust import (RANK_FILE, CheckpointError, private_dir, refuse_links, safe_relative,
                                           verify_files, write_new)

MARKER = "COMPLETE"
UNIVERSAL = "universal"  # the converted (world-size-free) copy, inside the checkpoint folder
CONVERTED = "CONVERTED"  # written last into UNIVERSAL/


def default_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


checkpoint_dir = default_root  # the older name


def _is_url(p: str) -> bool:
    return "://" in p and not p.startswith("file://")


def _local(p: str) -> str:
    return p.removeprefix("file://")


def resolve_root(root: str) -> str:
    """A URL (file:// included) is the root itself. A bare local path is the root when its
    last part is `checkpoints`, else it is a run directory (the older call form): its root is
    `default_root(path)`."""
    if _is_url(root):
        return root.rstrip("/")
    if root.startswith("file://"):
        return _local(root)
    return root if os.path.basename(os.path.normpath(root)) == "checkpoints" else default_root(root)


def tag_for(samples: int) -> str:
    """A checkpoint's folder name: the samples seen (all ranks together) when it was saved."""
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    return f"samples_{samples:012d}"


_TAG = re.compile(r"^(samples|step)_(\d+)$")


def _local_base(local_dir: str | None = None) -> str:
    """The node-local folder for staging and downloads, private to this user (see the module doc)."""
    base = (local_dir or os.environ.get("CHECKPOINT_LOCAL_DIR")
            or os.path.join(tempfile.gettempdir(), f"ldm-checkpoints-{os.geteuid()}"))
    return private_dir(os.path.abspath(base))


@contextlib.contextmanager
def _naming(url: str):
    """Storage failures as one-line CheckpointErrors naming the URL."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, storage.DataError) as e:
        raise CheckpointError(f"{url}: {e}") from None


def _listing(root: str, endpoint_url: str | None) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(every checkpoint folder, the complete ones) as (samples, name), both sorted by samples.
    An interrupted save of the older `step_*` layout has no samples to order it by: -1."""
    fs, base = storage.filesystem(root, endpoint_url)
    base = base.rstrip("/")
    with _naming(root):
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
            if m.group(1) == "step":
                samples = int(json.loads(fs.cat_file(f"{base}/{name}/{MARKER}")).get("samples", -1)) if done else -1
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


def info(path: str, endpoint_url: str | None = None) -> dict:
    """The JSON of a checkpoint's marker (step, world_size, zero_stage, ...)."""
    url = storage.join(path, MARKER)
    with _naming(url):
        if not storage.exists(url, endpoint_url):
            raise CheckpointError(f"{path} is not a complete checkpoint (it has no {MARKER})")
        return json.loads(storage.read_bytes(url, endpoint_url))


def mark_complete(path: str, info: dict, endpoint_url: str | None = None) -> None:
    with _naming(path):
        storage.write_bytes_atomic(storage.join(path, MARKER), json.dumps(info).encode(), endpoint_url)


def _remove(path: str, endpoint_url: str | None) -> None:
    fs, p = storage.filesystem(path, endpoint_url)
    with _naming(path):
        fs.invalidate_cache()
        if fs.exists(p):
            fs.rm(p, recursive=True)


def prune(root: str, keep_last: int, endpoint_url: str | None = None) -> None:
    """Delete the complete checkpoints that have `keep_last` (at least 1) complete ones further
    in samples, and interrupted saves behind the newest complete one. Called only after a
    checkpoint is complete, so the newest is never deleted before its successor exists."""
    root = resolve_root(root)
    every, complete = _listing(root, endpoint_url)
    if not complete:
        return
    newest = complete[-1][0]
    old = [name for _, name in complete[:-max(1, keep_last)]]
    for name in old + [n for s, n in every if s < newest and (s, n) not in complete]:
        _remove(storage.join(root, name), endpoint_url)


def begin(path: str, endpoint_url: str | None = None) -> None:
    """Make way for a new save at `path`: an interrupted save there is removed; a complete
    checkpoint is refused, never overwritten (it can only exist when two runs share a root)."""
    if storage.exists(storage.join(path, MARKER), endpoint_url):
        raise CheckpointError(f"refusing to overwrite the complete checkpoint {path}: another run writes to the same "
                              "checkpoint folder, or this one restarted behind it; give each run its own")
    _remove(path, endpoint_url)


def _upload(local: str, url: str, endpoint_url: str | None) -> None:
    """Put every file under `local` below `url`; a marker among them goes last."""
    fs, base = storage.filesystem(url, endpoint_url)
    files = [os.path.relpath(os.path.join(d, f), local) for d, _, names in os.walk(local) for f in names]
    for rel in sorted(files, key=lambda r: r in (MARKER, CONVERTED)):
        with _naming(f"{url}/{rel}"):
            fs.put_file(os.path.join(local, rel), f"{base}/{rel.replace(os.sep, '/')}")


def _download(url: str, dest: str, endpoint_url: str | None, keep: Callable[[str], bool] | None = None) -> str:
    """Copy the objects under `url` (those `keep(relative name)` selects) into `dest`, and
    delete selected local files the URL no longer has (an older save of the same step)."""
    fs, base = storage.filesystem(url, endpoint_url)
    with _naming(url):
        fs.invalidate_cache()
        remote = {p[len(base.rstrip("/")) + 1:]: p for p in fs.find(base)}
        wanted = {rel: p for rel, p in remote.items() if keep is None or keep(rel)}
        targets = {rel: os.path.join(dest, *safe_relative(rel, url)) for rel in wanted}
        os.makedirs(dest, mode=0o700, exist_ok=True)
        real_dest = os.path.realpath(dest)
        for folder, _, files in os.walk(dest):
            for name in files:
                rel = os.path.relpath(os.path.join(folder, name), dest).replace(os.sep, "/")
                if (keep is None or keep(rel)) and rel not in wanted:
                    os.remove(os.path.join(folder, name))
        for rel, p in wanted.items():
            target = targets[rel]
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            if os.path.commonpath([real_dest, os.path.realpath(os.path.dirname(target))]) != real_dest:
                raise CheckpointError(f"refusing checkpoint object {url}/{rel}: it would be written outside {dest}")
            with fs.open(p, "rb") as source:
                write_new(target, source)
    return dest


def _cache(url: str, local_dir: str | None) -> str:
    """This rank's local copy of a URL's folder: ranks on one node never share (or race on) one."""
    where = url.split("://", 1)[1].strip("/")
    return os.path.join(_local_base(local_dir), "cache", f"rank{dist.world().rank}", *safe_relative(where, url))


def fetch(path: str, local_dir: str | None = None, endpoint_url: str | None = None,
          parts: tuple[str, ...] | None = None) -> str:
    """A local folder with a complete checkpoint's files: `path` itself when it is local, else
    this rank's copy of the URL's objects under `local_dir` (see `save`). `parts` limits it
    to these top-level names, e.g. ("unet", "ema_unet") for sampling."""
    info(path, endpoint_url)
    if not _is_url(path):
        refuse_links(_local(path))
        return _local(path)
    keep = None if parts is None else (lambda rel: rel.split("/")[0] in parts or rel == MARKER)
    return _download(path, _cache(path, local_dir), endpoint_url, keep)


def save(engine, root: str, samples: int, state: dict, keep_last: int = 2, extra=None,
         endpoint_url: str | None = None, local_dir: str | None = None) -> str:
    """Collective: every rank calls it. Returns the checkpoint's path (or URL), named by
    `samples`, the samples seen (all ranks together) so far.

    `extra(path)`, when given, is called on every rank after DeepSpeed's files are written
    and before the marker, to add files of its own (the EMA weights); for a URL root `path`
    is the rank's local staging folder, whose files are uploaded with DeepSpeed's.
    `local_dir`: the node-local folder for staging and downloads (default
    $CHECKPOINT_LOCAL_DIR, else the temp dir's `ldm-checkpoints`)."""
    from trainer.core.engine import full_weights  # deepspeed is imported only by jobs that use it

    root, tag, w = resolve_root(root), tag_for(samples), dist.world()
    path, remote = storage.join(root, tag), _is_url(root)
    error = None
    if w.is_main:  # an interrupted earlier save here must not mix with the new files
        try:
            begin(path, endpoint_url)
        except CheckpointError as e:
            error = str(e)
    error = dist.all_gather_objects(error)[0]  # every rank stops, none waits at a barrier
    if error:
        raise CheckpointError(error)
    stage = (os.path.join(_local_base(local_dir), "staging", hashlib.sha1(root.encode()).hexdigest()[:12],
                          f"rank{w.rank}") if remote else root)
    local = os.path.join(stage, tag)
    if remote:
        shutil.rmtree(local, ignore_errors=True)
    engine.save_checkpoint(stage, tag=tag, client_state=state, save_latest=False)
    if hasattr(engine.module, "save_pretrained"):
        with full_weights(engine) as module:
            if w.is_main:
                module.save_pretrained(os.path.join(local, "unet"), safe_serialization=True)
    if extra is not None:
        extra(local)
    if remote:
        _upload(local, path, endpoint_url)
        shutil.rmtree(local, ignore_errors=True)
    dist.barrier()
    if w.is_main:
        scalars = {k: v for k, v in state.items() if isinstance(v, (int, float, str))}
        mark_complete(path, {**scalars, "samples": samples, "world_size": w.size,
                             "zero_stage": int(engine.zero_optimization_stage())}, endpoint_url)
        prune(root, keep_last, endpoint_url)
    dist.barrier()
    return path


def _convert(src: str, out: str) -> None:
    """DeepSpeed's ds_to_universal on the checkpoint's own top-level .pt files (it walks its
    input folder recursively, so `unet/` or an older `universal/` must not be in it). They are
    hard-linked, not symlinked, into its input: a checkpoint never holds a symbolic link."""
    from deepspeed.checkpoint import ds_to_universal

    with tempfile.TemporaryDirectory(prefix=".universal-", dir=src) as tmp:
        inp, work = os.path.join(tmp, "in"), os.path.join(tmp, "out")
        os.makedirs(inp)
        for name in os.listdir(src):
            if name.endswith(".pt"):
                try:
                    os.link(os.path.join(src, name), os.path.join(inp, name))
                except OSError:  # a filesystem without hard links
                    shutil.copyfile(os.path.join(src, name), os.path.join(inp, name))
        args = argparse.Namespace(input_folder=inp, output_folder=work, num_extract_workers=1, num_merge_workers=1,
                                  keep_temp_folder=False, strict=True, inject_missing_state=True)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(work, out)
    with open(os.path.join(out, CONVERTED), "w") as f:
        f.write("ds_to_universal\n")


def to_universal(path: str, endpoint_url: str | None = None, local_dir: str | None = None) -> str:
    """Collective: rank 0 converts the checkpoint at `path` into `path/universal` (once; a URL
    is fetched, converted and the result uploaded), the others wait. Returns that path, or
    `path` itself for a ZeRO-0 checkpoint: its optimizer state is whole in the model file and
    loads at any world size as it is."""
    meta, out = info(path, endpoint_url), storage.join(path, UNIVERSAL)
    if meta.get("zero_stage") == 0:
        return path
    error = None
    if dist.world().is_main and not storage.exists(storage.join(out, CONVERTED), endpoint_url):
        try:
            src = (_download(path, _cache(path, local_dir), endpoint_url, lambda rel: rel.endswith(".pt")
                             and "/" not in rel) if _is_url(path) else _local(path))
            refuse_links(src)
            verify_files(src, None)  # the conversion unpickles every rank's files unrestricted
            _convert(src, os.path.join(src, UNIVERSAL))
            if _is_url(path):
                _remove(out, endpoint_url)
                _upload(os.path.join(src, UNIVERSAL), out, endpoint_url)
        except Exception as e:  # told to every rank, so that none waits for a conversion that failed
            error = e if isinstance(e, CheckpointError) else CheckpointError(
                f"converting {path} to a universal checkpoint failed: {type(e).__name__}: {e}")
    message = dist.all_gather_objects(None if error is None else str(error))[0]
    if error is not None or message is not None:
        raise error or CheckpointError(message)
    return out


def _check_fits(path: str, meta: dict, stage: int, size: int, universal: bool) -> None:
    """Refuse, in one line, what DeepSpeed would fail on obscurely or load only in part.

    ds_to_universal writes zero/optimizer_state.pt in the saving stage's own format (ZeRO-1/2:
    the optimizer's global state; ZeRO-3: its nested optimizer_state_dict), and ZeRO-3 names
    its model files per rank: a universal checkpoint moves between ZeRO-1 and 2 only."""
    saved, ranks = meta.get("zero_stage"), meta.get("world_size")
    if saved is None:  # a marker from before these fields: DeepSpeed's own checks only
        return
    if saved != stage and not (universal and {saved, stage} <= {1, 2}):
        hint = "load it with universal=True" if {saved, stage} <= {1, 2} else f"resume it at ZeRO-{saved}"
        raise CheckpointError(f"checkpoint {path} was written at ZeRO-{saved}, this engine runs ZeRO-{stage}: {hint}")
    if saved > 0 and not universal and ranks not in (None, size):
        raise CheckpointError(f"checkpoint {path} was written by {ranks} ranks at ZeRO-{saved}, this job has "
                              f"{size}: load it with universal=True")


def load(engine, path: str, universal: bool = False, endpoint_url: str | None = None,
         local_dir: str | None = None) -> dict:
    """Collective: restore model, optimizer and the client state saved with it.

    A ZeRO-1/2/3 checkpoint loads as saved only at its own world size and stage;
    `universal=True` converts it (`to_universal`) and loads that at any world size (and
    ZeRO-1 <-> 2). ZeRO-0 keeps whole optimizer state in one file: any world size, as saved."""
    w, meta, stage = dist.world(), info(path, endpoint_url), int(engine.zero_optimization_stage())
    _check_fits(path, meta, stage, w.size, universal)
    if not _is_url(path):
        refuse_links(_local(path))
    universal = universal and stage != 0  # ZeRO-0 needs no conversion (see to_universal)
    if universal:
        path = to_universal(path, endpoint_url, local_dir)
    elastic = bool(engine.zero_optimization() and engine.zero_elastic_checkpoint()) and not universal
    rank = 0 if universal else None if elastic else w.rank  # universal: every rank reads rank 0's model file
    if _is_url(path):
        def wanted(rel: str) -> bool:
            m = RANK_FILE.match(rel)
            top = "/" not in rel and rel.endswith(".pt") and (rank is None or not m or int(m.group(1)) == rank)
            return top or (universal and rel.startswith("zero/"))
        path = _download(path, _cache(path, local_dir), endpoint_url, wanted)
    path = _local(path)
    verify_files(path, rank)
    root, tag = os.path.split(os.path.normpath(path))
    saved_flag = engine._config.load_universal_checkpoint  # read by load_checkpoint only
    engine._config.load_universal_checkpoint = universal
    try:
        loaded, state = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
    finally:
        engine._config.load_universal_checkpoint = saved_flag
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
    return state
