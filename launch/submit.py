"""Submit a job to SLURM: writes an sbatch script beside the job's outputs and runs sbatch.

    python launch/submit.py --job unet --config configs/unet/sd21.yaml --nodes 4 --gpus-per-node 8 \\
        --partition gpu --time 2-00:00:00 [--dry-run] [key=value overrides ...]
    python launch/submit.py --job cache --config configs/cache/sd21.yaml --gpus-per-node 1 --array-tasks 16

The config and overrides are checked here, then passed unchanged to the job on the nodes.
unet: one srun task per GPU, SIGUSR1 --signal-seconds before the time limit makes it
checkpoint and requeue itself; the script and slurm-JOBID.out go to run_dir. cache: a job
array over slices of the input shards; script and logs go to OUT_URL.slurm/. --dry-run
prints the script and submits nothing: stdout holds the script alone (`--dry-run > job.sbatch`),
everything else goes to stderr.
"""
import argparse
import os
import sys

from data_pipeline.storage import DataError
from trainer.core.config import ConfigError, one_line
from trainer.slurm import JOBS, Resources, SubmitError, submit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", required=True, choices=sorted(JOBS))
    p.add_argument("--config", help="the job's YAML file")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="one task (rank) per GPU; 0: CPU tasks")
    p.add_argument("--tasks-per-node", type=int, default=0, help="CPU ranks per node (default: --gpus-per-node, or 1)")
    p.add_argument("--cpus-per-task", type=int, default=0, help="cores per rank, DataLoader workers included")
    p.add_argument("--partition", default="")
    p.add_argument("--time", default="", help="time limit, e.g. 2-00:00:00")
    p.add_argument("--account", default="")
    p.add_argument("--signal-seconds", type=int, default=120,
                   help="unet, autoencoder: SIGUSR1 this long before the time limit (checkpoint + requeue); 0: none")
    p.add_argument("--launcher", choices=("srun", "deepspeed"), default="srun",
                   help="unet: srun task per rank, or DeepSpeed's launcher per node with a hostfile")
    p.add_argument("--array-tasks", type=int, default=0, help="cache: job-array tasks (default min(shards, 64))")
    p.add_argument("--log-dir", default="", help="script and logs (default: run_dir; cache: OUT_URL.slurm)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="another sbatch option, verbatim (--sbatch=--qos=high); repeatable")
    p.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the job's config")
    args = p.parse_args()
    res = Resources(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                    cpus_per_task=args.cpus_per_task, partition=args.partition, time=args.time,
                    account=args.account, signal_s=args.signal_seconds, launcher=args.launcher,
                    array_tasks=args.array_tasks, log_dir=args.log_dir, sbatch=args.sbatch)
    # Resolving the config imports the job's models; a library that prints while loading (DeepSpeed's
    # accelerator notice, warnings) must not end up in the script. File descriptor 1 points at stderr
    # until the script is written to the real stdout.
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        job_id, script = submit(args.job, args.config, args.overrides, res, dry_run=args.dry_run)
    except (ConfigError, DataError, SubmitError, OSError) as e:
        sys.exit(f"error: {one_line(e)}")
    finally:
        sys.stdout.flush()
        os.dup2(real_stdout, 1)
        os.close(real_stdout)
    print(script if job_id is None else f"submitted SLURM job {job_id}: {script}", end="" if job_id is None else "\n")


if __name__ == "__main__":
    main()
