"""SLURM for real: launch/submit.py against a one-node cluster on 127.0.0.1 (tests/slurm_cluster.py).

Training jobs run 2 CPU tasks of the tiny preset under srun (gloo); the cache job runs as
a job array. The cluster is started once for the module and every daemon is stopped after.
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

import slurm_cluster
from conftest import PY, ROOT, run_cmd
from trainer.core import checkpoint, dist
from trainer.core.metrics import read_log

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
# 80 steps of a global batch of 16 (2 ranks x 8); a log row every step.
UNET = ("model=tiny", "batch_per_rank=8", "lr=0.002", "warmup_samples=32", "total_samples=1280",
        "log_every_samples=16", "checkpoint_every_samples=640")


# --- no cluster needed --------------------------------------------------------------------------

def test_node_lists_expand_like_scontrol_show_hostnames():
    assert dist.expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert dist.expand_nodelist("n[8-10]") == ["n8", "n9", "n10"]
    assert dist.expand_nodelist("a[1-2]-b[3-4]") == ["a1-b3", "a1-b4", "a2-b3", "a2-b4"]
    assert dist.expand_nodelist("localhost") == ["localhost"]


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

@pytest.fixture(scope="module")
def cluster():
    try:
        slurm_cluster.ensure_installed()
    except slurm_cluster.Unavailable as e:
        pytest.skip(f"no SLURM: {e}")
    c = slurm_cluster.Cluster().start()
    try:
        yield c
    finally:
        c.cancel_all()
        c.stop()
        shutil.rmtree(c.base, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_job_outlives_its_test(request):
    """A test that fails midway leaves its job running; the next one would wait for the node."""
    yield
    if "cluster" in request.fixturenames:
        request.getfixturevalue("cluster").cancel_all()


def submit_cli(cluster, job, *args):
    out = run_cmd([PY, "launch/submit.py", "--job", job, *args], env=cluster.env)
    return re.search(r"submitted SLURM job (\d+)", out.stdout).group(1)


def submit(cluster, monkeypatch, job, overrides, **resources):
    """What launch/submit.py does, in this process: it spares the job's imports (about 8 s)."""
    from trainer import slurm

    for key, value in {**cluster.env, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}.items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)  # sbatch passes its environment on to the job
    return slurm.submit(job, None, list(overrides), slurm.Resources(**resources))[0]


def jobs(cluster, job_id) -> list[dict]:
    """`scontrol show job` as one dict per job (an array gives one per task)."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=cluster.env, capture_output=True, text=True)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in proc.stdout.splitlines() if line.strip()]


def wait(cluster, job_id, timeout=240) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = jobs(cluster, job_id)
        if found and all(j["JobState"] in TERMINAL for j in found):
            return found
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not end within {timeout} s: {jobs(cluster, job_id)}")


def wait_for_rows(path, n, job_id, cluster, timeout=180):
    deadline, polls = time.time() + timeout, 0
    while time.time() < deadline:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= n:
            return
        polls += 1
        if polls % 10 == 0:  # the file every 0.1 s, slurmctld every second
            assert all(j["JobState"] not in TERMINAL for j in jobs(cluster, job_id)), "the job ended early"
        time.sleep(0.1)
    raise AssertionError(f"{path} did not reach {n} rows in {timeout} s")


def losses(run_dir):
    return [r for r in read_log(os.path.join(run_dir, "log.jsonl")) if "loss" in r]


def slurm_out(run_dir, job_id):
    with open(os.path.join(run_dir, f"slurm-{job_id}.out")) as f:
        return f.read()


@pytest.fixture(scope="module")
def straight(cluster, tiny_cache, tmp_path_factory):
    """An uninterrupted 2-task run submitted with launch/submit.py."""
    run_dir = tmp_path_factory.mktemp("slurm") / "straight"
    job_id = submit_cli(cluster, "unet", "--tasks-per-node", "2", f"run_dir={run_dir}", f"data.urls={tiny_cache}",
                        *UNET)
    return run_dir, job_id, wait(cluster, job_id)[0]


def test_submit_runs_a_2_task_training_job_to_completion(straight):
    run_dir, job_id, job = straight
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "0", job
    assert job["NumTasks"] == "2"
    assert checkpoint.complete_tags(str(run_dir)) == ["samples_000000000640", "samples_000000001280"]
    assert [r["step"] for r in losses(run_dir)] == list(range(1, 81))
    out = slurm_out(run_dir, job_id)
    assert "2 ranks, global batch 16" in out and "final checkpoint:" in out and "stopped early" not in out
    script = open(run_dir / "unet.sbatch").read()
    assert "#SBATCH --signal=USR1@120\n" in script and "#SBATCH --requeue\n" in script


def test_the_warning_signal_checkpoints_requeues_and_the_job_resumes_exactly(cluster, straight, tiny_cache, tmp_path,
                                                                             monkeypatch):
    run_dir = tmp_path / "preempted"
    job_id = submit(cluster, monkeypatch, "unet", [f"run_dir={run_dir}", f"data.urls={tiny_cache}", *UNET],
                    tasks_per_node=2)
    wait_for_rows(run_dir / "log.jsonl", 10, job_id, cluster)
    # What --signal=USR1@120 does before the time limit: SIGUSR1 to every process of the job's steps.
    subprocess.run(["scancel", "--signal=USR1", job_id], env=cluster.env, check=True)
    job = wait(cluster, job_id)[0]
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "1", job

    out = slurm_out(run_dir, job_id)
    stop = re.search(r"stopped early on SIGUSR1; checkpoint (\S+)/samples_(\d+)\n", out)
    assert stop, out[-3000:]
    step = int(stop.group(2)) // 16  # 2 ranks x 8
    assert 10 <= step < 80
    assert f"requeued SLURM job {job_id}" in out
    assert f"resuming from {run_dir}/checkpoints/{checkpoint.tag_for(step * 16)} at step {step}" in out
    assert out.count("final checkpoint:") == 2 and out.count("restart 1") == 1

    # The combined log equals the uninterrupted run's, and so do the final weights and EMA.
    a, b = losses(straight[0]), losses(run_dir)
    assert [r["step"] for r in b] == list(range(1, 81))
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5, (ra, rb)
    for folder in ("unet", "ema_unet"):
        wa = load_file(os.path.join(checkpoint.latest(str(straight[0])), folder, "diffusion_pytorch_model.safetensors"))
        wb = load_file(os.path.join(checkpoint.latest(str(run_dir)), folder, "diffusion_pytorch_model.safetensors"))
        for k in wa:
            assert (wa[k] - wb[k]).abs().max() <= 1e-6, (folder, k)


def test_scancel_stops_with_a_checkpoint_and_does_not_requeue(cluster, tiny_cache, tmp_path, monkeypatch):
    """SIGTERM (scancel, the time limit, preemption) reaches every process of the job, the
    DataLoader workers included: the ranks still agree, save and exit, and the job stays
    cancelled: requeueing here would undo the user's scancel."""
    run_dir = tmp_path / "cancelled"
    job_id = submit(cluster, monkeypatch, "unet", [f"run_dir={run_dir}", f"data.urls={tiny_cache}", *UNET,
                                                   "total_samples=1600000"], tasks_per_node=2)
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


def test_a_cache_job_array_makes_the_same_cache_as_one_run(cluster, tiny_shards, tiny_cache, tmp_path, monkeypatch):
    out = tmp_path / "latents"
    # The tiny_cache fixture's command, as 4 array tasks over its 6 shards (1, 2, 1 and 2 shards).
    job_id = submit(cluster, monkeypatch, "cache", [f"data.urls={tiny_shards}", "data.resolution=16", f"out_url={out}",
                                                    "vae=preset:tiny", "text_encoder=tiny", "batch_size=16"],
                    array_tasks=4)
    tasks = wait(cluster, job_id)
    assert len(tasks) == 4 and all(t["JobState"] == "COMPLETED" for t in tasks), tasks
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


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_dead_or_hung_rank_fails_the_job_within_the_timeout(cluster, tiny_cache, tmp_path, monkeypatch, how):
    """kill -9 of one rank: srun's --kill-on-bad-exit ends the step at once. A rank that stops
    (SIGSTOP, as a hung GPU would) leaves the other waiting in a collective until
    dist_timeout_s; then it fails and the job with it, instead of hanging until the time limit."""
    timeout_s = 10
    run_dir = tmp_path / how
    job_id = submit(cluster, monkeypatch, "unet", [f"run_dir={run_dir}", f"data.urls={tiny_cache}", *UNET,
                                                   "total_samples=1600000", f"dist_timeout_s={timeout_s}"],
                    tasks_per_node=2)
    wait_for_rows(run_dir / "log.jsonl", 2, job_id, cluster)
    t0 = time.time()
    os.kill(_rank_pid(run_dir, 1), signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    job = wait(cluster, job_id, timeout=timeout_s + 60)[0]
    elapsed = time.time() - t0
    print(f"{how}: the job was {job['JobState']} {elapsed:.1f} s later (dist_timeout_s={timeout_s})")
    assert job["JobState"] == "FAILED" and job["ExitCode"] != "0:0", job
    # dist_timeout_s at most, then the exit and SLURM's clean-up (KillWait is 10 s here); never the time limit.
    assert elapsed < timeout_s + 20, elapsed
    assert len(losses(run_dir)) < 100_000


def test_the_autoencoder_job_is_preempted_and_resumed_the_same_way(cluster, tiny_shards, tmp_path, monkeypatch):
    run_dir = tmp_path / "ae"
    overrides = [f"run_dir={run_dir}", f"data.urls={tiny_shards}", "data.resolution=16", "data.num_workers=1",
                 "preset=tiny", "batch_per_rank=4", "total_samples=400", "warmup_samples=4", "log_every_samples=4",
                 "checkpoint_every_samples=100000", "scaling_samples=8", "disc_start_samples=40", "disc_layers=2",
                 "disc_channels=8", "lpips_weights=random", "wandb=disabled"]
    from trainer import slurm
    for key, value in {**cluster.env, "PYTHONUNBUFFERED": "1"}.items():
        monkeypatch.setenv(key, value)
    job_id = slurm.submit("autoencoder", "configs/autoencoder/kl_gan.yaml", overrides, slurm.Resources())[0]
    script = open(run_dir / "autoencoder.sbatch").read()
    assert "#SBATCH --signal=USR1@120\n" in script and "#SBATCH --requeue\n" in script
    wait_for_rows(run_dir / "log.jsonl", 5, job_id, cluster)
    subprocess.run(["scancel", "--signal=USR1", job_id], env=cluster.env, check=True)
    job = wait(cluster, job_id)[0]
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", job
    out = slurm_out(run_dir, job_id)
    assert re.search(r"stopped early on SIGUSR1; checkpoint \S+/samples_\d+\n", out), out[-3000:]
    assert f"requeued SLURM job {job_id}" in out and "autoencoder exported to" in out
    assert [r["step"] for r in losses(run_dir)] == list(range(1, 101))


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
