"""The one place that reads launcher environment variables and sets up process groups.

torchrun, the `deepspeed` launcher and SLURM's `srun` each describe a process's place in
the job differently; everything else in the project asks `world()` instead.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import socket

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class World:
    rank: int  # global rank of this process
    local_rank: int  # rank on this node (selects the GPU)
    size: int  # number of processes in the job

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, deepspeed launcher
        return World(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun
        return World(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]))
    return World(0, 0, 1)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", world().local_rank)
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(timeout_s: int = 600) -> World:
    """Join the job's process group (gloo on CPU, nccl on GPU); a no-op when already joined.

    A single process started with plain `python` still gets a one-member group so that the
    DeepSpeed engine and collectives work the same way as under a launcher.
    """
    w = world()
    if dist.is_available() and dist.is_initialized():
        return w
    env = os.environ
    env.setdefault("RANK", str(w.rank))
    env.setdefault("LOCAL_RANK", str(w.local_rank))
    env.setdefault("WORLD_SIZE", str(w.size))
    if w.size == 1:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    elif "MASTER_ADDR" not in env:
        raise RuntimeError(
            "MASTER_ADDR is not set: start multi-process jobs with torchrun, deepspeed or srun"
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(w.local_rank)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # A bounded timeout turns a dead peer into an error instead of a hang.
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return w


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def all_gather_objects(obj):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
