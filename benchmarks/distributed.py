"""Distributed overhead and ZeRO memory per rank, through the real `deepspeed` launcher on CPU ranks.

    .venv/bin/python benchmarks/distributed.py
    .venv/bin/python benchmarks/distributed.py --rounds 1 --stages 0,2 --json runs/bench/distributed.json

(a) Step time: the demo UNet (3.2M parameters) stepped by the UNet job's own train_step in the
    job's engine (ZeRO-2, fp32, AdamW, clipping; --batch per rank) under `deepspeed --num_gpus 2`
    and `--num_gpus 1`: weak scaling, so the ideal ratio is 1 and the difference is the cost of
    distribution over gloo. Each rank runs one torch thread (a core each on 2 cores). --rounds
    pairs of launches, order reversed every other round; each launch times --repeats windows of
    --steps steps after --warmup (benchmarks/_zero_worker.py). The figure is the median over rounds
    of the ratio of the two launches' median ms/step; beside it the same ratio of CPU time per step.
(b) Memory per rank at each of --stages with --ranks ranks, one launch per stage, on an MLP whose
    model states dwarf DeepSpeed's fixed costs (--layers Linear(--width, --width): 42M fp32
    parameters by default). Each rank counts the bytes it holds after a backward, before the
    optimizer step, by walking the engine's tensors, and reads its RSS growth. RSS also holds
    activations, communication buckets and transient copies, so it falls less than model states:
    ZeRO-3's reduce bucket (DeepSpeed's default reduce_bucket_size 5e8 elements, which the trainer
    keeps) adds 4 B/param below that many parameters, which --small-bucket shows. The memory
    launches fix glibc's mmap threshold at 64 KiB (MALLOC_MMAP_THRESHOLD_) so that freed tensors go
    back to the system and RSS follows the live tensors. This is a benchmark: it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

from common import ROOT, CpuWindow, header, run_group, started, stats, write_json  # benchmarks/common.py

WORKER = os.path.join(ROOT, "benchmarks", "_zero_worker.py")


# The prediction (Rajbhandari et al. 2019, "ZeRO", section 5): model states are 2 fp16 parameter + 2
# fp16 gradient + 12 optimizer (fp32 master, Adam m, v) bytes per parameter; stage 1 divides the
# optimizer bytes by N ranks, stage 2 the gradients too, stage 3 the parameters too. This run is fp32:
# parameters 4, gradients 4, Adam 8, and at stages 1-3 an fp32 master partition of 4 (DeepSpeed's ZeRO
# optimizer copies the partition it updates even in fp32: single_partition_of_fp32_groups,
# fp32_partitioned_groups_flat); at stage 0 torch's AdamW updates in place. So 16 B/param at stage 0,
# 4 + 4 + 12/N at stage 1, 4 + 16/N at stage 2, 20/N at stage 3.
def predicted_bytes_per_param(stage: int, n: int) -> dict[str, float]:
    """The ZeRO paper's model as applied to fp32 DeepSpeed on CPU."""
    return {"parameters": 4.0 / (n if stage >= 3 else 1), "gradients": 4.0 / (n if stage >= 2 else 1),
            "fp32_master": 0.0 if stage == 0 else 4.0 / n, "adam_state": 8.0 / (n if stage >= 1 else 1)}


def paper_mixed_precision(stage: int, n: int) -> float:
    """Model-state bytes per parameter in the paper: 2 + 2 + 12, partitioned stage by stage."""
    return {0: 16.0, 1: 4 + 12 / n, 2: 2 + 14 / n, 3: 16 / n}[stage]


class LaunchError(RuntimeError):
    """A launch that failed every try: the figures it would have given are reported as missing."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks: int, worker_args: list[str], timeout_s: int, tries: int = 2,
           env: dict[str, str] | None = None) -> tuple[dict, float]:
    """Run the worker under `deepspeed --num_gpus RANKS`; (rank 0's JSON, seconds the launch took).

    Rank 0 writes its JSON once every rank's figures are gathered, so a rank that dies after
    that (seen rarely on CPU: a C++ "terminate called" while the process group shuts down)
    costs nothing; a launch that died before is tried again, once by default."""
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    for attempt in range(1, tries + 1):
        with tempfile.TemporaryDirectory(prefix="dist-bench-") as tmp:
            out = os.path.join(tmp, "out.json")
            port = _free_port()
            cmd = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(port), WORKER, *worker_args, "--json", out]
            full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore::FutureWarning", **(env or {})}
            t = time.perf_counter()
            rc, stdout, stderr = run_group(cmd, timeout_s, cwd=ROOT, env=full_env)
            seconds = time.perf_counter() - t
            if os.path.exists(out):
                if rc != 0:
                    print(f"note: {' '.join(worker_args[:3])} on {ranks} ranks exited with status {rc} after writing "
                          "its figures; they are used", flush=True)
                with open(out) as f:
                    return json.load(f), seconds
        if attempt < tries:
            print(f"note: {' '.join(worker_args[:3])} on {ranks} ranks failed (status {rc}); trying again", flush=True)
    reason = f"timed out after {timeout_s}s" if rc is None else f"exit status {rc}"
    raise LaunchError(f"{' '.join(worker_args[:3])} on {ranks} ranks: {reason}, {tries} tries; the last output:\n"
                      f"{(stdout[-3000:] + chr(10) + stderr[-3000:]).strip()[-2000:]}")


def measure_steps(args) -> dict:
    """--rounds pairs of 1-rank and --ranks-rank launches of the demo UNet at ZeRO-2."""
    common = ["step", "--zero", "2", "--batch", str(args.batch), "--steps", str(args.steps),
              "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    runs: dict[int, list[dict]] = {1: [], args.ranks: []}
    other = []
    for r in range(args.rounds):
        for n in ((1, args.ranks) if r % 2 == 0 else (args.ranks, 1)):
            with CpuWindow() as window:
                result, seconds = launch(n, common, args.timeout)
            ms = [statistics.median(rank["ms_per_step"]) for rank in result["ranks"]]
            cpu = [statistics.median(rank["cpu_ms_per_step"]) for rank in result["ranks"]]
            runs[n].append({"ms": result["ranks"][0]["ms_per_step"], "median_ms": max(ms),
                            "cpu_ms": statistics.median(cpu), "launch_s": seconds, "params": result["ranks"][0]["params"]})
            if window.other is not None:  # cores the rest of the machine used meanwhile
                other.append(window.other)
    one, many = runs[1], runs[args.ranks]
    per_round = [b["median_ms"] / a["median_ms"] for a, b in zip(one, many)]
    cpu_per_round = [b["cpu_ms"] / a["cpu_ms"] for a, b in zip(one, many)]
    return {"ranks": args.ranks, "batch_per_rank": args.batch, "params": one[0]["params"],
            "one_rank_ms": stats([m for run in one for m in run["ms"]]),
            "n_rank_ms": stats([m for run in many for m in run["ms"]]),
            "ratio": stats(per_round), "cpu_ratio": stats(cpu_per_round),
            "one_rank_cpu_ms": statistics.median(run["cpu_ms"] for run in one),
            "n_rank_cpu_ms": statistics.median(run["cpu_ms"] for run in many),
            "launch_s": [run["launch_s"] for run in one + many], "other_cores_max": max(other) if other else None}


MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}


def measure_memory(args) -> list[dict]:
    """One launch per stage (and one more of ZeRO-3 with --small-bucket); a row per launch."""
    runs = [(stage, 0) for stage in args.stages] + ([(3, args.small_bucket)] if args.small_bucket and 3 in args.stages
                                                    else [])
    rows = []
    for stage, bucket in runs:
        try:
            result, seconds = launch(args.ranks, ["memory", "--zero", str(stage), "--batch", str(args.mem_batch),
                                                  "--width", str(args.width), "--layers", str(args.layers),
                                                  "--reduce-bucket", str(bucket)], args.timeout, env=MMAP_THRESHOLD)
        except LaunchError as e:  # the other stages still run
            print(f"error: {e}", file=sys.stderr, flush=True)
            rows.append({"stage": stage, "reduce_bucket": bucket, "error": str(e).splitlines()[0]})
            continue
        ranks = result["ranks"]
        params = ranks[0]["params"]
        worst = max(ranks, key=lambda r: r["held_total"])  # the rank holding most (ranks differ by padding only)
        held = {k: worst["held_bytes"][k] / params for k in worst["held_bytes"]}
        pred = predicted_bytes_per_param(stage, args.ranks)  # keyed by the model states, as the worker names them
        model_states = sum(held[k] for k in pred)

        def rss(key):
            values = [r[key] for r in ranks if r.get(key) is not None]
            return max(values) / params if values else None
        rows.append({"stage": stage, "reduce_bucket": bucket, "params": params, "held_per_param": held,
                     "model_states_per_param": model_states,
                     "predicted_per_param": pred, "predicted_model_states": sum(pred.values()),
                     "paper_mixed_precision": paper_mixed_precision(stage, args.ranks),
                     "optimizer_state_per_param": held["fp32_master"] + held["adam_state"],
                     "predicted_optimizer_state": pred["fp32_master"] + pred["adam_state"],
                     "rss_at_count_per_param": rss("rss_growth_bytes"),
                     "peak_rss_init_per_param": rss("peak_rss_growth_init_bytes"),
                     "peak_rss_steps_per_param": rss("peak_rss_growth_bytes"),
                     "holders": worst["holders"], "launch_s": seconds})
    return rows


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2, help="ranks of the distributed runs (CPU processes)")
    p.add_argument("--parts", default="step,memory", help="what to measure: step, memory or both (comma-separated)")
    p.add_argument("--rounds", type=int, default=2, help="(a) pairs of 1-rank and N-rank launches, order alternating")
    p.add_argument("--batch", type=int, default=64, help="(a) samples per rank per step (the demo's batch_per_rank)")
    p.add_argument("--steps", type=int, default=5, help="(a) steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="(a) timed windows per launch")
    p.add_argument("--warmup", type=int, default=2, help="(a) untimed steps per launch")
    p.add_argument("--stages", default="0,1,2,3", help="(b) ZeRO stages to measure, comma-separated")
    p.add_argument("--width", type=int, default=2048, help="(b) MLP width")
    p.add_argument("--layers", type=int, default=10, help="(b) MLP Linear layers")
    p.add_argument("--mem-batch", type=int, default=8, help="(b) samples per rank")
    p.add_argument("--small-bucket", type=int, default=5_000_000,
                   help="(b) also run ZeRO-3 with this reduce_bucket_size in elements (0: don't)")
    p.add_argument("--timeout", type=int, default=600, help="seconds one launch may take")
    p.add_argument("--json", default="", metavar="OUT", help="also write the figures to this JSON file")
    args = p.parse_args()
    parts = {s.strip() for s in args.parts.split(",") if s.strip()}
    if not parts or parts - {"step", "memory"}:
        p.error(f"--parts takes step and/or memory, got {args.parts!r}")
    try:
        args.stages = [int(s) for s in args.stages.split(",") if s.strip()]
    except ValueError:
        p.error(f"--stages takes comma-separated ZeRO stages 0-3, got {args.stages!r}")
    if not args.stages or any(s not in (0, 1, 2, 3) for s in args.stages):
        p.error(f"--stages takes comma-separated ZeRO stages 0-3, got {args.stages}")
    if args.ranks < 2:
        p.error("--ranks must be at least 2 (the 1-rank run is always made)")
    if min(args.rounds, args.batch, args.steps, args.repeats, args.width, args.layers, args.mem_batch, args.timeout) < 1 \
            or args.warmup < 0 or args.small_bucket < 0:
        p.error("--rounds, --batch, --steps, --repeats, --width, --layers, --mem-batch and --timeout must be positive, "
                "--warmup and --small-bucket non-negative")
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "deepspeed")):
        p.error(f"no deepspeed launcher beside {sys.executable}: run with the project's .venv/bin/python")

    import deepspeed  # noqa: F401  (versions for the report; the launches import it themselves)
    import torch

    start = started()
    t0 = time.perf_counter()
    errors = []
    step = memory = None
    if "step" in parts:
        try:
            step = measure_steps(args)
        except LaunchError as e:  # the memory part still runs
            print(f"error: {e}", file=sys.stderr, flush=True)
            errors.append(f"(a) step time: {str(e).splitlines()[0]}")
    if "memory" in parts:
        memory = measure_memory(args)
        errors += [f"(b) memory, ZeRO-{row['stage']}: {row['error']}" for row in memory if "error" in row]
        measured = [row for row in memory if "error" not in row]

    header("Distributed overhead and ZeRO memory per rank, CPU ranks over gloo (benchmarks/distributed.py)", start,
           software=f"torch {torch.__version__}, deepspeed {sys.modules['deepspeed'].__version__}; every rank 1 torch "
                    "thread, fp32, AdamW")
    print()
    if step is not None:
        n = args.ranks
        print(f"(a) step time, demo UNet ({step['params'] / 1e6:.2f}M params), ZeRO-2, batch {args.batch} per rank; "
              f"{args.rounds} rounds x (1 rank, {n} ranks), each {args.repeats} windows x {args.steps} steps after "
              f"{args.warmup} warm-up")
        head = f"{'ranks':>5} {'ms/step':>8} {'min-max':>15} {'spread':>7} {'samples/s':>10} {'CPU ms/step':>12}"
        print(head + "\n" + "-" * len(head))
        for ranks, key, cpu in ((1, "one_rank_ms", step["one_rank_cpu_ms"]), (n, "n_rank_ms", step["n_rank_cpu_ms"])):
            s = step[key]
            rng = f"{s['min']:.0f}-{s['max']:.0f}"
            print(f"{ranks:>5} {s['median']:>8.1f} {rng:>15} {s['spread'] * 100:>6.1f}% "
                  f"{ranks * args.batch / s['median'] * 1e3:>10.1f} {cpu:>12.1f}")
        r, c = step["ratio"], step["cpu_ratio"]
        print(f"ratio {n}-rank / 1-rank step time: {r['median']:.3f} (per round {', '.join(f'{v:.3f}' for v in r['values'])}; "
              f"ideal 1.000); scaling efficiency {1 / r['median'] * 100:.0f}%")
        print(f"ratio {n}-rank / 1-rank CPU time per step: {c['median']:.3f} (per round "
              f"{', '.join(f'{v:.3f}' for v in c['values'])}): the work distribution adds per rank")
        busy = step["other_cores_max"]
        if busy is not None and busy > 0.5:
            print(f"note: other processes used up to {busy:.1f} cores during a launch, competing with the ranks: the "
                  "wall-clock ratio is noisy; the CPU-time ratio is the steadier figure")
        print()
    if memory is not None and measured:
        n = args.ranks
        params = measured[0]["params"]
        print(f"(b) memory per rank, {n} ranks, MLP {args.layers} x Linear({args.width}, {args.width}) = {params / 1e6:.1f}M "
              f"fp32 params, batch {args.mem_batch} per rank; bytes per parameter (x {params / 1e6:.1f}M = MB), the rank "
              "holding most")
        head = (f"{'ZeRO':>9} {'params':>7} {'grads':>6} {'master':>7} {'Adam':>6} {'model states':>13} {'predicted':>10} "
                f"{'paper mp':>9} {'opt. state':>11} {'buffers':>8} {'RSS now':>8} {'peak init':>10} {'peak steps':>11}")
        print(head + "\n" + "-" * len(head))
        for row in memory:
            label = f"{row['stage']}" + (f" b{row['reduce_bucket']:.0e}".replace("e+0", "e") if row["reduce_bucket"] else "")
            if "error" in row:
                print(f"{label:>9} failed: {row['error']}")
                continue
            h = row["held_per_param"]
            opt = f"{row['optimizer_state_per_param']:.1f}/{row['predicted_optimizer_state']:.1f}"
            print(f"{label:>9} {h['parameters']:>7.2f} {h['gradients']:>6.2f} {h['fp32_master']:>7.2f} "
                  f"{h['adam_state']:>6.2f} {row['model_states_per_param']:>13.2f} {row['predicted_model_states']:>10.2f} "
                  f"{row['paper_mixed_precision']:>9.2f} {opt:>11} {h['buffers'] + h['other']:>8.2f} "
                  f"{_fmt(row['rss_at_count_per_param']):>8} {_fmt(row['peak_rss_init_per_param']):>10} "
                  f"{_fmt(row['peak_rss_steps_per_param']):>11}")
        print("(held after a backward, before the optimizer step, by walking the engine's tensors. predicted: the paper's "
              "model applied to fp32 DeepSpeed: params 4, grads 4, Adam 8, + fp32 master 4 at stages 1-3, divided by N "
              "stage by stage; paper mp: the paper's mixed-precision 2+2+12; opt. state: master + Adam, measured/predicted; "
              "buffers: communication buckets, allocated (resident only as far as written); RSS now: RSS growth since "
              "just before the model was built, at the count; peak init: peak RSS growth while the model and engine were "
              "built; peak steps: peak RSS growth over the training steps; 3 bNeM: ZeRO-3 with reduce_bucket_size N x 10^M "
              f"elements instead of DeepSpeed's default 5e8; RSS with {next(iter(MMAP_THRESHOLD))}="
              f"{next(iter(MMAP_THRESHOLD.values()))})")
        base = measured[0] if measured[0]["stage"] == 0 else None
        for row in (r for r in measured if not r["reduce_bucket"]):
            h, pred = row["held_per_param"], row["predicted_per_param"]
            off = [k for k in pred if abs(h[k] - pred[k]) > 0.05 * 16]
            if off:
                print(f"ZeRO-{row['stage']}: " + "; ".join(f"{k} {h[k]:.2f} B/param, predicted {pred[k]:.2f}" for k in off)
                      + (" (DeepSpeed reduces the full gradients into this rank's partition at the end of the backward "
                         "and frees them: stage 1 holds only the partition afterwards)"
                         if row["stage"] == 1 and off == ["gradients"] else ""))
        if base is not None:
            shares = ", ".join(f"ZeRO-{row['stage']} {row['optimizer_state_per_param'] / base['model_states_per_param'] * 100:.0f}%"
                               for row in measured if not row["reduce_bucket"])
            print(f"optimizer state per rank as a share of ZeRO-0's model states: {shares}")
        top = max(measured, key=lambda r: (r["stage"], not r["reduce_bucket"]))
        print(f"largest holders at ZeRO-{top['stage']} (B/param): " + "; ".join(
            f"{path} ({cat}) {b / params:.2f}" for path, cat, b in top["holders"][:5]))
        print()
    total = time.perf_counter() - t0
    print(f"took {total:.0f}s")
    write_json(args.json, "distributed", start, {"settings": vars(args), "step": step, "memory": memory,
                                                 "errors": errors, "seconds": total},
               deepspeed=sys.modules["deepspeed"].__version__)
    if errors:
        sys.exit("error: some launches failed, their figures are missing:\n  " + "\n  ".join(errors))


if __name__ == "__main__":
    main()
