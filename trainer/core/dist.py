"""The one place that reads launcher environment variables and sets up process groups.

torchrun, the `deepspeed` launcher and SLURM's `srun` each describe a process's place in
the job differently; everything else in the project asks `world()` instead.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import time

import torch
import torch.distributed as dist

from trainer.core.errors import LaunchError
from trainer.core.netroute import expand_nodelist, gloo_interface, local_addr_towards, resolve


@dataclasses.dataclass(frozen=True)
class World:
    rank: int  # global rank of this process
    local_rank: int  # rank on this node (selects the GPU)
    size: int  # number of processes in the job

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_var(name: str, lo: int, hi: int | None = None, default: int | None = None) -> int:
    """A launcher variable as an integer in [lo, hi), or a LaunchError naming it."""
    raw = os.environ.get(name)
    if raw is None and default is not None:
        return default
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise LaunchError(f"{name}={raw!r} is not an integer; it comes from the launcher (torchrun, deepspeed, "
                          "srun): do not set it by hand") from None
    if value < lo or (hi is not None and value >= hi):
        bound = f"in {lo}..{hi - 1}" if hi is not None else f">= {lo}"
        raise LaunchError(f"{name}={value} must be {bound}")
    return value


def world() -> World:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, deepspeed launcher
        size = _int_var("WORLD_SIZE", 1)
        return World(_int_var("RANK", 0, size), _int_var("LOCAL_RANK", 0, default=0), size)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun
        size = _int_var("SLURM_NTASKS", 1)
        return World(_int_var("SLURM_PROCID", 0, size), _int_var("SLURM_LOCALID", 0, default=0), size)
    return World(0, 0, 1)


def lost_peer(e: BaseException) -> str | None:
    """One line for a collective that failed because a peer died, hung or lost its network
    (gloo: "Connection reset by peer", "Timed out waiting ... for recv"; torch's DistError
    family), or None for any other error. The rank's own traceback says nothing the user can
    act on: the job ends, and rerunning it resumes from the last complete checkpoint."""
    text = str(e).strip()
    gloo_peer = "gloo" in text and any(k in text for k in ("Connection reset", "Connection closed", "Timed out",
                                                            "Broken pipe", "Connection refused"))
    if not (isinstance(e, getattr(dist, "DistError", ())) or gloo_peer):  # NCCL's: DistBackendError
        return None
    w = world()
    first = text.splitlines()[0] if text else type(e).__name__
    return (f"rank {w.rank} of {w.size} on {socket.gethostname()}: a collective failed, a peer is gone or hung "
            f"({first[:300]}); rerun the job to resume from its last complete checkpoint")


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", world().local_rank)
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_job_id() -> str | None:
    """The SLURM job this process belongs to (an array task's own id), or None outside SLURM.
    It goes to `scontrol` as an argument: anything but digits is refused (-h would be an option)."""
    raw = os.environ.get("SLURM_JOB_ID") or None
    if raw is not None and not (raw.isascii() and raw.isdigit()):
        raise LaunchError(f"SLURM_JOB_ID={raw[:40]!r} is not a job number; SLURM sets it: do not set it by hand")
    return raw


def _slurm_nodelist() -> tuple[str, str]:
    """(the variable's name, its value) of the job step's node list, the first one set."""
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if os.environ.get(name):
            return name, os.environ[name]
    return "SLURM_JOB_NODELIST", ""


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
    name, nodelist = _slurm_nodelist()
    job = slurm_job_id()
    if not nodelist or job is None:
        raise LaunchError("SLURM_PROCID is set but SLURM_JOB_NODELIST or SLURM_JOB_ID is not: "
                          "start the ranks with srun")
    try:
        hosts = expand_nodelist(nodelist)
    except ValueError as e:
        raise LaunchError(f"{name}={nodelist[:80]!r} is not a SLURM node list ({e}); SLURM sets it: do not set it "
                          "by hand") from None
    if not hosts:
        raise LaunchError(f"{name}={nodelist[:80]!r} names no host")
    return hosts[0], 20000 + int(job) % 10000


def _slurm_nodes() -> list[str]:
    nodelist = _slurm_nodelist()[1]
    try:
        return expand_nodelist(nodelist)
    except ValueError:
        return []


def _check_rendezvous(source: str) -> tuple[str, int, str]:
    """MASTER_ADDR and MASTER_PORT checked before any rank waits on them: (address, port, its IP)."""
    addr, raw_port = os.environ["MASTER_ADDR"], os.environ.get("MASTER_PORT")
    port = _int_var("MASTER_PORT", 1, 65536) if raw_port is not None else None
    if port is None:
        raise LaunchError("MASTER_PORT is not set: the launcher sets it with MASTER_ADDR")
    ip = resolve(addr, port)
    if ip is None:
        raise LaunchError(f"MASTER_ADDR={addr} ({source}) does not resolve on {socket.gethostname()}: it must name "
                          "rank 0's host as every node resolves it (DNS or /etc/hosts)")
    return addr, port, ip


def _prepare_rendezvous(w: World, source: str) -> str | None:
    """Check MASTER_ADDR/MASTER_PORT and, for gloo, choose the interface towards the other
    hosts (GLOO_SOCKET_IFNAME, unless set); this host's address towards rank 0."""
    env = os.environ
    master, _, master_ip = _check_rendezvous(source)
    if "GLOO_SOCKET_IFNAME" in env or torch.cuda.is_available():  # NCCL picks its own (InfiniBand first)
        return local_addr_towards(master_ip)
    local_size = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or env.get("SLURM_NTASKS_PER_NODE", "")
    nodes = _slurm_nodes()
    spans_hosts = len(nodes) > 1 or (local_size.isdigit() and int(local_size) < w.size)
    interface, addr = gloo_interface(master_ip, [h for h in nodes if h != master], spans_hosts, master)
    if interface:
        env["GLOO_SOCKET_IFNAME"] = interface
    return addr


def _share_cpu_threads(env) -> None:
    """CPU ranks that one launcher started on a host split its cores between them. torch
    gives every process a thread per core, so 2 ranks on 2 cores run 4 busy OpenMP threads and
    spin against each other: ZeRO-0 steps took 2x as long here. torchrun avoids it by setting
    OMP_NUM_THREADS=1; the deepspeed launcher sets nothing. A user's OMP_NUM_THREADS wins, and
    srun's tasks are left alone (SLURM binds each to its own CPUs: --cpus-per-task)."""
    local = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or ""  # torchrun's, deepspeed's
    if "OMP_NUM_THREADS" in env or not local.isdigit() or int(local) < 2:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // int(local)))


# What `accelerate launch` asks of a script through the environment (accelerate/utils/launch.py), and the
# job's own setting that does it: its processes and machines arrive as torchrun's RANK/WORLD_SIZE, which
# every job reads; these it would ignore, so they are refused rather than dropped silently (#29).
_ACCELERATE = {"ACCELERATE_MIXED_PRECISION": ("no", "precision=bf16|fp16|fp32 in the job's config"),
               "ACCELERATE_USE_DEEPSPEED": ("false", "zero_stage= and offload_optimizer= (the job builds its own "
                                            "DeepSpeed engine)"),
               "ACCELERATE_USE_FSDP": ("false", "zero_stage=3 (DeepSpeed's sharding)"),
               "ACCELERATE_DYNAMO_BACKEND": ("no", "compile=true (the UNet job)")}


def check_accelerate(env=os.environ) -> None:
    """A one-line LaunchError naming the first `accelerate launch` setting the job would not honour."""
    for var, (neutral, instead) in _ACCELERATE.items():
        value = env.get(var, neutral)
        if value.lower() not in (neutral, "", "false", "0"):
            raise LaunchError(f"accelerate launch set {var}={value}, which this job does not read: use {instead}; "
                              "launch with torchrun, deepspeed or srun (accelerate launch works too, for the number "
                              "of processes and machines only)")


def init(timeout_s: int = 600) -> World:
    """Join the job's process group (gloo on CPU, nccl on GPU); a no-op when already joined.

    A single process started with plain `python` still gets a one-member group so that the
    DeepSpeed engine and collectives work the same way as under a launcher.
    """
    w = world()
    if dist.is_available() and dist.is_initialized():
        return w
    slurm_job_id()  # refused now, in one line, rather than when a preemption asks scontrol to requeue it
    check_accelerate()
    env = os.environ
    init_method = None  # env://: the launcher's (or SLURM's) MASTER_ADDR and MASTER_PORT
    source = "set by the launcher"
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
            raise LaunchError(f"WORLD_SIZE={w.size} but MASTER_ADDR is not set: start multi-process jobs with "
                              "torchrun, deepspeed or srun")
        env["MASTER_ADDR"] = rendezvous[0]
        env.setdefault("MASTER_PORT", str(rendezvous[1]))
        source = "the first node of SLURM_JOB_NODELIST"
    addr = _prepare_rendezvous(w, source) if w.size > 1 else None
    if torch.cuda.is_available():
        torch.cuda.set_device(w.local_rank)
    else:
        _share_cpu_threads(env)
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
    t0 = time.perf_counter()
    try:
        dist.init_process_group(backend, timeout=timeout, init_method=init_method,
                                **({"rank": 0, "world_size": 1} if init_method else {}))
        if w.size > 1:
            dist.barrier()  # every pair of ranks connected: the group is usable
    except (RuntimeError, TimeoutError) as e:  # torch's DistStoreError, DistNetworkError and gloo's errors
        if w.size == 1:
            raise
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LaunchError(f"rank {w.rank} of {w.size} on {socket.gethostname()} did not meet its peers at "
                          f"MASTER_ADDR={env['MASTER_ADDR']} MASTER_PORT={env['MASTER_PORT']} within "
                          f"{timeout_s} s (dist_timeout_s): {why}") from None
    if w.size > 1:
        via = f", gloo via {env['GLOO_SOCKET_IFNAME']}" if backend == "gloo" and "GLOO_SOCKET_IFNAME" in env else ""
        print(f"rank {w.rank}/{w.size} on {socket.gethostname()} ({addr or '?'}{via}) met its peers at "
              f"{env['MASTER_ADDR']}:{env['MASTER_PORT']} in {time.perf_counter() - t0:.2f} s", flush=True)
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
