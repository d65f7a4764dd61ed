"""One trainer per run directory (#27): the second one started on it is refused in one line, instead of
resuming the first one's checkpoint, training beside it and rewriting its log."""
from __future__ import annotations

import functools
import os

from trainer.core.errors import ConfigError

_HELD: dict[str, int] = {}  # run directories this process holds: real path -> the locked file's descriptor


def claim_run_dir(run_dir: str) -> None:
    """Hold `run_dir/run.lock` for as long as this process runs (or until `release_run_dir`): a second
    trainer on the same run directory is refused in one line instead of resuming the first one's
    checkpoint, training beside it and rewriting its log (#27). flock: released by the kernel when
    the process ends, however it ends; NFS and Lustre mounted with locking carry it across nodes."""
    import fcntl
    import socket

    os.makedirs(run_dir, exist_ok=True)
    key = os.path.realpath(run_dir)
    if key in _HELD:
        return
    fd = os.open(os.path.join(run_dir, "run.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(f"run directory {run_dir} is in use by another trainer ({holder}); wait for it to end "
                          "or give this run its own run_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _HELD[key] = fd


def release_run_dir(run_dir: str) -> None:
    fd = _HELD.pop(os.path.realpath(run_dir), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor releases the flock


def holds_run_dir(job):
    """Decorate a job `job(cfg)`: the run directory it claims is released when it returns or raises
    (a process's end releases it anyway; this is for jobs run one after another in one process)."""
    @functools.wraps(job)
    def wrapper(cfg, *args, **kwargs):
        try:
            return job(cfg, *args, **kwargs)
        finally:
            release_run_dir(cfg.run_dir)
    return wrapper
