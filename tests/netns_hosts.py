"""Several hosts on one machine for the multi-node tests: each host a Linux network namespace
with its own address on a private bridge, its own host name, and a hosts file that resolves
every host's name, as a cluster's DNS would, and its own name to 127.0.1.1 on itself, as
Debian's installer writes /etc/hosts (which is what sends gloo to loopback, see
trainer/core/netroute.py's gloo_interface).

Everything is made by `create()` and removed by `destroy()`: the bridge `ldmbr<tag>`, one
namespace `ldm<tag>-<host>` and veth pair per host, and a temporary folder with the hosts
file, which `argv()` binds over /etc/hosts in a mount namespace of the command's own (nothing
is written to /etc). The subnet is a free 10.x.y.0/24 that no route of this machine uses;
traffic stays on the bridge, which has no route anywhere else. Needs root and iproute2's
`ip netns`.
"""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time


class Unavailable(RuntimeError):
    """Namespaces cannot be made here; the reason in one line."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def check_available() -> None:
    """Raise Unavailable unless this process can make namespaces (root and `ip netns`)."""
    if os.geteuid() != 0:
        raise Unavailable("network namespaces need root")
    missing = [t for t in ("ip", "unshare", "nsenter") if not shutil.which(t)]
    if missing and shutil.which("apt-get"):  # Debian's iproute2 and util-linux, as slurm_cluster installs SLURM
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for args in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "iproute2", "util-linux"]):
            subprocess.run(args, env=env, capture_output=True)
        missing = [t for t in missing if not shutil.which(t)]
    if missing:
        raise Unavailable(f"no {', '.join(missing)} (iproute2, util-linux) to make network namespaces")
    name = f"ldmprobe{os.getpid()}"
    proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise Unavailable(f"`ip netns add` failed: {(proc.stderr or proc.stdout).strip()}")
    _ip("netns", "del", name, check=False)


@dataclasses.dataclass
class Host:
    name: str  # host name, as `hostname` prints it inside and as the others resolve it
    netns: str  # the namespace's name (`ip netns exec NETNS ...`)
    addr: str  # its IPv4 address on the bridge
    veth: str  # the root namespace's end of its veth pair (on the bridge)


class Hosts:
    """`Hosts(["node1", "node2"]).create()`; `.gateway` is the bridge's own address, where
    services of the root namespace (slurmctld, the S3 test server) are reached from the hosts."""

    def __init__(self, names: list[str], extra_names: dict[str, str] | None = None):
        self.tag = "%04x" % random.randrange(1 << 16)
        self.bridge = f"ldmbr{self.tag}"
        self.names = list(names)
        self.extra_names = dict(extra_names or {})  # more names for the hosts file: name -> "gateway"
        self.hosts: dict[str, Host] = {}
        self.gateway = ""
        self.dir = ""  # holds `hosts`

    def _free_subnet(self) -> str:
        used = _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "addr").stdout
        for _ in range(200):
            prefix = f"10.{random.randrange(16, 250)}.{random.randrange(1, 250)}"
            if f"{prefix}." not in used:
                return prefix
        raise RuntimeError("no free 10.x.y.0/24 subnet for the test hosts")

    def create(self) -> "Hosts":
        check_available()
        prefix = self._free_subnet()
        self.gateway = f"{prefix}.1"
        try:
            _ip("link", "add", "name", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, name in enumerate(self.names):
                h = Host(name, f"ldm{self.tag}-{name}", f"{prefix}.{11 + i}", f"ldm{self.tag}h{i}")
                self.hosts[name] = h
                _ip("netns", "add", h.netns)
                _ip("link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.netns)
                _ip("link", "set", h.veth, "master", self.bridge, "up")
                _ip("-n", h.netns, "link", "set", "lo", "up")
                _ip("-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
                _ip("-n", h.netns, "link", "set", "eth0", "up")
            self.dir = tempfile.mkdtemp(prefix=f"ldm{self.tag}-hosts-")
            os.chmod(self.dir, 0o755)
            for me in self.hosts.values():
                # As Debian installs a machine: its own name on 127.0.1.1, first; the others' real addresses.
                lines = ["127.0.0.1 localhost", f"127.0.1.1 {me.name}", "::1 localhost ip6-localhost"]
                lines += [f"{h.addr} {h.name}" for h in self.hosts.values()]
                lines += [f"{self.gateway} {n}" for n in self.extra_names]
                with open(self._hosts_file(me.name), "w") as f:
                    f.write("\n".join(lines) + "\n")
                os.chmod(self._hosts_file(me.name), 0o644)
            self._wait_reachable()
        except Exception:
            self.destroy()
            raise
        return self

    def _wait_reachable(self, timeout: float = 30) -> None:
        """Each bridge port forwards once it has left the listening state (at once without STP)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = []
            for h in self.hosts.values():
                try:
                    with open(f"/sys/class/net/{h.veth}/brport/state") as f:
                        states.append(f.read().strip())
                except OSError:
                    states.append("?")
            if all(s == "3" for s in states):  # BR_STATE_FORWARDING
                return
            time.sleep(0.2)
        raise RuntimeError(f"the ports of the test hosts' bridge {self.bridge} did not start forwarding")

    def _hosts_file(self, name: str) -> str:
        return os.path.join(self.dir, f"hosts-{name}")

    def argv(self, name: str, argv: list[str]) -> list[str]:
        """`argv` run on host `name`: in its network namespace, with its host name (a UTS
        namespace of its own) and the hosts file bound over /etc/hosts (a private mount
        namespace: the bind is seen by the command and its children only). Not `ip netns
        exec`: that mounts a fresh /sys without the cgroup tree, which slurmd needs."""
        h = self.hosts[name]
        return ["nsenter", f"--net=/run/netns/{h.netns}", "unshare", "--uts", "--mount", "--propagation", "private",
                "--", "sh", "-c", 'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"',
                h.name, self._hosts_file(name), *argv]

    def pids(self, name: str) -> list[int]:
        out = _ip("netns", "pids", self.hosts[name].netns, check=False).stdout.split()
        return [int(p) for p in out if p.isdigit()]

    def kill(self, name: str) -> int:
        """SIGKILL every process of host `name` (a node lost); how many there were."""
        killed = 0
        for _ in range(20):  # processes may fork while we kill
            pids = self.pids(name)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        return killed

    def destroy(self) -> None:
        """Kill whatever still runs on the hosts and remove everything `create()` made."""
        for name, h in self.hosts.items():
            self.kill(name)
            _ip("netns", "del", h.netns, check=False)
            _ip("link", "del", h.veth, check=False)  # gone with the namespace already, normally
        _ip("link", "del", self.bridge, check=False)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.hosts = {}
