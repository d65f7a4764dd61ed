"""SLURM for real: launch/submit.py against a cluster of two nodes on this machine, each node a
host of its own (conftest's `multinode`, tests/slurm_cluster.py: a network namespace with its
own address, host name and hosts file, and its own slurmd).

Training jobs run one CPU task per node standing in for a GPU (`--gpus-per-node 1`, gloo)
and are compared with the same config run on 2 ranks of one host (conftest's two_rank_run);
the cache job runs as a job array over both nodes. The cluster is shared by the session.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
from safetensors.torch import load_file

from conftest import PY, UNET_TWO_RANKS, LoadDeadline, assert_same_losses, run_cmd, unet_losses
from trainer.core import checkpoint

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
UNET = UNET_TWO_RANKS  # 60 steps of 16 (2 nodes x 1 rank x 8), a checkpoint every 10
TWO_NODES = {"nodes": 2, "gpus_per_node": 1}
PEERS = re.compile(r"rank (\d+)/2 on (\S+) \((\S+), gloo via (\S+)\) met its peers at (\S+) in ([\d.]+) s")


# --- no cluster needed --------------------------------------------------------------------------

def test_the_sbatch_script(tiny_cache, tmp_path):
    from trainer import slurm
    from trainer.core.config import ConfigError, load_config
    from trainer.unet.job import UNetJob

    overrides = [f"run_dir={tmp_path / 'run'}", f"data.urls={tiny_cache}", "validation_prompts=[a red circle]"]
    cfg = load_config(UNetJob, None, overrides)
    res = slurm.Resources(nodes=4, gpus_per_node=8, cpus_per_task=12, partition="gpu", time="2-00:00:00")
    text = slurm.sbatch_script("unet", None, overrides, res, cfg)
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={tmp_path / 'run'}/slurm-%j.out", "#SBATCH --time=2-00:00:00"):
        assert line + "\n" in text, line
    assert "srun --kill-on-bad-exit=1 --cpus-per-task=12 " in text
    assert "'validation_prompts=[a red circle]'" in text  # quoted for the shell
    res = slurm.Resources(nodes=2, gpus_per_node=4, launcher="deepspeed")
    ds = slurm.sbatch_script("unet", None, overrides, res, cfg)
    assert 'sed \'s/$/ slots=4/\' > "$LDM_HOSTFILE"' in ds
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=1 --ntasks=2 --cpus-per-task=4 --gpus-per-node=4 bash -c " in ds
    assert '--no_ssh --node_rank "$SLURM_NODEID" --master_addr "$LDM_HEAD"' in ds
    with pytest.raises(ConfigError, match="one task per GPU"):
        slurm.sbatch_script("unet", None, overrides, slurm.Resources(gpus_per_node=8, tasks_per_node=2), cfg)


# --- the cluster ----------------------------------------------------------------------------------

@pytest.fixture
def cluster(multinode):
    """The session's two-node cluster; a test that fails midway leaves its job running, and the
    next one would wait for the nodes."""
    yield multinode
    multinode.cancel_all()


# The two nodes share this machine's 2 cores: a thread per rank, as a node of its own would have
# its cores to itself (sbatch passes the environment on to the job).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def submit_cli(cluster, job, *args):
    out = run_cmd([PY, "launch/submit.py", "--job", job, *args], env={**cluster.env, **ONE_THREAD})
    return re.search(r"submitted SLURM job (\d+)", out.stdout).group(1)


def submit(cluster, monkeypatch, job, overrides, **resources):
    """What launch/submit.py does, in this process: it spares the job's imports (about 8 s)."""
    from trainer import slurm

    for key, value in {**cluster.env, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **ONE_THREAD}.items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)  # sbatch passes its environment on to the job
    return slurm.submit(job, None, list(overrides), slurm.Resources(**resources))[0]


def jobs(cluster, job_id) -> list[dict]:
    """`scontrol show job` as one dict per job (an array gives one per task)."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=cluster.env, capture_output=True, text=True)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in proc.stdout.splitlines() if line.strip()]


def wait(cluster, job_id, timeout=240) -> list[dict]:
    deadline = LoadDeadline(timeout)  # seconds of an idle machine: a loaded one waits longer
    while not deadline.expired():
        found = jobs(cluster, job_id)
        if found and all(j["JobState"] in TERMINAL for j in found):
            return found
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end within {timeout} s: {jobs(cluster, job_id)}")


def wait_for_rows(path, n, job_id, cluster, timeout=180):
    deadline, polls = LoadDeadline(timeout), 0
    while not deadline.expired():
        if os.path.exists(path) and sum(1 for _ in open(path)) >= n:
            return
        polls += 1
        if polls % 10 == 0:  # the file every 0.1 s, slurmctld every second
            assert all(j["JobState"] not in TERMINAL for j in jobs(cluster, job_id)), "the job ended early"
        time.sleep(0.1)
    raise AssertionError(f"{path} did not reach {n} rows in {timeout} s")


def assert_same_weights(reference, run_dir, tol: float = 1e-5):
    """Equal up to `tol`. The data, the random draws and every state a checkpoint holds are the same in
    both runs, yet a review under load (#27) measured 1.3e-6 between them: one unit in the last place at
    some step, grown over the run. Its cause is not pinned down; the likeliest is a fresh process's CPU
    kernels rounding differently (oneDNN's vectorised loops can take another path for a buffer at
    another alignment). A real fault (a lost optimizer state, a replayed or skipped batch) moves the
    weights by 1e-3 or more, far above `tol`."""
    for folder in ("unet", "ema_unet"):
        wa = load_file(os.path.join(checkpoint.latest(str(reference)), folder, "diffusion_pytorch_model.safetensors"))
        wb = load_file(os.path.join(checkpoint.latest(str(run_dir)), folder, "diffusion_pytorch_model.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert (wa[k] - wb[k]).abs().max() <= tol, (folder, k, float((wa[k] - wb[k]).abs().max()))


def slurm_out(run_dir, job_id):
    # Both nodes' tasks write into the one file: a multi-byte character of a progress bar can be cut by
    # another task's line (seen: invalid continuation bytes); the assertions read ASCII lines.
    with open(os.path.join(run_dir, f"slurm-{job_id}.out"), encoding="utf-8", errors="replace") as f:
        return f.read()


def assert_ranks_on_both_nodes(cluster, out):
    """Each rank logs its host and address; rank 0 on node1 and rank 1 on node2, each at its own
    node's address, met through the node network (not loopback)."""
    met = {int(m[0]): m for m in PEERS.findall(out)}
    assert sorted(met) == [0, 1], out[-3000:]
    for rank, node in ((0, "node1"), (1, "node2")):
        _, host, addr, interface, master, seconds = met[rank]
        assert (host, addr, interface) == (node, cluster.net.hosts[node].addr, "eth0"), met[rank]
        assert master.startswith("node1:") and float(seconds) < 60
    return {rank: float(m[5]) for rank, m in met.items()}


@pytest.fixture(scope="module")
def straight(multinode, tiny_cache, tmp_path_factory):
    """An uninterrupted run on 2 nodes x 1 GPU (a CPU task) submitted with launch/submit.py."""
    run_dir = tmp_path_factory.mktemp("slurm") / "straight"
    job_id = submit_cli(multinode, "unet", "--nodes", "2", "--gpus-per-node", "1", f"run_dir={run_dir}",
                        f"data.urls={tiny_cache}", *UNET)
    return run_dir, job_id, wait(multinode, job_id)[0]


def test_submit_runs_a_job_on_two_nodes_with_the_losses_of_one_node(cluster, straight, two_rank_run):
    run_dir, job_id, job = straight
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "0", job
    assert job["NumNodes"] == "2" and job["NumTasks"] == "2" and job["NodeList"] == "node[1-2]", job
    assert checkpoint.complete_tags(str(run_dir)) == ["samples_000000000800", "samples_000000000960"]
    out = slurm_out(run_dir, job_id)
    seconds = assert_ranks_on_both_nodes(cluster, out)
    print(f"ranks met their peers across nodes in {seconds} s")
    assert "2 ranks, global batch 16" in out and "final checkpoint:" in out and "stopped early" not in out
    assert_same_losses(two_rank_run[0], run_dir)
    script = open(run_dir / "unet.sbatch").read()
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --gpus-per-node=1\n" in script
    assert "#SBATCH --signal=USR1@120\n" in script and "#SBATCH --requeue\n" in script


@pytest.fixture(scope="module")
def s3_on_the_bridge(multinode):
    """moto's S3 server at the bridge's address, where every node reaches it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=multinode.net.gateway, port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_the_deepspeed_launcher_per_node_checkpointing_to_s3(cluster, s3_on_the_bridge, two_rank_run, tiny_cache,
                                                              tmp_path, monkeypatch):
    """One DeepSpeed launcher per node from the allocation's hostfile; checkpoints from both
    nodes to S3: every rank's file and each marker land, as the same run writes them locally."""
    import s3fs

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_on_the_bridge})
    fs.mkdir("multinode")
    run_dir = tmp_path / "ds"
    job_id = submit(cluster, monkeypatch, "unet", [f"run_dir={run_dir}", f"data.urls={tiny_cache}", *UNET,
                                                   "checkpoint_url=s3://multinode/run",
                                                   f"checkpoint_endpoint_url={s3_on_the_bridge}"],
                    launcher="deepspeed", **TWO_NODES)
    job = wait(cluster, job_id)[0]
    out = slurm_out(run_dir, job_id)
    assert job["JobState"] == "COMPLETED", (job, out[-3000:])
    assert out.count("deepspeed.launcher.launch") >= 2 and "--node_rank=1" in out  # one launcher per node
    assert_ranks_on_both_nodes(cluster, out)
    assert_same_losses(two_rank_run[0], run_dir)
    hostfile = open(run_dir / f"hostfile-{job_id}").read()
    assert hostfile == "node1 slots=1\nnode2 slots=1\n"  # one slot per GPU, no more
    tags = checkpoint.complete_tags("s3://multinode/run", s3_on_the_bridge)
    assert tags == ["samples_000000000800", "samples_000000000960"]
    local = os.path.join(two_rank_run[0], "checkpoints", tags[-1])
    expected = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, fs_ in os.walk(local) for f in fs_)
    fs.invalidate_cache()
    landed = sorted(k.removeprefix(f"multinode/run/{tags[-1]}/") for k in fs.find(f"multinode/run/{tags[-1]}"))
    assert landed == expected


def test_the_warning_signal_reaches_both_nodes_which_checkpoint_requeue_and_resume_exactly(
        cluster, two_rank_run, tiny_cache, tmp_path, monkeypatch):
    run_dir = tmp_path / "preempted"
    job_id = submit(cluster, monkeypatch, "unet", [f"run_dir={run_dir}", f"data.urls={tiny_cache}", *UNET],
                    **TWO_NODES)
    wait_for_rows(run_dir / "log.jsonl", 10, job_id, cluster)
    # What --signal=USR1@120 does before the time limit: SIGUSR1 to every process of the job's steps.
    subprocess.run(["scancel", "--signal=USR1", job_id], env=cluster.env, check=True)
    job = wait(cluster, job_id)[0]
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "1", job

    out = slurm_out(run_dir, job_id)
    stop = re.search(r"stopped early on SIGUSR1; checkpoint (\S+)/samples_(\d+)\n", out)
    assert stop, out[-3000:]
    step = int(stop.group(2)) // 16
    assert 10 <= step < 60
    assert f"requeued SLURM job {job_id}" in out
    assert f"resuming from {run_dir}/checkpoints/{checkpoint.tag_for(step * 16)} at step {step}" in out
    assert out.count("final checkpoint:") == 2 and out.count("restart 1") == 1
    assert len(PEERS.findall(out)) == 4  # both nodes, both times

    # The combined log equals the uninterrupted run's, and so do the final weights and EMA.
    assert_same_losses(two_rank_run[0], run_dir)
    assert_same_weights(two_rank_run[0], run_dir)


def test_scancel_stops_with_a_checkpoint_and_does_not_requeue(cluster, tiny_cache, tmp_path, monkeypatch):
    """SIGTERM (scancel, the time limit, preemption) reaches every process of the job on every
    node, the DataLoader workers included: the ranks still agree, save and exit, and the job
    stays cancelled: requeueing here would undo the user's scancel."""
    run_dir = tmp_path / "cancelled"
    job_id = submit(cluster, monkeypatch, "unet", [f"run_dir={run_dir}", f"data.urls={tiny_cache}", *UNET,
                                                   "total_samples=1600000"], **TWO_NODES)
    wait_for_rows(run_dir / "log.jsonl", 5, job_id, cluster)
    subprocess.run(["scancel", job_id], env=cluster.env, check=True)
    job = wait(cluster, job_id)[0]
    assert job["JobState"] == "CANCELLED" and job["Restarts"] == "0", job
    out = slurm_out(run_dir, job_id)
    stop = re.search(r"stopped early on SIGTERM; checkpoint (\S+)\n", out)
    assert stop and "not requeued after SIGTERM" in out and "Traceback" not in out, out[-3000:]
    assert checkpoint.latest(str(run_dir)) == stop.group(1)
    time.sleep(1)
    assert jobs(cluster, job_id)[0]["Restarts"] == "0"


def test_a_cache_job_array_over_both_nodes_makes_the_same_cache_as_one_run(cluster, tiny_shards, tiny_cache,
                                                                            tmp_path, monkeypatch):
    out = tmp_path / "latents"
    # The tiny_cache fixture's command, as 4 array tasks over its 6 shards (1, 2, 1 and 2 shards).
    job_id = submit(cluster, monkeypatch, "cache", [f"data.urls={tiny_shards}", "data.resolution=16", f"out_url={out}",
                                                    "vae=preset:tiny", "text_encoder=tiny", "batch_size=16"],
                    array_tasks=4)
    tasks = wait(cluster, job_id)
    assert len(tasks) == 4 and all(t["JobState"] == "COMPLETED" for t in tasks), tasks
    assert {t["NodeList"] for t in tasks} == {"node1", "node2"}, [t["NodeList"] for t in tasks]
    logs = [open(tmp_path / "latents.slurm" / f"cache-{job_id}_{i}.out").read() for i in range(4)]
    assert sum("cached 96 samples in 6 shards" in text for text in logs) >= 1  # the last one writes the manifest

    with open(os.path.join(tiny_cache, "manifest.json")) as f:
        single = json.load(f)
    with open(out / "manifest.json") as f:
        arrayed = json.load(f)
    assert arrayed == single
    assert sorted(os.listdir(out)) == sorted(os.listdir(tiny_cache))
    for name in os.listdir(tiny_cache):
        with open(os.path.join(tiny_cache, name), "rb") as f, open(out / name, "rb") as g:
            assert f.read() == g.read(), name


def _rank_pid(run_dir, rank):
    """The rank's own process (not its DataLoader workers, which share its command line)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if f"run_dir={run_dir}".encode() in cmd and f"SLURM_PROCID={rank}".encode() in env:
            found[int(pid)] = ppid
    mains = [pid for pid, ppid in found.items() if ppid not in found]
    assert len(mains) == 1, found
    return mains[0]


def test_a_hung_rank_fails_the_job_within_the_timeout(cluster, tiny_cache, tmp_path, monkeypatch):
    """A rank that stops (SIGSTOP, as a hung GPU would) leaves the other node's rank waiting in a
    collective until dist_timeout_s; then it fails and the job with it, instead of hanging until
    the time limit."""
    timeout_s = 10
    run_dir = tmp_path / "hung"
    job_id = submit(cluster, monkeypatch, "unet", [f"run_dir={run_dir}", f"data.urls={tiny_cache}", *UNET,
                                                   "total_samples=1600000", f"dist_timeout_s={timeout_s}"],
                    **TWO_NODES)
    wait_for_rows(run_dir / "log.jsonl", 2, job_id, cluster)
    t0 = time.time()
    os.kill(_rank_pid(run_dir, 1), signal.SIGSTOP)
    job = wait(cluster, job_id, timeout=timeout_s + 60)[0]
    elapsed = time.time() - t0
    print(f"hung rank: the job was {job['JobState']} {elapsed:.1f} s later (dist_timeout_s={timeout_s})")
    assert job["JobState"] == "FAILED" and job["ExitCode"] != "0:0", job
    out = slurm_out(run_dir, job_id)
    assert "error: rank 0 of 2 on node1: a collective failed, a peer is gone or hung" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    # dist_timeout_s at most, then the exit and SLURM's clean-up (KillWait is 10 s here); never the time limit.
    assert elapsed < timeout_s + 20, elapsed


def test_a_lost_node_ends_the_run_and_the_job_resumes_from_the_last_checkpoint_when_it_is_back(
        cluster, two_rank_run, tiny_cache, tmp_path, monkeypatch):
    """Every process of node2 killed (its slurmd, its rank, the rank's workers): node1's rank
    fails at once (connection reset) or after dist_timeout_s (no answer). srun cannot end the
    step until SLURM declares node2 dead (SlurmdTimeout, 10 s on the test cluster, 300 s by
    default); then the job, submitted with --requeue, is requeued. When node2 is back, the same
    script runs again and resumes from the last complete checkpoint (one whose marker is
    missing is not), ending as the uninterrupted run, weights and EMA included."""
    timeout_s = 10
    run_dir = tmp_path / "lost"
    job_id = submit(cluster, monkeypatch, "unet", [f"run_dir={run_dir}", f"data.urls={tiny_cache}", *UNET,
                                                   f"dist_timeout_s={timeout_s}"], **TWO_NODES)
    wait_for_rows(run_dir / "log.jsonl", 25, job_id, cluster)  # past the checkpoint at step 20
    t0 = time.time()
    assert cluster.kill_node("node2") >= 2
    deadline = t0 + timeout_s + 90
    while time.time() < deadline and jobs(cluster, job_id)[0]["JobState"] not in ("PENDING", *TERMINAL):
        time.sleep(0.5)
    elapsed = time.time() - t0
    job = jobs(cluster, job_id)[0]
    print(f"node lost: the run ended and the job was {job['JobState']} {elapsed:.1f} s later "
          f"(dist_timeout_s={timeout_s}, SlurmdTimeout=10)")
    assert job["JobState"] == "PENDING" and job["Restarts"] == "1", job
    assert elapsed < timeout_s + 60, elapsed
    lost = slurm_out(run_dir, job_id)
    assert "error: rank 0 of 2 on node1: a collective failed, a peer is gone or hung" in lost, lost[-3000:]
    assert "Traceback" not in lost, lost[-3000:]
    tags = checkpoint.complete_tags(str(run_dir))
    assert len(tags) == 2 and tags[-1] >= "samples_000000000320", tags
    # As if node1 had been lost too, between the newest checkpoint's files and its marker: its
    # files stay, and the resume takes the one before.
    os.remove(run_dir / "checkpoints" / tags[-1] / checkpoint.MARKER)
    done = str(run_dir / "checkpoints" / tags[-2])
    step = checkpoint.info(done)["samples"] // 16

    cluster.start_node("node2")
    job = wait(cluster, job_id)[0]
    out = slurm_out(run_dir, job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", (job, out[-3000:])
    assert f"resuming from {done} at step {step}" in out
    assert_same_losses(two_rank_run[0], run_dir)
    assert_same_weights(two_rank_run[0], run_dir)


def test_a_two_node_checkpoint_resumes_on_one_node_only_when_elastic(cluster, straight, tiny_cache, tmp_path,
                                                                     monkeypatch):
    run_dir = tmp_path / "elastic"
    shutil.copytree(straight[0], run_dir, ignore=shutil.ignore_patterns("slurm-*", "hostfile-*"))
    shutil.rmtree(run_dir / "checkpoints" / "samples_000000000960")
    config = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(config.replace(f"run_dir: {straight[0]}\n", f"run_dir: {run_dir}\n"))
    overrides = [f"run_dir={run_dir}", f"data.urls={tiny_cache}", *UNET]
    job_id = submit(cluster, monkeypatch, "unet", overrides, nodes=1, gpus_per_node=1)
    job = wait(cluster, job_id)[0]
    out = slurm_out(run_dir, job_id)
    assert job["JobState"] == "FAILED" and "Traceback" not in out, (job, out[-2000:])
    assert "was written by 2 ranks, this job has 1; resume with the same world size, or set elastic_resume=true" in out

    job_id = submit(cluster, monkeypatch, "unet", [*overrides, "elastic_resume=true"], nodes=1, gpus_per_node=1)
    job = wait(cluster, job_id)[0]
    out = slurm_out(run_dir, job_id)
    assert job["JobState"] == "COMPLETED" and job["NodeList"] in ("node1", "node2"), (job, out[-2000:])
    assert "at step 100 (elastic: written by 2 ranks, 800 samples)" in out
    # 50 steps of 16 on two nodes, then 20 of 8 on one, logged every 2.
    assert [r["samples"] for r in unet_losses(run_dir)] == list(range(16, 961, 16))
    assert checkpoint.latest(str(run_dir)).endswith("samples_000000000960")


def test_the_autoencoder_job_is_preempted_and_resumed_the_same_way(cluster, tiny_shards, tmp_path, monkeypatch):
    run_dir = tmp_path / "ae"
    overrides = [f"run_dir={run_dir}", f"data.urls={tiny_shards}", "data.resolution=16", "data.num_workers=1",
                 "preset=tiny", "batch_per_rank=4", "total_samples=120", "warmup_samples=4", "log_every_samples=4",
                 "checkpoint_every_samples=100000", "scaling_samples=8", "disc_start_samples=40", "disc_layers=2",
                 "disc_channels=8", "lpips_weights=random", "wandb=disabled"]
    from trainer import slurm
    for key, value in {**cluster.env, "PYTHONUNBUFFERED": "1"}.items():
        monkeypatch.setenv(key, value)
    # One rank (its data-parallel path is the UNet's dist.init): two on 2 cores take 4x as long.
    job_id = slurm.submit("autoencoder", "configs/autoencoder/kl_gan.yaml", overrides, slurm.Resources())[0]
    script = open(run_dir / "autoencoder.sbatch").read()
    assert "#SBATCH --signal=USR1@120\n" in script and "#SBATCH --requeue\n" in script
    wait_for_rows(run_dir / "log.jsonl", 5, job_id, cluster)
    subprocess.run(["scancel", "--signal=USR1", job_id], env=cluster.env, check=True)
    job = wait(cluster, job_id)[0]
    out = slurm_out(run_dir, job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", (job, out[-3000:])
    assert re.search(r"stopped early on SIGUSR1; checkpoint \S+/samples_\d+\n", out), out[-3000:]
    assert f"requeued SLURM job {job_id}" in out and "autoencoder exported to" in out
    assert [r["step"] for r in unet_losses(run_dir)] == list(range(1, 31))


def test_a_refused_submission_is_one_line_naming_sbatchs_reason(cluster, tiny_cache, tmp_path, monkeypatch):
    """sbatch itself refusing (here: no such partition) is a SubmitError of one line, not a
    config error: the config was fine, the cluster said no (issue 14)."""
    from trainer import slurm

    with pytest.raises(slurm.SubmitError, match="nosuchpartition|[Pp]artition"):
        submit(cluster, monkeypatch, "unet", [f"data.urls={tiny_cache}", f"run_dir={tmp_path}/in"],
               partition="nosuchpartition")
    proc = run_cmd([PY, "launch/submit.py", "--job", "unet", "--partition", "nosuchpartition",
                    f"data.urls={tiny_cache}", f"run_dir={tmp_path}/run"], env=cluster.env, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.match(rf"error: sbatch {tmp_path}/run/\S+\.sbatch failed: .*[Pp]artition", lines[0]), lines[0]
