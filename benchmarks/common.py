"""Helpers shared by the benchmarks: what machine this is, and how busy it was."""
from __future__ import annotations

import json
import os
import platform

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_busy_seconds() -> float | None:
    """CPU seconds all CPUs spent busy (or stolen by the hypervisor) since boot (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...: everything but idle and iowait
        return (sum(v[:8]) - v[3] - v[4]) / TICK
    except (OSError, IndexError, ValueError):
        return None


def write_json(path: str, figures: dict) -> None:
    """A benchmark's figures for `--json` (read by run_all.py), its folder created."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(figures, f, indent=2)
