"""Preemption inside a running job: SLURM's warning signal or SIGTERM becomes a checkpoint.

`--signal=USR1@SECONDS` makes SLURM send SIGUSR1 to every process of the job's steps (not to
the batch shell: that is `B:`) that long before the time limit; SIGTERM comes at the limit
itself, on scancel and on preemption. `Preemption` turns either into a flag; once per step
the ranks agree on it (one all-reduce), all write a checkpoint and the processes exit 0.
After SIGUSR1 rank 0 first asks SLURM to requeue the job, and the requeued job starts the
same script, which resumes from that checkpoint. Both trainers use it; trainer/slurm.py
writes the scripts that ask for the signal.
"""
from __future__ import annotations

import signal
import subprocess
import threading

from trainer.core import dist


class Preemption:
    """SIGUSR1 (SLURM's warning before the time limit) or SIGTERM (the limit itself, scancel,
    preemption) sets a flag instead of ending the process; `requested()` agrees on it across
    ranks, the run stops with a checkpoint, and `finish()` requeues the job after a warning.

    Only a warning requeues: SIGTERM means SLURM is ending the job itself, and requeueing then
    would undo a user's scancel (`scontrol requeue` accepts a job being cancelled); a job
    preempted with PreemptMode=REQUEUE is requeued by SLURM anyway.

    Create it before the DataLoader forks its workers: they inherit the handler. SLURM signals
    every process of a step, workers included, and SIGUSR1's default action would kill them
    (their SIGTERM is data_pipeline.loader's business).
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
    WARNED, ENDING = 1, 2  # agreed across ranks with MAX: one SIGTERM anywhere means no requeue

    def __init__(self):
        self.received: str | None = None  # the first signal's name
        self.code = 0  # 0, WARNED or ENDING on this rank
        self.agreed = 0  # the same across ranks once requested() said yes: this invocation stops early
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name
        self.code = max(self.code, self.ENDING if signum == signal.SIGTERM else self.WARNED)

    def requested(self) -> bool:
        """Collective: True on every rank when any rank received a signal. Every rank must
        call it at the same point of the loop: a rank that stopped alone would leave the
        others waiting in the next collective, and the checkpoint is a collective save."""
        self.agreed = int(dist.all_reduce_max(float(self.code)))
        return self.agreed > 0

    def finish(self, checkpoint_path: str | None) -> bool:
        """After the run stopped early for a signal: after a warning rank 0 requeues the SLURM
        job (SLURM then ends this one; the requeued job resumes from `checkpoint_path`).
        Returns whether it stopped early."""
        if not self.agreed:
            return False
        if dist.world().is_main:
            # Printed before the requeue: SLURM ends the job right after it.
            print(f"stopped early on {self.received or 'a signal to another rank'}; checkpoint {checkpoint_path}",
                  flush=True)
            print(requeue() if self.agreed == self.WARNED else
                  "not requeued after SIGTERM (SLURM is ending the job); rerun or resubmit to resume", flush=True)
        return True

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def requeue() -> str:
    """Ask SLURM to requeue this job; returns what happened, as a clause for the log.

    SLURM then terminates the running job (SIGTERM, which `Preemption` absorbs, then SIGKILL
    after KillWait), keeps its id and starts its batch script again once it is eligible
    (after the credential lifetime, 120 s by default). Jobs submitted with --no-requeue and
    interactive allocations cannot be requeued; they end here and resume when rerun."""
    job = dist.slurm_job_id()
    if job is None:
        return "not a SLURM job: rerun the same command to resume"
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol requeue {job} failed ({e}); resubmit the job to resume"
    # scontrol runs inside this job's step: SLURM ending the step for the requeue may kill it
    # (SIGTERM) before it exits, which also means the requeue was accepted.
    if proc.returncode not in (0, -signal.SIGTERM):
        why = (proc.stderr or proc.stdout).strip().splitlines()
        return f"scontrol requeue {job} failed ({why[-1] if why else proc.returncode}); resubmit the job to resume"
    return f"requeued SLURM job {job}: it resumes from there when it starts again"
