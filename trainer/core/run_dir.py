"""One trainer per run directory (#27): the second one started on it is refused in one line, instead of
resuming the first one's checkpoint, training beside it and rewriting its log."""
from __future__ import annotations

import functools
import os

from trainer.core.errors import ConfigError

_HELD: dict[str, int] = {}  # run directories this process holds: real path -> the locked file's descriptor


def claim_run_dir(run_dir: str, other_host_wait_s: float = 180.0) -> None:
    """Hold `run_dir/run.lock` for as long as this process runs (or until `release_run_dir`): a second
    trainer on the same run directory is refused in one line instead of resuming the first one's
    checkpoint, training beside it and rewriting its log (#27). flock: released by the kernel when
    the process ends, however it ends; NFS and Lustre mounted with locking carry it across nodes.

    A lock held from another host may be a node that crashed: its lock lives on until the file
    server's lease runs out (NFSv4: 90 s by default), and the job SLURM requeued after the crash must
    not be refused for it. So a holder on another host is waited for, up to `other_host_wait_s`."""
    import fcntl
    import socket
    import time

    os.makedirs(run_dir, exist_ok=True)
    key = os.path.realpath(run_dir)
    if key in _HELD:
        return
    path = os.path.join(run_dir, "run.lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:  # a link planted there (ELOOP), a folder this user cannot write
        raise ConfigError(f"cannot open {path} to hold the run directory: {e.strerror}; it must be a plain file "
                          "this user can write") from None
    here, waited_since = socket.gethostname(), None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        elsewhere = holder.startswith("pid ") and not holder.endswith(f" on {here}")
        if waited_since is None and elsewhere and other_host_wait_s > 0:
            waited_since = time.monotonic()
            print(f"run directory {run_dir} is held by {holder}: waiting up to {other_host_wait_s:.0f} s in case "
                  "that node is gone and its lock has not expired yet", flush=True)
        if waited_since is None or time.monotonic() - waited_since > other_host_wait_s:
            os.close(fd)
            raise ConfigError(f"run directory {run_dir} is in use by another trainer ({holder}); wait for it to "
                              "end or give this run its own run_dir")
        time.sleep(2.0)
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
