"""The one place that reads launcher environment variables and sets up process groups.

torchrun, the `deepspeed` launcher and SLURM's `srun` each describe a process's place in
the job differently; everything else in the project asks `world()` instead.
"""
from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
import re
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


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list as host names: `gpu[01-03,07],login1` ->
    gpu01 gpu02 gpu03 gpu07 login1 (zero padding kept; several bracket groups in one name
    give their product), the order of `scontrol show hostnames`."""
    hosts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist + ","):
        depth += (ch == "[") - (ch == "]")
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
                    options += [f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi or lo) + 1)]
                choices.append(options)
            hosts += ["".join(c) for c in itertools.product(*choices)]
    return hosts


def slurm_job_id() -> str | None:
    """The SLURM job this process belongs to (an array task's own id), or None outside SLURM."""
    return os.environ.get("SLURM_JOB_ID") or None


def slurm_rendezvous() -> tuple[str, int] | None:
    """(MASTER_ADDR, MASTER_PORT) for ranks started by `srun`, or None when not under srun.

    The address is the first host of the job's node list, where srun puts task 0. The port
    is derived from the job id, so every task of a job computes the same one without talking
    to the others, and two jobs sharing a node (or an array's tasks) use different ones; it
    stays below Linux's ephemeral range (32768-60999) that outgoing connections draw from.
    """
    env = os.environ
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist or not env.get("SLURM_JOB_ID"):
        raise RuntimeError("SLURM_PROCID is set but SLURM_JOB_NODELIST or SLURM_JOB_ID is not: "
                           "start the ranks with srun")
    return expand_nodelist(nodelist)[0], 20000 + int(env["SLURM_JOB_ID"]) % 10000


def init(timeout_s: int = 600) -> World:
    """Join the job's process group (gloo on CPU, nccl on GPU); a no-op when already joined.

    A single process started with plain `python` still gets a one-member group so that the
    DeepSpeed engine and collectives work the same way as under a launcher.
    """
    w = world()
    if dist.is_available() and dist.is_initialized():
        return w
    env = os.environ
    init_method = None  # env://: the launcher's (or SLURM's) MASTER_ADDR and MASTER_PORT
    if w.size == 1 and "MASTER_ADDR" not in env:
        # A process started alone rendezvouses with itself on a free port given directly, not
        # through the environment: a process it starts later (a test's subprocess, sbatch's
        # copied environment) must not inherit a port in use or a RANK/WORLD_SIZE of 1.
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        env.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it
    else:
        env.setdefault("RANK", str(w.rank))
        env.setdefault("LOCAL_RANK", str(w.local_rank))
        env.setdefault("WORLD_SIZE", str(w.size))
    if w.size > 1 and "MASTER_ADDR" not in env:
        rendezvous = slurm_rendezvous()  # torchrun and deepspeed set MASTER_ADDR themselves
        if rendezvous is None:
            raise RuntimeError(
                "MASTER_ADDR is not set: start multi-process jobs with torchrun, deepspeed or srun"
            )
        env["MASTER_ADDR"] = rendezvous[0]
        env.setdefault("MASTER_PORT", str(rendezvous[1]))
    if torch.cuda.is_available():
        torch.cuda.set_device(w.local_rank)
    else:
        # With LOCAL_SIZE set (the `deepspeed` launcher sets it) DeepSpeed's CPU backend maps a
        # 69 MB shared-memory buffer per rank, /dev/shm/deepspeed_allreduce_buffer_*, that it
        # never unlinks, so every CPU run leaves its buffers in RAM until reboot, and where
        # /dev/shm is smaller (Docker's 64 MB) the rank crashes in that buffer's set-up. The
        # buffer serves only inference_all_reduce (tensor-parallel inference), never training.
        env.pop("LOCAL_SIZE", None)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # A bounded timeout turns a dead or hung peer into an error instead of a hang (for NCCL,
    # torch's watchdog then ends the process: TORCH_NCCL_ASYNC_ERROR_HANDLING's default).
    timeout = datetime.timedelta(seconds=timeout_s)
    # Groups made later without a timeout (DeepSpeed's data-parallel group, which carries the
    # gradient all-reduce) get torch's global default, 30 min for gloo and 10 for NCCL, not
    # this group's: give them the same one.
    c10d = dist.distributed_c10d
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if hasattr(c10d, name):
            setattr(c10d, name, timeout)
    dist.init_process_group(backend, timeout=timeout, init_method=init_method,
                            **({"rank": 0, "world_size": 1} if init_method else {}))
    return w


def _several() -> bool:
    """Whether this process is one of several ranks of a joined group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float) -> float:
    if not _several():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def all_reduce_max(value: float) -> float:
    if not _several():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def average_gradients(params) -> None:
    """Data parallelism without a wrapper: each gradient becomes its mean over the ranks, in
    one all-reduce of a flat copy. For the autoencoder trainer, whose LPIPS/GAN adaptive weight
    takes autograd.grad of the decoder's last layer, which DDP's reducer hooks do not allow
    alongside backward (the UNet's gradients go through DeepSpeed)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not _several():
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In place: the sum over ranks (CPU tensors go through the device for NCCL)."""
    if _several():
        on = t.to(device())
        dist.all_reduce(on)
        t.copy_(on)
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: rank `src`'s values on every rank."""
    if _several():
        dist.broadcast(t.data, src)
    return t


def all_gather_objects(obj):
    if not _several():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
