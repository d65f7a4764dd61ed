"""Multi-node without SLURM: `torchrun` and `deepspeed --hostfile --no_ssh --node_rank` with one
launcher per host, across the two hosts of conftest's `multinode` (network namespaces with
their own addresses, names and hosts files), and what a misconfigured launch says."""
import os
import random
import re
import signal
import subprocess
import time

import pytest

from conftest import DEEPSPEED, PY, ROOT, UNET_TWO_RANKS, assert_same_losses, run_cmd
from trainer.core import dist, netroute
from trainer.core.errors import LaunchError

TORCHRUN = os.path.join(os.path.dirname(PY), "torchrun")
PEERS = re.compile(r"rank (\d+)/2 on (\S+) \((\S+), gloo via (\S+)\) met its peers")


def on_each_node(hosts, argv_of, logs, timeout=300) -> dict[str, str]:
    """Start `argv_of(node_rank)` on node1 and node2 at once, as a user does on each machine;
    wait for both; their output by node. Whatever is left of them is killed."""
    procs = {}
    # The two hosts share this machine's 2 cores: a thread per rank (torchrun sets this itself).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    for rank, node in enumerate(("node1", "node2")):
        with open(logs / f"{node}.log", "w") as out:
            procs[node] = subprocess.Popen(hosts.argv(node, argv_of(rank)), cwd=ROOT, env=env, stdout=out,
                                           stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    try:
        for node, proc in procs.items():
            proc.wait(timeout=max(1, deadline - time.time()))
    finally:
        for proc in procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    outputs = {node: open(logs / f"{node}.log").read() for node in procs}
    for node, proc in procs.items():
        assert proc.returncode == 0, f"{node}: exit {proc.returncode}\n{outputs[node][-3000:]}"
    return outputs


def assert_one_rank_per_node(hosts, outputs):
    for rank, node in enumerate(("node1", "node2")):
        met = PEERS.findall(outputs[node])
        assert met == [(str(rank), node, hosts.hosts[node].addr, "eth0")], (node, outputs[node][-2000:])


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_a_launcher_per_host_trains_across_two_hosts_as_on_one(multinode, launcher, two_rank_run, tiny_cache,
                                                               tmp_path):
    """Each host's own name resolves to 127.0.1.1 there (Debian's hosts file): without
    trainer/core/dist.py's interface choice, gloo on node1 would listen on loopback."""
    hosts, run_dir = multinode.net, tmp_path / "run"
    port = random.randrange(20000, 30000)  # each host is a fresh namespace: every port is free there
    args = ["launch/train_unet.py", f"run_dir={run_dir}", f"data.urls={tiny_cache}", *UNET_TWO_RANKS]
    if launcher == "torchrun":
        def argv_of(rank):
            return [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                    "--master-addr", "node1", "--master-port", str(port), *args]
    else:
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("node1 slots=1\nnode2 slots=1\n")

        def argv_of(rank):
            return [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                    "--master_addr", "node1", "--master_port", str(port), *args]
    outputs = on_each_node(hosts, argv_of, tmp_path)
    assert_one_rank_per_node(hosts, outputs)
    assert "final checkpoint:" in outputs["node1"]
    assert_same_losses(two_rank_run[0], run_dir)


def test_rank_0s_interface_is_found_where_its_own_name_is_loopback(multinode):
    """On node1, node1 is 127.0.1.1: the route towards node2, or without a node list the only
    interface that leaves the host, is the one the other ranks reach it through."""
    code = ("from trainer.core import netroute as n; print(n.gloo_interface('127.0.1.1', ['node2'], True)); "
            "print(n.gloo_interface('127.0.1.1', [], True)); print(n.gloo_interface('127.0.1.1', [], False)[0])")
    out = subprocess.run(multinode.net.argv("node1", [PY, "-c", code]), cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    addr = multinode.net.hosts["node1"].addr
    assert out.stdout.splitlines() == [f"('eth0', '{addr}')", f"('eth0', '{addr}')", "None"], out.stdout + out.stderr


def test_node_lists_expand_like_scontrol_show_hostnames():
    assert netroute.expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert netroute.expand_nodelist("n[8-10]") == ["n8", "n9", "n10"]
    assert netroute.expand_nodelist("a[1-2]-b[3-4]") == ["a1-b3", "a1-b4", "a2-b3", "a2-b4"]
    assert netroute.expand_nodelist("localhost") == ["localhost"]


def test_rendezvous_comes_from_slurms_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NODELIST"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-10]")
    assert dist.world() == dist.World(rank=5, local_rank=1, size=8)
    assert dist.slurm_rendezvous() == ("gpu07", 20000 + 123456 % 10000)


def test_a_process_alone_joins_a_group_without_leaving_rendezvous_variables_to_its_children():
    """Every job calls dist.init(); run alone (a test, the lab, a login node) it must not leave
    RANK/WORLD_SIZE/MASTER_PORT behind: a child (a test's subprocess, an sbatch job, which copies
    the environment) would bind the port in use or take itself for rank 0 of 1."""
    code = ("import os; from trainer.core import dist; import torch.distributed as td; w = dist.init(); "
            "print(w.size, td.get_world_size(), sorted(k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', "
            "'MASTER_PORT') if k in os.environ))")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                                             "SLURM_PROCID", "SLURM_NTASKS")}
    out = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.stdout.split("\n")[0] == "1 1 []", out.stdout + out.stderr


def test_cpu_ranks_of_one_launcher_split_the_cores():
    """The deepspeed launcher (LOCAL_SIZE) and torchrun (LOCAL_WORLD_SIZE) start several ranks
    on a host: each takes its share of the cores, unless the user set OMP_NUM_THREADS; srun's
    tasks (bound to their own CPUs by SLURM) keep what they have."""
    import torch

    before, cores = torch.get_num_threads(), len(os.sched_getaffinity(0))
    try:
        for env, threads in (({"LOCAL_SIZE": "2"}, max(1, cores // 2)),
                             ({"LOCAL_WORLD_SIZE": str(4 * cores)}, 1),
                             ({"LOCAL_SIZE": "2", "OMP_NUM_THREADS": "3"}, before),
                             ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, before),
                             ({"LOCAL_SIZE": "1"}, before)):
            torch.set_num_threads(before)
            dist._share_cpu_threads(env)
            assert torch.get_num_threads() == threads, env
    finally:
        torch.set_num_threads(before)


def test_a_collective_that_lost_its_peer_is_one_line():
    reset = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [10.1.2.12]:8377: "
                         "Connection reset by peer. This is typically caused by a remote worker hanging\nmore")
    line = dist.lost_peer(reset)
    assert "a collective failed, a peer is gone or hung" in line and "Connection reset by peer" in line
    assert "\n" not in line and "resume from its last complete checkpoint" in line
    timeout = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                           "10000ms for recv operation to complete")
    assert "Timed out waiting 10000ms" in dist.lost_peer(timeout)
    assert dist.lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert dist.lost_peer(RuntimeError("gloo does not support this dtype")) is None


def test_launch_variables_are_checked_in_one_line_naming_the_variable(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for env, message in (({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 must be in 0..1"),
                         ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
                         ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK=-1 must be >= 0"),
                         ({"SLURM_PROCID": "4", "SLURM_NTASKS": "4"}, "SLURM_PROCID=4 must be in 0..3")):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            with pytest.raises(LaunchError, match=re.escape(message)):
                dist.world()
    monkeypatch.setenv("MASTER_ADDR", "no-such-node.invalid")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(LaunchError, match=r"MASTER_ADDR=no-such-node.invalid \(from SLURM\) does not resolve on "):
        dist._check_rendezvous("from SLURM")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for port, message in (("0", "MASTER_PORT=0 must be in 1..65535"), ("http", "MASTER_PORT='http' is not")):
        monkeypatch.setenv("MASTER_PORT", port)
        with pytest.raises(LaunchError, match=re.escape(message)):
            dist._check_rendezvous("")


def test_bad_slurm_variables_are_one_line_naming_the_variable(monkeypatch):
    """A job id or node list that SLURM would never set (#27): refused naming it, before any rank waits;
    a job id that is not a number never reaches `scontrol requeue` as an argument."""
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "SLURM_STEP_NODELIST", "SLURM_NODELIST"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    for job, nodes, message in (("12a", "n[1-2]", "SLURM_JOB_ID='12a' is not a job number"),
                                ("-h", "n[1-2]", "SLURM_JOB_ID='-h' is not a job number"),
                                ("12", "n[1-2", "SLURM_JOB_NODELIST='n[1-2' is not a SLURM node list"),
                                ("12", "n[a-b]", "SLURM_JOB_NODELIST='n[a-b]' is not a SLURM node list"),
                                ("12", "n[1-999999999]", "spans more than 100000 hosts"),
                                ("12", "n[5-1]", "is reversed"),
                                ("12", ",,", "SLURM_JOB_NODELIST=',,' names no host")):
        monkeypatch.setenv("SLURM_JOB_ID", job)
        monkeypatch.setenv("SLURM_JOB_NODELIST", nodes)
        with pytest.raises(LaunchError, match=re.escape(message)):
            dist.slurm_rendezvous()
    monkeypatch.setenv("SLURM_JOB_ID", "-h")
    with pytest.raises(LaunchError, match="SLURM_JOB_ID='-h' is not a job number"):
        dist.slurm_job_id()  # what dist.init checks first, and preemption.requeue hands to scontrol
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    assert dist.slurm_rendezvous() == ("gpu07", 20000 + 4242)


def test_a_rank_whose_peers_never_come_fails_after_the_timeout_in_one_line(tiny_cache, tmp_path):
    """Rank 1 of 2 with nobody at MASTER_ADDR:MASTER_PORT (rank 0's node never started, a wrong
    port): one line naming both variables after dist_timeout_s, not a hang or a traceback."""
    from conftest import free_port

    port = free_port()
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    t0 = time.time()
    proc = run_cmd([PY, "launch/train_unet.py", f"run_dir={tmp_path}/run", f"data.urls={tiny_cache}", "model=tiny",
                    "dist_timeout_s=3"], env=env, check=False, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith("error: rank 1 of 2 on ") and \
        f"did not meet its peers at MASTER_ADDR=127.0.0.1 MASTER_PORT={port} within 3 s (dist_timeout_s)" in lines[-1]
    assert time.time() - t0 < 60
