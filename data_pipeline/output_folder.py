"""Where the shard writers (launch/make_shards.py, launch/make_synthetic.py) may write.

A reader takes every `*.tar` under a folder, so shards left from an earlier run with other
settings would be read beside the new ones (samples twice, or stale ones). A writer
therefore starts from an empty (or absent) folder; `overwrite` first deletes what an
earlier run of that writer left (`PREFIX-NNNNNN.tar` and their hidden `.partial` files),
and nothing else: a folder holding anything else is for a person to empty.
"""
from __future__ import annotations

import posixpath
import re

from .storage import DataError, filesystem, is_local


def claim_output_folder(out_url: str, prefix: str, overwrite: bool, endpoint_url: str | None = None) -> None:
    """Make `out_url` ready for new shards named `prefix-NNNNNN.tar`, or raise a DataError
    naming it (a file, a non-empty folder without `overwrite`, or foreign contents)."""
    fs, path = filesystem(out_url, endpoint_url)
    if is_local(out_url) and fs.isfile(path):
        raise DataError(f"--out {out_url} is a file, not a folder")
    try:
        entries = sorted(fs.ls(path, detail=False)) if fs.exists(path) else []
    except FileNotFoundError:
        entries = []
    if not is_local(out_url):  # object stores list the prefix itself too, on some servers
        entries = [e for e in entries if e.rstrip("/") != path.rstrip("/")]
    if not entries:
        return
    names = [posixpath.basename(e.rstrip("/")) for e in entries]
    if not overwrite:
        raise DataError(f"--out {out_url} is not empty ({len(names)} entries, e.g. {names[0]}): new shards beside "
                        "old ones would be read together; write to an empty folder, or pass --overwrite to "
                        "replace the shards an earlier run left there")
    ours = re.compile(rf"\.?{re.escape(prefix)}-(\d{{6}}\.tar(\.partial)?|skipped\.jsonl(\.tmp)?)")
    foreign = [n for n in names if not ours.fullmatch(n)]
    if foreign:
        raise DataError(f"--overwrite deletes only earlier {prefix}-NNNNNN.tar shards, but {out_url} also holds "
                        f"{foreign[0]}: empty it by hand or write elsewhere")
    for entry in entries:
        fs.rm(entry)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()


def check_prefix(prefix: str) -> str | None:
    """Why `prefix` cannot name shards (it would leave the folder or be hidden), or None."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", prefix):
        return f"--prefix {prefix!r} must be a plain name: letters, digits, '_', '-' or '.', not starting with '.'"
    return None
