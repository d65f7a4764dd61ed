"""A real one-node SLURM cluster on 127.0.0.1 for the tests: munged, slurmctld and slurmd
with a generated slurm.conf, every file in one temporary directory.

Debian's packages (`slurmctld slurmd slurm-client munge`) are installed when missing and
this process is root; nothing outside the temporary directory is written except by apt.
Every daemon started here is stopped by `stop()`, by the pid in its pid file.

    python tests/slurm_cluster.py   # start one, print `export SLURM_CONF=...`, stop on Enter
"""
from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "munged", "mungekey")
NODE = "localhost"  # node name = the first host of every job's node list: resolves to 127.0.0.1 everywhere


class Unavailable(RuntimeError):
    """SLURM cannot be had here (no packages and no root to install them); the reason in one line."""


def ensure_installed() -> None:
    """Install the packages where missing; raise Unavailable where that, or running them, cannot be done."""
    missing = [b for b in BINARIES if not shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if not missing:
        if os.geteuid() != 0:  # slurmd launches job steps as their user; munged runs as the munge user
            raise Unavailable("SLURM is installed, but its daemons (slurmctld, slurmd, munged) need root to start")
        return
    if os.geteuid() != 0:
        raise Unavailable(f"SLURM is not installed ({', '.join(missing)} missing) and installing "
                          f"{' '.join(PACKAGES)} needs root")
    if not shutil.which("apt-get"):
        raise Unavailable(f"SLURM is not installed ({', '.join(missing)} missing) and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Debian's policy layer keeps the packages' own services (munge, slurmctld, slurmd) from
    # being started by the installation: the tests run private daemons and nothing else.
    policy = "/usr/sbin/policy-rc.d"
    created = not os.path.exists(policy)
    if created:
        with open(policy, "w") as f:
            f.write("#!/bin/sh\n# written by ldm-train's tests while installing SLURM; removed after\nexit 101\n")
        os.chmod(policy, 0o755)
    try:
        for args in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
            proc = subprocess.run(args, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr or proc.stdout).strip().splitlines()
                raise Unavailable(f"{' '.join(args)} failed: {last[-1] if last else proc.returncode}")
    finally:
        if created:
            os.remove(policy)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def _sbin(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


class Cluster:
    """`start()` brings the daemons up (about 2 s); `env` is what a client needs (SLURM_CONF)."""

    def __init__(self, base: str | None = None):
        # Not under pytest's tmp dir: munged refuses a socket whose parent directories other
        # users cannot traverse, and pytest's are 0700.
        self.base = base or tempfile.mkdtemp(prefix="ldm-slurm-")
        os.chmod(self.base, 0o755)
        self.conf = os.path.join(self.base, "slurm.conf")
        self.munge_dir = os.path.join(self.base, "munge")
        self.socket = os.path.join(self.munge_dir, "munge.socket")
        self.pid_files: list[str] = []
        self.env = {**os.environ, "SLURM_CONF": self.conf}

    def write_conf(self) -> None:
        for d in ("state", "spool", "log"):
            os.makedirs(os.path.join(self.base, d), exist_ok=True)
        b = self.base
        conf = f"""\
ClusterName=ldmtest
# Job ids set the rendezvous port (trainer/core/dist.py): another test cluster on this machine starts elsewhere.
FirstJobId={random.randrange(1000, 9000)}
SlurmctldHost={NODE}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={self.socket},cred_expire=10
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Look for startable jobs every second: a requeued job becomes eligible while nothing else happens.
SchedulerParameters=bf_interval=1,sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={b}/log/jobcomp.txt
MpiDefault=none
ReturnToService=2
# Finished jobs stay visible to `scontrol show job` for the tests' assertions.
MinJobAge=3600
KillWait=10
InactiveLimit=0
NodeName={NODE} NodeHostname={NODE} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        with open(self.conf, "w") as f:
            f.write(conf)

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        # munged wants its socket's directory owned by it and traversable by all (0755).
        os.makedirs(self.munge_dir, exist_ok=True)
        os.chmod(self.munge_dir, 0o755)
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        key = os.path.join(self.munge_dir, "munge.key")
        as_munge = ["setpriv", f"--reuid={munge.pw_uid}", f"--regid={munge.pw_gid}", "--clear-groups"]
        subprocess.run([*as_munge, _sbin("mungekey"), "-c", "-k", key], check=True, capture_output=True)
        pid = os.path.join(self.munge_dir, "munged.pid")
        subprocess.run([*as_munge, _sbin("munged"), f"--socket={self.socket}", f"--key-file={key}",
                        f"--pid-file={pid}", f"--log-file={self.munge_dir}/munged.log",
                        f"--seed-file={self.munge_dir}/munged.seed"], check=True, capture_output=True)
        self.pid_files.append(pid)

    def start(self) -> "Cluster":
        ensure_installed()
        self.write_conf()
        try:
            self._start_munge()
            for daemon, args in (("slurmctld", ["-i"]), ("slurmd", ["-N", NODE])):
                subprocess.run([_sbin(daemon), "-f", self.conf, *args], check=True, env=self.env,
                               capture_output=True, text=True)
                self.pid_files.append(os.path.join(self.base, f"{daemon}.pid"))
            self._wait_idle()
        except Exception:
            self.stop()
            raise
        return self

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        out = ""
        while time.time() < deadline:
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True)
            out = (proc.stdout + proc.stderr).strip()
            if proc.returncode == 0 and out in ("idle", "mix", "alloc"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the SLURM node did not come up within {timeout:.0f} s (sinfo: {out!r}); logs in "
                           f"{self.base}/log")

    def cancel_all(self, timeout: float = 60) -> None:
        """Cancel every job of this cluster and wait until their processes are gone: slurmd's
        job steps (slurmstepd) would outlive the daemons."""
        subprocess.run(["scancel", "--user", pwd.getpwuid(os.geteuid()).pw_name], env=self.env, capture_output=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            proc = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=self.env, capture_output=True, text=True)
            if proc.returncode != 0 or not proc.stdout.strip():
                return
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop every daemon this cluster started (slurmd, then slurmctld, then munged)."""
        for pid_file in reversed(self.pid_files):
            try:
                with open(pid_file) as f:
                    pid = int(f.read().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 20
            while time.time() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.pid_files = []


if __name__ == "__main__":
    c = Cluster().start()
    print(f"export SLURM_CONF={c.conf}")
    try:
        input("cluster up; Enter stops it\n")
    finally:
        c.stop()
