"""Shared fixtures: a real S3 endpoint on 127.0.0.1 and a tiny end-to-end data set.

Everything here runs on CPU in seconds and never touches the network beyond loopback.
"""
from __future__ import annotations

import os
import runpy
import signal
import subprocess
import time
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
DEEPSPEED = os.path.join(os.path.dirname(PY), "deepspeed")
TORCHRUN = os.path.join(os.path.dirname(PY), "torchrun")


def ranks_of(n: int, port: int | None = None) -> list[str]:
    """The command prefix that starts `n` ranks of a script on this host. torchrun: its ranks start about
    4 s sooner than the deepspeed launcher's (which imports DeepSpeed twice before starting them), and the
    jobs read either launcher's environment (trainer/core/dist.py). The tests of the deepspeed launcher
    itself (its /dev/shm buffers, a launcher per host, SLURM's per-node launch) use DEEPSPEED."""
    if n == 1:
        return [PY]
    return [TORCHRUN, "--nproc_per_node", str(n), "--master_addr", "127.0.0.1", "--master_port",
            str(port or free_port())]
# The tiny UNet at ZeRO-2, 60 steps of a global batch of 16 (2 ranks x 8), a log row every step
# and a checkpoint every 10: the one config that single-node runs (test_train_unet.py) and
# multi-node ones (test_slurm.py, test_multinode.py) train, so that their losses compare.
UNET_TWO_RANKS = ("model=tiny", "batch_per_rank=8", "lr=0.002", "warmup_samples=32", "zero_stage=2",
                  "total_samples=960", "log_every_samples=16", "checkpoint_every_samples=160", "keep_last=2",
                  "ema_halflife_samples=320", "ema_rampup_ratio=0")


LEFT_BEHIND: list[str] = []  # commands whose processes outlived them (reported at the end of the run)


class LoadDeadline:
    """A deadline of `seconds` on an idle machine: while the load average is above the number of cores,
    time counts slower by that ratio, so a wait fails on a hang and not because another job shares the
    machine (#27: the autoencoder's preemption test timed out at load 2.7 on 2 cores)."""

    def __init__(self, seconds: float):
        self.left, self.last = float(seconds), time.monotonic()

    def expired(self) -> bool:
        now = time.monotonic()
        busy = os.getloadavg()[0] / (os.cpu_count() or 1)
        self.left -= (now - self.last) / max(1.0, busy)
        self.last = now
        return self.left <= 0


def run_cmd(args: list[str], check: bool = True, env: dict | None = None, timeout: int = 600):
    """Run a project command from the repository root; returns the CompletedProcess.

    The command gets a process group of its own, and whatever of that group is still alive
    when it returns or times out (launcher ranks, loader workers) is killed and reported at
    the end of the run: on a 2-core CI machine one orphan spinning on a dead peer would slow
    every later test into its timeout. A timeout is an AssertionError with the output so far.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **(env or {})}
    proc = subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline, timed_out = LoadDeadline(timeout), False
    while True:
        try:
            out, err = proc.communicate(timeout=5)
            break
        except subprocess.TimeoutExpired:
            if deadline.expired():
                _kill_group(proc.pid)
                out, err = proc.communicate()
                timed_out = True
                break
    if _kill_group(proc.pid):
        LEFT_BEHIND.append(" ".join(args)[:200])
    if timed_out:
        raise AssertionError(f"{' '.join(args)} did not finish in {timeout} s:\n{out[-3000:]}\n{err[-5000:]}")
    result = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{out[-3000:]}\n{err[-5000:]}")
    return result


def run_script(script: str, argv: list[str], capfd) -> tuple[int, str, str]:
    """Run a project script as __main__ in this process, from the repository root; returns
    (exit code, stdout, stderr). For refusals and other early exits: the test process has the
    script's imports loaded already, where a subprocess spends 5-7 s importing them again
    (diffusers pulls in torch._dynamo). An exception other than SystemExit propagates, so a
    traceback fails the test as it would in a real process. Each script keeps one test that
    runs it as a real process."""
    old_argv, old_path, old_cwd = sys.argv, list(sys.path), os.getcwd()
    old_exit = os.environ.get("LDM_FULL_EXIT")
    os.environ["LDM_FULL_EXIT"] = "1"  # config.exit_now: sys.exit, not the end of this process
    path = os.path.join(ROOT, script)
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(path))  # as `python script` has it: benchmarks import their common.py
    os.chdir(ROOT)
    code: int | str | None = 0
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
        os.chdir(old_cwd)
        if old_exit is None:
            os.environ.pop("LDM_FULL_EXIT", None)
        else:
            os.environ["LDM_FULL_EXIT"] = old_exit
    if isinstance(code, str):  # sys.exit("error: ...") prints to stderr in the interpreter, not here
        print(code, file=sys.stderr)
        code = 1
    out, err = capfd.readouterr()
    return code or 0, out, err


def _kill_group(pgid: int) -> bool:
    """SIGKILL every process left in the group; True when there was one."""
    try:
        os.killpg(pgid, signal.SIGKILL)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def pytest_terminal_summary(terminalreporter):
    """Machine state at the end of the run, for reading a failed CI log: memory, /dev/shm
    (tmpfs, so its files are RAM) and commands that left processes behind."""
    tr = terminalreporter
    try:
        meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        avail_gib = int(meminfo["MemAvailable"].split()[0]) / 2**20
        shm = os.statvfs("/dev/shm")
        shm_used_gib = (shm.f_blocks - shm.f_bfree) * shm.f_frsize / 2**30
        tr.write_line(f"machine: {avail_gib:.1f} GiB memory available, /dev/shm holds {shm_used_gib:.1f} GiB, "
                      f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    except (OSError, KeyError, ValueError):
        pass
    for cmd in LEFT_BEHIND:
        tr.write_line(f"left processes behind (killed): {cmd}")


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server (the one s3fs's own tests use) on 127.0.0.1, with dummy credentials."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield f"http://{host}:{port}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket; returns (s3://bucket URL, endpoint URL)."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    name = "test-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"s3://{name}", s3_endpoint


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """96 synthetic 16x16 images in 6 shards of 16."""
    out = tmp_path_factory.mktemp("shards")
    run_cmd([PY, "launch/make_synthetic.py", "--out", str(out), "--num", "96", "--per-shard", "16",
             "--resolution", "16"])
    return str(out)


@pytest.fixture(scope="session")
def tiny_cache(tiny_shards, tmp_path_factory):
    """A latent cache of tiny_shards made with the random tiny VAE (4x4x4 latents)."""
    out = tmp_path_factory.mktemp("latents")
    run_cmd([PY, "launch/cache_latents.py", f"data.urls={tiny_shards}", "data.resolution=16",
             f"out_url={out}", "vae=preset:tiny", "text_encoder=tiny", "batch_size=16"])
    return str(out)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def two_rank_run(tiny_cache, tmp_path_factory):
    """UNET_TWO_RANKS on 2 ranks of this host under the deepspeed launcher: (run_dir, port)."""
    run_dir = tmp_path_factory.mktemp("zero2") / "run"
    port = free_port()
    run_cmd([DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), "launch/train_unet.py", f"run_dir={run_dir}",
             f"data.urls={tiny_cache}", *UNET_TWO_RANKS])
    return run_dir, port


@pytest.fixture(scope="session")
def multinode():
    """A SLURM cluster of two nodes, each its own host (tests/slurm_cluster.py), for the session:
    slurmd per node in a network namespace, slurmctld and munged here."""
    import shutil

    import netns_hosts
    import slurm_cluster

    try:
        netns_hosts.check_available()
        slurm_cluster.ensure_installed()
    except (netns_hosts.Unavailable, slurm_cluster.Unavailable) as e:
        pytest.skip(f"no multi-node cluster: {e}")
    c = slurm_cluster.Cluster(nodes=2, cpus_per_node=2).start()
    try:
        yield c
    finally:
        c.cancel_all()
        c.stop()
        shutil.rmtree(c.base, ignore_errors=True)


def unet_losses(run_dir) -> list[dict]:
    from trainer.core.metrics import read_log

    return [r for r in read_log(os.path.join(run_dir, "log.jsonl")) if "loss" in r]


def assert_same_losses(reference, run_dir, tol: float = 1e-5) -> None:
    a, b = unet_losses(reference), unet_losses(run_dir)
    assert [r["step"] for r in b] == [r["step"] for r in a], (len(a), len(b))
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= tol, (ra, rb)


@pytest.fixture(scope="session")
def process_group():
    """A one-process group for in-process DeepSpeed engines, kept for the whole session:
    DeepSpeed caches its groups, so a group destroyed and made again leaves it holding dead
    ones. dist.init() run alone leaves no rendezvous variables behind for subprocesses."""
    from trainer.core import dist

    dist.init()
    yield


QUIET = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}


@pytest.fixture(scope="session")
def flow_folders(tmp_path_factory):
    """Tiny random-weight SD3 and Flux.1 pipeline folders (tests/flow_pipelines.py)."""
    from flow_pipelines import build_flow_pipeline

    root = tmp_path_factory.mktemp("flow_pipelines")
    return {family: build_flow_pipeline(family, str(root / family)) for family in ("sd3", "flux")}


@pytest.fixture(scope="session")
def flow_caches(flow_folders, tmp_path_factory):
    """{(family, text mode): cache} of 16 synthetic 32 px images: SD3's and Flux's states, Flux's token ids; Flux's
    T5 at 48 tokens (512 is slow here)."""
    root = tmp_path_factory.mktemp("flow_caches")
    run_cmd([PY, "launch/make_synthetic.py", "--out", str(root / "shards"), "--num", "16", "--per-shard", "8",
             "--resolution", "32"])
    out = {}
    for family, folder in flow_folders.items():
        for text in ("embeddings", "tokens") if family == "flux" else ("embeddings",):  # Flux's ids: test_flow_runs
            out[family, text] = str(root / f"{family}-{text}")
            run_cmd([PY, "launch/cache_latents.py", f"data.urls={root / 'shards'}", "data.resolution=32",
                     f"out_url={out[family, text]}", "batch_size=8", f"pretrained={folder}", f"text={text}",
                     *(["text_max_tokens=48"] if family == "flux" else [])], env=QUIET)  # 512 T5 tokens: slow here
    return out
