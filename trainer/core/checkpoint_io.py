"""Moving checkpoint files between a node and a checkpoint root that is an fsspec URL (s3://...).

Training code reads and writes local files only (DeepSpeed does, and so do safetensors and
torch.save), so a save to a URL is staged in a node-local folder and each rank uploads what it
wrote; a load downloads only the files the rank reads. That folder is private to the user
($CHECKPOINT_LOCAL_DIR, else TMPDIR/ldm-checkpoints-UID): created with mode 0700, and refused
when it is a link, is owned by another user or is writable by others, since whatever is planted
there is loaded. Downloaded object keys must stay inside it (trainer/core/checkpoint_trust.py).
The format itself (folders, marker, parts) is trainer/core/checkpoint.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from typing import Callable

from data_pipeline import storage

from trainer.core import dist
from trainer.core.checkpoint_trust import CheckpointError, private_dir, safe_relative, write_new

LAST = ("COMPLETE", "CONVERTED")  # markers: uploaded after every other file of their folder


def is_url(p: str) -> bool:
    return "://" in p and not p.startswith("file://")


def local_path(p: str) -> str:
    return p.removeprefix("file://")


def local_base(local_dir: str | None = None) -> str:
    """The node-local folder for staging and downloads, private to this user (see the module doc)."""
    base = (local_dir or os.environ.get("CHECKPOINT_LOCAL_DIR")
            or os.path.join(tempfile.gettempdir(), f"ldm-checkpoints-{os.geteuid()}"))
    return private_dir(os.path.abspath(base))


@contextlib.contextmanager
def naming(url: str):
    """Storage failures as one-line CheckpointErrors naming the URL."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, storage.DataError) as e:
        raise CheckpointError(f"{url}: {e}") from None


def remove(path: str, endpoint_url: str | None) -> None:
    fs, p = storage.filesystem(path, endpoint_url)
    with naming(path):
        fs.invalidate_cache()
        if fs.exists(p):
            fs.rm(p, recursive=True)


def staging(root: str, rank: int, local_dir: str | None) -> str:
    """The folder a rank writes its part of a save to a URL root in, before uploading it."""
    return os.path.join(local_base(local_dir), "staging", hashlib.sha1(root.encode()).hexdigest()[:12], f"rank{rank}")


def upload(local: str, url: str, endpoint_url: str | None) -> None:
    """Put every file under `local` below `url`; a marker among them goes last."""
    fs, base = storage.filesystem(url, endpoint_url)
    files = [os.path.relpath(os.path.join(d, f), local) for d, _, names in os.walk(local) for f in names]
    for rel in sorted(files, key=lambda r: r in LAST):
        with naming(f"{url}/{rel}"):
            fs.put_file(os.path.join(local, rel), f"{base}/{rel.replace(os.sep, '/')}")


def download(url: str, dest: str, endpoint_url: str | None, keep: Callable[[str], bool] | None = None) -> str:
    """Copy the objects under `url` (those `keep(relative name)` selects) into `dest`, and
    delete selected local files the URL no longer has (an older save of the same step)."""
    fs, base = storage.filesystem(url, endpoint_url)
    with naming(url):
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


def cache(url: str, local_dir: str | None) -> str:
    """This rank's local copy of a URL's folder: ranks on one node never share (or race on) one."""
    where = url.split("://", 1)[1].strip("/")
    return os.path.join(local_base(local_dir), "cache", f"rank{dist.world().rank}", *safe_relative(where, url))
