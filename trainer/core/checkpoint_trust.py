"""What a checkpoint must pass before it is written to or loaded: the node-local folder is
private to the user, object keys stay inside the folder they are downloaded to, files are
created without following links, and a checkpoint holds real files whose pickles contain
only tensors and plain data. See trainer/core/checkpoint.py for the format itself."""
from __future__ import annotations

import os
import pickle
import re
import shutil
import stat

from trainer.core.errors import CheckpointError, DamagedCheckpoint

RANK_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_")  # a ZeRO rank's optimizer-state file


def private_dir(path: str) -> str:
    """`path` as a directory only this user can write: made with mode 0700 when missing, and
    refused when it is a symbolic link, belongs to someone else, or group/others may write it
    (a file planted there would be loaded or followed on write)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    why = ("it is a symbolic link" if stat.S_ISLNK(st.st_mode) else "it is not a directory" if not stat.S_ISDIR(st.st_mode)
           else f"it belongs to uid {st.st_uid}, not to this user ({os.geteuid()})" if st.st_uid != os.geteuid()
           else f"group or others may write it (mode {stat.S_IMODE(st.st_mode):o})" if st.st_mode & 0o022 else None)
    if why:
        raise CheckpointError(f"refusing node-local checkpoint folder {path}: {why}; set CHECKPOINT_LOCAL_DIR "
                              "to a folder of your own")
    return path


def safe_relative(rel: str, url: str) -> list[str]:
    """The parts of an object key below `url`, refused when they could leave the destination
    folder (`..`, `.`, empty parts, an absolute key): a crafted bucket must not write outside it."""
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
        raise CheckpointError(f"refusing checkpoint object {url}/{rel}: its key has an empty, '.' or '..' part")
    return parts


def write_new(target: str, source) -> None:
    """Stream `source` into `target` (via `target.partial`), never following a link there."""
    fd = os.open(target + ".partial", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
    os.replace(target + ".partial", target)


def refuse_links(path: str) -> None:
    """Refuse a checkpoint folder that is, or holds anywhere, a symbolic link. DeepSpeed follows
    links when it loads (and unpickles without restriction), so a linked folder or file would be
    loaded without the check of `verify_files` having read what it points to."""
    if os.path.islink(path):
        raise CheckpointError(f"refusing checkpoint {path}: it is a symbolic link; checkpoints must be real folders")
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(dirs + files):
            if os.path.islink(os.path.join(folder, name)):
                raise CheckpointError(f"refusing checkpoint {path}: {os.path.join(folder, name)} is a symbolic link; "
                                      "checkpoints must hold real files only")


def verify_files(path: str, rank: int | None) -> None:
    """Refuse checkpoint files that hold anything but tensors and plain data, before any
    code unpickles them for real.

    DeepSpeed loads its files with the unrestricted unpickler (weights_only off), which runs
    whatever a pickle says. Each file that will be loaded (this rank's, or every rank's when
    `rank` is None; all of `zero/` in a universal checkpoint) is first read with the restricted
    unpickler (`weights_only=True`), allowing only the DeepSpeed classes its own files contain;
    a file with any other object fails here, without executing it.
    """
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    refuse_links(path)
    names = [n for n in sorted(os.listdir(path)) if n.endswith(".pt") and
             (rank is None or not (m := RANK_FILE.match(n)) or int(m.group(1)) == rank)]
    for folder, dirs, files in os.walk(os.path.join(path, "zero")):
        dirs.sort()
        names += sorted(os.path.relpath(os.path.join(folder, f), path) for f in files if f.endswith(".pt"))
    for name in names:
        try:
            with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
                torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
        except Exception as e:
            raise unreadable(os.path.join(path, name), e) from None


def unreadable(path: str, e: Exception) -> CheckpointError:
    """The one-line error for a checkpoint file the restricted unpickler did not load: refused for
    an object it holds (nothing of it ran), or damaged (empty, cut short) when it could not be read."""
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if not (found or detail or isinstance(e, pickle.UnpicklingError)):
        first = text.splitlines()[0][:160] if text else "no data"
        return DamagedCheckpoint(f"checkpoint file {path} is damaged: it cannot be read "
                                 f"({type(e).__name__}: {first})")
    kind = detail.group(1) if detail else type(e).__name__
    what = f"it holds {found.group(1)}" if found else f"it is not plain tensor data ({kind})"
    return CheckpointError(f"refusing checkpoint file {path}: {what}, which this trainer never writes; "
                           "it was not loaded")


def check_safetensors(path: str, checkpoint_path: str) -> None:
    """A safetensors file that is whole: its header parses and covers the file (no tensor is read)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise DamagedCheckpoint(f"checkpoint {checkpoint_path} is damaged: {path} is missing")
    try:
        with safe_open(path, "pt"):
            pass
    except Exception as e:
        raise DamagedCheckpoint(f"checkpoint {checkpoint_path} is damaged: {path} is not a whole safetensors file "
                                f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None
