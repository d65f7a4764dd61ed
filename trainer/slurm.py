"""SLURM: writing and submitting the sbatch scripts of `launch/submit.py`.

Each job becomes one batch script, written beside its outputs and submitted with `sbatch`;
requeued, the same script starts again and the job resumes:

- unet: `srun` starts one task per GPU (or per `--tasks-per-node` CPU rank); each task is a
  rank whose place and rendezvous `trainer.core.dist` reads from SLURM's environment. Or, with
  `launcher="deepspeed"`, srun starts DeepSpeed's own launcher once per node (`--no_ssh`,
  `--node_rank $SLURM_NODEID`) with a hostfile built from the allocation.
- cache: a job array; task i of K encodes the input shards [i*N/K, (i+1)*N/K) of the N
  sorted ones (`shard_slice`), split further between the task's ranks; the task that
  completes the last shard writes the manifest (see trainer/cache/job.py).
- autoencoder: one task per GPU like unet (data parallel, gradients averaged); preempted like unet.

The scripts ask for `--signal=USR1@SECONDS` and `--requeue`; what a running job does with the
signal (agree, checkpoint, requeue) is trainer/core/preemption.py's.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys

from data_pipeline import storage

from trainer.core import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: launch/ is here
JOBS = {"unet": "train_unet.py", "cache": "cache_latents.py", "autoencoder": "train_autoencoder.py"}
LAUNCHERS = ("srun", "deepspeed")

# What may go into an #SBATCH line. sbatch reads those lines itself (no shell): it splits them
# at whitespace, takes quotes and '#' specially, and expands %-patterns in --output; a newline
# ends the line, and the first line that is not a comment ends its reading of #SBATCH options
# (the later --signal and --requeue would be lost). So values are checked, not quoted.
_NAMES = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*", re.ASCII)  # partitions (a list) and accounts
# SLURM's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or no limit.
_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|UNLIMITED|INFINITE", re.ASCII | re.IGNORECASE)
_SBATCH_PATH = re.compile(r"[A-Za-z0-9_./+,:@-]+", re.ASCII)
_SBATCH_OPTION = re.compile(r"--([a-z][a-z0-9-]*)(=[!-~]+)?", re.ASCII)  # printable ASCII, no spaces
_SBATCH_NOT_IN_VALUE = "\"'\\#$`"
# Options the script sets itself: another value would break the job (logs, arrays, preemption).
_RESERVED = {"nodes": "set it with --nodes", "ntasks-per-node": "set it with --tasks-per-node",
             "ntasks": "set --nodes and --tasks-per-node", "gpus-per-node": "set it with --gpus-per-node",
             "cpus-per-task": "set it with --cpus-per-task", "partition": "set it with --partition",
             "time": "set it with --time", "account": "set it with --account",
             "signal": "set it with --signal-seconds", "array": "set it with --array-tasks",
             "output": "set the folder with --log-dir", "error": "set the folder with --log-dir",
             "chdir": "it runs where submit.py ran", "requeue": "preempted jobs resume by requeueing",
             "no-requeue": "preempted jobs resume by requeueing", "open-mode": "requeued jobs append to their log",
             "wrap": "the script is the job"}


def _check_sbatch_path(source: str, path: str) -> None:
    if not _SBATCH_PATH.fullmatch(path):
        ch = next(c for c in path if not _SBATCH_PATH.fullmatch(c))
        raise config_lib.ConfigError(
            f"{source}: {path!r} goes into an #SBATCH line, where only letters, digits and _ . / + , : @ - are "
            f"safe (found {ch!r}); choose a log folder without it with --log-dir")


def _check_sbatch_option(option: str) -> None:
    m = _SBATCH_OPTION.fullmatch(option)
    if not m or any(c in _SBATCH_NOT_IN_VALUE for c in option):
        raise config_lib.ConfigError(
            f"--sbatch={option!r}: expected one sbatch option --name or --name=value without spaces, quotes, "
            "'#', '$', backslashes or control characters")
    name = m.group(1)
    taken = [r for r in _RESERVED if r.startswith(name)]  # sbatch also takes unambiguous abbreviations
    if taken:
        sets = "requeue" if taken[0] == "no-requeue" else taken[0]
        raise config_lib.ConfigError(f"--sbatch={option}: the script sets --{sets} itself ({_RESERVED[taken[0]]})")


class SubmitError(RuntimeError):
    """sbatch refused or could not run the script (the config itself was fine), in one line."""


# --- submission -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Resources:
    """What one submission asks SLURM for; the options of launch/submit.py."""
    nodes: int = 1  # nodes to allocate
    gpus_per_node: int = 0  # GPUs per node, one task (rank) each; 0: CPU-only tasks
    tasks_per_node: int = 0  # ranks per node; 0: gpus_per_node (1 without GPUs); with GPUs it must equal them
    cpus_per_task: int = 0  # cores per rank (its DataLoader workers included); 0: the cluster's default
    partition: str = ""  # -p; "": the default partition
    time: str = ""  # time limit (e.g. 2-00:00:00); "": the partition's default
    account: str = ""  # -A; "": the user's default account
    signal_s: int = 120  # SIGUSR1 this many seconds before the time limit (unet, autoencoder: checkpoint and requeue)
    launcher: str = "srun"  # unet: srun (a task per rank) | deepspeed (DeepSpeed's launcher per node, hostfile)
    array_tasks: int = 0  # cache: job-array tasks, each a slice of the input shards; 0: min(shards, 64)
    log_dir: str = ""  # where the script and logs go; "": the run directory (unet, autoencoder), OUT_URL.slurm (cache)
    sbatch: list[str] = dataclasses.field(default_factory=list)  # more sbatch options, verbatim (--qos=high)

    def ranks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    def validate(self, job: str) -> None:
        if job not in JOBS:
            raise config_lib.ConfigError(f"--job must be one of {', '.join(JOBS)}, got {job!r}")
        if self.nodes < 1 or min(self.gpus_per_node, self.tasks_per_node, self.cpus_per_task, self.array_tasks) < 0:
            raise config_lib.ConfigError("--nodes must be positive; --gpus-per-node, --tasks-per-node, "
                                         "--cpus-per-task and --array-tasks must be >= 0")
        if self.gpus_per_node and self.tasks_per_node not in (0, self.gpus_per_node):
            raise config_lib.ConfigError(f"--tasks-per-node={self.tasks_per_node} with --gpus-per-node="
                                         f"{self.gpus_per_node}: one task per GPU (leave --tasks-per-node out)")
        if self.launcher not in LAUNCHERS:
            raise config_lib.ConfigError(f"--launcher must be srun or deepspeed, got {self.launcher!r}")
        if self.launcher != "srun" and job != "unet":
            raise config_lib.ConfigError(f"--launcher={self.launcher} is for the unet job; {job} runs under srun")
        if self.array_tasks and job != "cache":
            raise config_lib.ConfigError("--array-tasks is for the cache job")
        if not 0 <= self.signal_s <= 65535:
            raise config_lib.ConfigError(f"--signal-seconds must be in 0..65535, got {self.signal_s}")
        for key, pattern, what in (("partition", _NAMES, "partition names (letters, digits, _ . -), comma-separated"),
                                   ("account", _NAMES, "an account name (letters, digits, _ . -)"),
                                   ("time", _TIME, "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED")):
            value = getattr(self, key)
            if value and not pattern.fullmatch(value):
                raise config_lib.ConfigError(f"--{key}={value!r}: expected {what}")
        for option in self.sbatch:
            _check_sbatch_option(option)


def job_class(job: str):
    """The config dataclass of a job (imported on demand: each pulls in its models)."""
    if job == "unet":
        from trainer.unet.job import UNetJob
        return UNetJob
    if job == "cache":
        from trainer.cache.job import CacheJob
        return CacheJob
    from trainer.autoencoder.job import AutoencoderJob
    return AutoencoderJob


def log_dir(job: str, cfg, res: Resources) -> str:
    """Where the script and SLURM's output files go: beside what the job writes. It is named
    in the script's #SBATCH --output line, so only plain path characters are accepted."""
    out, source = _log_dir(job, cfg, res)
    _check_sbatch_path(source, out)
    return out


def _log_dir(job: str, cfg, res: Resources) -> tuple[str, str]:
    if res.log_dir:
        return os.path.abspath(res.log_dir), "--log-dir"
    if job == "cache":
        # Not inside the cache: its folder holds exactly what a run without SLURM writes.
        if not storage.is_local(cfg.out_url):
            raise config_lib.ConfigError(f"out_url={cfg.out_url} is not a local folder: name one for the script and "
                                         "logs with --log-dir")
        return os.path.abspath(cfg.out_url.removeprefix("file://").rstrip("/") + ".slurm"), "out_url (+ .slurm)"
    if not storage.is_local(cfg.run_dir):
        raise config_lib.ConfigError(f"run_dir={cfg.run_dir} is not a local folder: name one with --log-dir")
    return os.path.abspath(cfg.run_dir), "run_dir"


def _count_shards(cfg) -> int:
    cfg.data.configure_storage()
    return len(storage.expand_shards(cfg.data.urls, cfg.data.endpoint_url))


def sbatch_script(job: str, config: str | None, overrides: list[str], res: Resources, cfg, *,
                  num_shards: int | None = None, python: str = sys.executable) -> str:
    """The batch script of one submission. `cfg` is the resolved config (for names and folders);
    the job itself is started with the same --config and overrides, resolved again on the node."""
    res.validate(job)
    out = log_dir(job, cfg, res)
    per_node = res.ranks_per_node()
    name = os.path.basename(os.path.normpath(cfg.out_url if job == "cache" else cfg.run_dir))
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name, flags=re.ASCII)  # a label only: anything else becomes _
    opts = [f"--job-name=ldm-{job}-{name}", f"--nodes={res.nodes}", f"--ntasks-per-node={per_node}"]
    if res.gpus_per_node:
        opts.append(f"--gpus-per-node={res.gpus_per_node}")
    if res.cpus_per_task:
        opts.append(f"--cpus-per-task={res.cpus_per_task}")
    opts += [f"--{key}={getattr(res, key)}" for key in ("partition", "time", "account") if getattr(res, key)]

    preamble, cmd_extra = [], []
    if job == "cache":
        if cfg.shard_slice:
            raise config_lib.ConfigError(f"shard_slice={cfg.shard_slice}: the job array sets it; leave it out of "
                                         "the config and the overrides")
        n = num_shards if num_shards is not None else _count_shards(cfg)
        if n == 0:
            raise config_lib.ConfigError(f"data.urls={cfg.data.urls} names no shards")
        k = min(res.array_tasks or 64, n)
        opts.append(f"--array=0-{k - 1}")
        preamble += [
            f"# Array task i of {k} encodes input shards [i*{n}/{k}, (i+1)*{n}/{k}) of the {n} sorted ones (counted",
            "# at submission); its ranks split that slice. The task that completes the last shard writes the",
            "# manifest. A rerun (or a requeue) skips shards that are done.",
            f"START=$(( SLURM_ARRAY_TASK_ID * {n} / {k} ))",
            f"STOP=$(( (SLURM_ARRAY_TASK_ID + 1) * {n} / {k} ))",
        ]
        cmd_extra = ["shard_slice=$START:$STOP"]
        output = os.path.join(out, "cache-%A_%a.out")
    else:
        output = os.path.join(out, "slurm-%j.out")
    if job != "cache" and res.signal_s:
        # Not "B:USR1": that reaches only the batch shell, which cannot pass it to srun's tasks.
        opts.append(f"--signal=USR1@{res.signal_s}")
    # Requeued (by the trainer on the warning signal, or by SLURM after a node failure or
    # preemption) the job keeps its id and appends to its log instead of truncating it.
    opts += ["--requeue", "--open-mode=append", f"--output={output}", *res.sbatch]

    args = [shlex.quote(a) for a in (["--config", os.path.abspath(config)] if config else []) + overrides] + cmd_extra
    script = os.path.join(ROOT, "launch", JOBS[job])
    srun = ["srun", "--kill-on-bad-exit=1"]
    if res.cpus_per_task:  # srun does not inherit sbatch's --cpus-per-task from SLURM 22.05 on
        srun.append(f"--cpus-per-task={res.cpus_per_task}")
    lines = ["#!/bin/bash",
             f"# Written by launch/submit.py --job {job}; `sbatch {os.path.join(out, job + '.sbatch')}` "
             "submits it again.",
             *[f"#SBATCH {o}" for o in opts], "",
             "set -u",
             # Relative paths of the config are relative to where submit.py ran. A `cd` in the
             # shell, quoted, instead of #SBATCH --chdir: that line could not hold every path.
             f"cd -- {shlex.quote(os.getcwd())} || exit 1",
             "export PYTHONUNBUFFERED=1",
             'echo "$(date -Is) job ${SLURM_JOB_ID} on ${SLURM_JOB_NODELIST}, restart ${SLURM_RESTART_COUNT:-0}"',
             *preamble]
    if job == "unet" and res.launcher == "deepspeed":
        deepspeed = os.path.join(os.path.dirname(python), "deepspeed")
        lines += [
            "# DeepSpeed's launcher once per node; it starts the node's ranks from a hostfile of the allocation.",
            f"export LDM_HOSTFILE={shlex.quote(out)}/hostfile-$SLURM_JOB_ID",
            f'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed \'s/$/ slots={per_node}/\' > "$LDM_HOSTFILE"',
            'export LDM_HEAD=$(head -n 1 "$LDM_HOSTFILE" | cut -d" " -f1)',
            "export LDM_PORT=$(( 20000 + SLURM_JOB_ID % 10000 ))  # as trainer/core/dist.py derives it under srun",
            "# The launcher ignores SIGUSR1 (its default action would kill it); the ranks catch it themselves.",
        ]
        inner = (f'trap "" USR1; exec {shlex.quote(deepspeed)} --hostfile "$LDM_HOSTFILE" --no_ssh '
                 f'--node_rank "$SLURM_NODEID" --master_addr "$LDM_HEAD" --master_port "$LDM_PORT" '
                 f"{shlex.quote(script)} {' '.join(args)}")
        # One launcher task per node holding all of the node's share of the job: its CPUs and GPUs.
        step = ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", f"--ntasks={res.nodes}",
                f"--cpus-per-task={per_node * (res.cpus_per_task or 1)}"]
        if res.gpus_per_node:
            step.append(f"--gpus-per-node={res.gpus_per_node}")
        lines.append(f"{' '.join(step)} bash -c {shlex.quote(inner)}")
    else:
        lines += ["# One task per rank; trainer/core/dist.py reads its rank and the rendezvous from SLURM's environment.",
                  "# --kill-on-bad-exit: a rank that fails ends the step at once; the others do not wait for it.",
                  f"{' '.join(srun)} {shlex.quote(python)} {shlex.quote(script)} {' '.join(args)}"]
    return "\n".join(lines) + "\n"


def submit(job: str, config: str | None, overrides: list[str], res: Resources,
           dry_run: bool = False) -> tuple[str | None, str]:
    """Write the script into its folder and `sbatch` it: (job id, script path); (None, the script) for dry runs."""
    res.validate(job)
    cfg = config_lib.load_config(job_class(job), config, overrides)
    text = sbatch_script(job, config, overrides, res, cfg)
    if dry_run:
        return None, text
    out = log_dir(job, cfg, res)
    os.makedirs(out, exist_ok=True)  # SLURM does not create the folder of --output
    path = os.path.join(out, f"{job}.sbatch")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    try:
        proc = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True, timeout=120)
    except OSError as e:
        raise SubmitError(f"cannot run sbatch ({e.strerror}); the script is {path}") from None
    except subprocess.TimeoutExpired:
        raise SubmitError(f"sbatch {path} did not answer within 120 s (slurmctld down or overloaded?); "
                          "check with squeue before submitting again") from None
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        raise SubmitError(f"sbatch {path} failed: {why[-1] if why else f'exit status {proc.returncode}'}")
    return proc.stdout.strip().split(";")[0], path
