"""A real SLURM cluster for the tests: munged, slurmctld and slurmd with a generated
slurm.conf, every file in one temporary directory.

- `Cluster()`: one node, `localhost`, on 127.0.0.1.
- `Cluster(nodes=3)`: nodes `node1`..`node3`, each a host of its own (tests/netns_hosts.py:
  a network namespace with its own address, host name and hosts file) running its own
  slurmd; slurmctld and munged run in this (the root) namespace and are reached from the
  nodes at the bridge's address, under the name `ldmctl`.

Debian's packages (`slurmctld slurmd slurm-client munge`) are installed when missing and
this process is root; nothing outside the temporary directory (and, for nodes, what
netns_hosts creates and removes) is written except by apt. Every daemon started here is
stopped by `stop()`, by the pid in its pid file.

    python tests/slurm_cluster.py [--nodes 3]   # start one, print how to use it, stop on Enter
"""
from __future__ import annotations

import os
import pwd
import random
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import netns_hosts

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "munged", "mungekey")
NODE = "localhost"  # the one-node cluster's node: the first host of every job's node list, 127.0.0.1 everywhere
CONTROLLER = "ldmctl"  # slurmctld's (and the root namespace's) name on the nodes of a multi-node cluster


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
    """`start()` brings the daemons up (about 2 s); `env` is what a client needs (SLURM_CONF).
    With `nodes`, `net` holds the hosts and `node_names` their names, in node-list order."""

    def __init__(self, base: str | None = None, nodes: int = 0, cpus_per_node: int = 0):
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node or os.cpu_count() or 1
        self.node_names = [f"node{i + 1}" for i in range(nodes)] if nodes else [NODE]
        self.net: netns_hosts.Hosts | None = None
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
        if self.net:
            # slurmctld accepts only a controller name that is its own host name or "localhost";
            # the nodes reach it at the address in parentheses, the bridge's.
            controller = f"localhost({self.net.gateway})"
            # Gres=gpu:1 without a device file: `--gpus-per-node=1` is accepted as on a GPU cluster,
            # and the job's CPU rank stands in for the GPU.
            nodes = "\n".join(f"NodeName={n} NodeHostname={n} NodeAddr={self.net.hosts[n].addr} "
                              f"CPUs={self.cpus_per_node} Gres=gpu:1 State=UNKNOWN" for n in self.node_names)
            with open(os.path.join(b, "gres.conf"), "w") as f:
                f.write("AutoDetect=off\nName=gpu File=/dev/null\n")  # no device is bound (task/none)
        else:
            controller = f"{NODE}(127.0.0.1)"
            nodes = f"NodeName={NODE} NodeHostname={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus_per_node} State=UNKNOWN"
        conf = f"""\
ClusterName=ldmtest
{"GresTypes=gpu" if self.net else ""}
# Job ids set the rendezvous port (trainer/core/dist.py): another test cluster on this machine starts elsewhere.
FirstJobId={random.randrange(1000, 9000)}
SlurmctldHost={controller}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={self.socket},cred_expire=10
StateSaveLocation={b}/state
# One slurmd per node on this machine: %n is the node's name.
SlurmdSpoolDir={b}/spool/%n
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd-%n.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd-%n.log
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
# A lost node comes back into service when its slurmd registers again.
ReturnToService=2
# A node whose slurmd does not answer for this long is DOWN, and its jobs end (and requeue);
# the default, 300 s, would hold a test that loses a node for five minutes.
SlurmdTimeout=10
# Finished jobs stay visible to `scontrol show job` for the tests' assertions.
MinJobAge=3600
KillWait=10
InactiveLimit=0
{nodes}
PartitionName=debug Nodes={",".join(self.node_names)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
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
        try:
            if self.nodes:
                self.net = netns_hosts.Hosts(self.node_names, extra_names={CONTROLLER: "gateway"}).create()
            self.write_conf()
            self._start_munge()
            subprocess.run([_sbin("slurmctld"), "-f", self.conf, "-i"], check=True, env=self.env,
                           capture_output=True, text=True)
            self.pid_files.append(os.path.join(self.base, "slurmctld.pid"))
            for node in self.node_names:
                self.start_node(node)
            self._wait_idle()
        except Exception:
            self.stop()
            raise
        return self

    def start_node(self, node: str) -> None:
        """Start the node's slurmd (again, after `kill_node`), on its own host where there are several."""
        os.makedirs(os.path.join(self.base, "spool", node), exist_ok=True)
        argv = [_sbin("slurmd"), "-f", self.conf, "-N", node]
        subprocess.run(self.net.argv(node, argv) if self.net else argv, check=True, env=self.env,
                       capture_output=True, text=True)
        pid_file = os.path.join(self.base, f"slurmd-{node}.pid")
        if pid_file not in self.pid_files:
            self.pid_files.append(pid_file)

    def kill_node(self, node: str) -> int:
        """A node lost: SIGKILL every process on it, its slurmd and the job's tasks; how many."""
        assert self.net, "kill_node needs a multi-node cluster"
        return self.net.kill(node)

    def node_states(self) -> dict[str, str]:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
        return dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)

    def _wait_idle(self, timeout: float = 60, nodes: list[str] | None = None) -> None:
        deadline = time.time() + timeout
        states: dict[str, str] = {}
        while time.time() < deadline:
            states = self.node_states()
            if all(states.get(n) in ("idle", "mix", "alloc") for n in nodes or self.node_names):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the SLURM nodes did not come up within {timeout:.0f} s (sinfo: {states}); logs in "
                           f"{self.base}/log")

    wait_idle = _wait_idle

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
        """Stop every daemon this cluster started (slurmds, then slurmctld, then munged) and
        remove the nodes' hosts."""
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
        if self.net:
            self.net.destroy()
            self.net = None


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Start a test SLURM cluster; Enter stops it.")
    p.add_argument("--nodes", type=int, default=0, help="nodes, each a network namespace (0: one node on 127.0.0.1)")
    args = p.parse_args()
    c = Cluster(nodes=args.nodes).start()
    print(f"export SLURM_CONF={c.conf}    # then: sinfo; srun -N {max(args.nodes, 1)} hostname; launch/submit.py ...")
    if c.net:
        for name, h in c.net.hosts.items():
            print(f"{name}: {h.addr}, a shell on it: {shlex.join(c.net.argv(name, ['bash']))}")
    try:
        input("cluster up; Enter stops it\n")
    finally:
        c.cancel_all()
        c.stop()
        shutil.rmtree(c.base, ignore_errors=True)
