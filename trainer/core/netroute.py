"""This host's view of the network, for finding a job's peers: SLURM's compressed node lists,
name resolution, the local address and interface that the routing table picks towards a peer.
It reads no launcher variables (trainer/core/dist.py does, and passes what it found)."""
from __future__ import annotations

import ipaddress
import itertools
import math
import re
import socket
import struct

from trainer.core.errors import LaunchError


MAX_HOSTS = 100_000  # a node list naming more is refused before it is spelt out (no cluster has as many)


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list as host names: `gpu[01-03,07],login1` ->
    gpu01 gpu02 gpu03 gpu07 login1 (zero padding kept; several bracket groups in one name
    give their product), the order of `scontrol show hostnames`."""
    hosts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist + ","):
        depth += (ch == "[") - (ch == "]")
        if depth not in (0, 1):
            raise ValueError(f"unbalanced brackets in SLURM node list {nodelist[:80]!r}")
        if ch == "," and depth == 0:
            name = nodelist[start:i].strip()
            start = i + 1
            if not name:
                continue
            parts = re.split(r"\[([^\]]*)\]", name)  # text, ranges, text, ranges, ..., text
            choices = []
            for k, part in enumerate(parts):
                if k % 2 == 0:
                    choices.append([part])
                    continue
                options = []
                for item in part.split(","):
                    lo, _, hi = item.partition("-")
                    if not lo.isdigit() or (hi and not hi.isdigit()):
                        raise ValueError(f"cannot read host range [{part}] in SLURM node list {nodelist!r}")
                    if int(hi or lo) - int(lo) > MAX_HOSTS or int(hi or lo) < int(lo):
                        raise ValueError(f"host range [{part}] in SLURM node list {nodelist[:80]!r} is reversed or "
                                         f"spans more than {MAX_HOSTS} hosts")
                    options += [f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi or lo) + 1)]
                choices.append(options)
            if math.prod(len(c) for c in choices) + len(hosts) > MAX_HOSTS:
                raise ValueError(f"SLURM node list {nodelist[:80]!r} names more than {MAX_HOSTS} hosts")
            hosts += ["".join(c) for c in itertools.product(*choices)]
    if depth:
        raise ValueError(f"unbalanced brackets in SLURM node list {nodelist[:80]!r}")
    return hosts


def resolve(host: str, port: int | None = None) -> str | None:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError):
        return None


def local_addr_towards(ip: str) -> str | None:
    """This host's address that the routing table picks for reaching `ip` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((ip, 9))
            return s.getsockname()[0]
        except OSError:
            return None


def _ipv4_interfaces() -> dict[str, str]:
    """Every network interface with an IPv4 address: name -> address."""
    import fcntl

    found = {}
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue
        found[name] = socket.inet_ntoa(raw[20:24])
    return found


def _default_route_interface() -> str | None:
    try:
        with open("/proc/net/route") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if len(fields) > 2 and fields[1] == "00000000":
                    return fields[0]
    except OSError:
        pass
    return None


def gloo_interface(master_ip: str, peers: list[str], spans_hosts: bool,
                   master_addr: str | None = None) -> tuple[str | None, str | None]:
    """(interface, address) through which this host reaches the job's other hosts, or
    (None, address) where gloo's own choice is right (every rank on this host).

    gloo's own choice is the address this machine's host name resolves to. Where that is not
    one the other nodes can reach (Debian's `127.0.1.1 <hostname>` line, a management network,
    a container bridge), every pair of ranks across nodes waits for a connection that never
    comes. The route towards rank 0 names the right interface; rank 0 itself, whose own name
    may resolve to loopback, takes the route towards another node of the allocation, or
    without one (torchrun, deepspeed) the default route's interface."""
    interfaces = _ipv4_interfaces()
    for ip in [master_ip, *filter(None, map(resolve, peers))]:
        if ipaddress.ip_address(ip).is_loopback:
            continue
        local = local_addr_towards(ip)
        if local and not ipaddress.ip_address(local).is_loopback:
            return next((n for n, a in interfaces.items() if a == local), None), local
    if not spans_hosts:
        return None, local_addr_towards(master_ip)
    outside = {n: a for n, a in interfaces.items() if not ipaddress.ip_address(a).is_loopback}
    name = _default_route_interface()
    if name not in outside and len(outside) == 1:
        name = next(iter(outside))
    if name not in outside:
        raise LaunchError(f"MASTER_ADDR={master_addr or master_ip} is this host, and which of its interfaces "
                          f"({', '.join(outside) or 'none but loopback'}) the other nodes reach it through is not "
                          "clear: set GLOO_SOCKET_IFNAME (or MASTER_ADDR to the address they use)")
    return name, outside[name]
