"""Run every benchmark with its `make bench` settings and write benchmarks/RESULTS.md.

    make bench                                        # = .venv/bin/python benchmarks/run_all.py
    .venv/bin/python benchmarks/run_all.py --quick    # smoke run, a few minutes, small and noisy
    .venv/bin/python benchmarks/run_all.py --only loader,pixel_vs_latent --out /tmp/RESULTS.md

Each benchmark runs as its own process, one after another (they would compete for the cores),
writes its figures with `--json` into --json-dir and its printed report into a .log beside it.
RESULTS.md then gathers the machine, the software versions, the date, every figure with its
median over repeats and its spread, and for each target of issue 8 whether it was met, with a
sentence where it was not. The settings keep `make bench` within about 13 minutes on a quiet
2-core CPU (20 at most); a benchmark that fails is reported in RESULTS.md and makes the exit
status non-zero, and the others still run. benchmarks/gpu.py runs only where CUDA is present.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

from common import ROOT, CpuWindow, cpu_model, run_group, started, usable_cpus  # benchmarks/common.py
from summaries import ITEM_OF, SUMMARIZERS, Target

HERE = os.path.join(ROOT, "benchmarks")


@dataclasses.dataclass(frozen=True)
class Bench:
    name: str  # key for --only, and the stem of its .json and .log
    title: str
    script: str
    bench: list[str]  # `make bench` settings
    quick: list[str]  # --quick settings: seconds, for smoke runs
    json: bool = True  # takes --json OUT
    cuda: bool = False  # runs only where CUDA is present


BENCHES = [
    Bench("cache_tiny", "1. Cache speedup, tiny preset", "cache_vs_onthefly.py",
          ["--preset", "tiny", "--threads", "1", "--steps", "8", "--repeats", "5", "--warmup", "2"],
          ["--preset", "tiny", "--threads", "1", "--steps", "2", "--repeats", "2", "--warmup", "1", "--batch", "8"]),
    Bench("cache_demo", "1. Cache speedup, demo preset (mid-size)", "cache_vs_onthefly.py",
          ["--preset", "demo", "--threads", "1", "--steps", "4", "--repeats", "5", "--warmup", "1"],
          ["--preset", "demo", "--threads", "1", "--steps", "1", "--repeats", "2", "--warmup", "1", "--batch", "8"]),
    Bench("loader", "2. Loader headroom", "loader_throughput.py",
          ["--workers", "1", "--num", "1000", "--latent-shape", "4x8x8", "--text-emb", "32x64", "--batch", "64",
           "--headroom", "demo", "--step-threads", "1", "--seconds", "3", "--repeats", "3"],
          ["--workers", "1", "--num", "256", "--per-shard", "128", "--latent-shape", "4x8x8", "--text-emb", "32x64",
           "--batch", "64", "--headroom", "demo", "--step-threads", "1", "--seconds", "1", "--repeats", "2", "--warmup", "0.5",
           "--resolution", "64", "--draw-size", "96"]),
    Bench("precompute", "3. Precompute efficiency", "cache_throughput.py",
          ["--num", "1024", "--repeats", "3"],
          ["--num", "128", "--batch", "32", "--per-shard", "64", "--repeats", "2"]),
    Bench("distributed", "4. Distributed overhead and ZeRO memory", "distributed.py",
          ["--rounds", "2", "--steps", "5", "--repeats", "3", "--warmup", "2"],
          ["--rounds", "1", "--steps", "1", "--repeats", "2", "--warmup", "1", "--batch", "16", "--width", "512",
           "--layers", "4", "--small-bucket", "100000"]),
    Bench("pixel_vs_latent", "5. Pixel vs latent", "pixel_vs_latent.py",
          ["--resolution", "64", "--pixel-batch", "2", "--latent-batch", "64", "--seconds", "4", "--repeats", "3"],
          ["--resolution", "64", "--pixel-batch", "1", "--latent-batch", "8", "--seconds", "0", "--repeats", "1",
           "--flop-presets", "demo", "--flop-resolutions", "256"]),
    Bench("gpu", "6. GPU throughput and MFU", "gpu.py", ["--steps", "10", "--warmup", "3"],
          ["--only", "sd15_512,reference", "--steps", "3", "--warmup", "1"], cuda=True),
    Bench("step_overhead", "7. Step overhead against a plain PyTorch step", "step_overhead.py",
          ["--steps", "8", "--warmup", "2"], ["--steps", "2", "--warmup", "1", "--model", "tiny"]),
    Bench("plan", "Sizing a run (plan.py)", "plan.py",
          ["--images", "2e9", "--resolution", "512", "--gpus", "256", "--gpu", "h100"],
          ["--images", "2e9", "--resolution", "512", "--gpus", "256", "--gpu", "h100"], json=False),
]


# --- running --------------------------------------------------------------------------------------
def _cuda_available() -> bool:
    """Asked in a child process: importing torch here would only slow the runner down."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                         capture_output=True, text=True)
    return out.stdout.strip() == "True"


def child_env() -> dict[str, str]:
    """The benchmarks' environment. Ops DeepSpeed JIT-builds go to ~/.cache/torch_extensions, which
    every virtualenv of this user shares: another environment's build there would make the next
    launch rebuild (minutes, under a lock) inside the timed runs. This one gets its own directory.
    (On CPU the framework builds none: trainer/core/engine.py skips the shared-memory comm op.)"""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore::FutureWarning"}
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    return env


def run_one(b: Bench, argv: list[str], json_dir: str, timeout_s: int) -> dict:
    """Run one benchmark; its report goes to NAME.log, its figures to NAME.json."""
    log_path, json_path = (os.path.join(json_dir, f"{b.name}.{ext}") for ext in ("log", "json"))
    if os.path.exists(json_path):
        os.remove(json_path)  # never report a previous run's figures
    cmd = [sys.executable, os.path.join("benchmarks", b.script), *argv] + (["--json", json_path] if b.json else [])
    t0 = time.perf_counter()
    rc, out, err = run_group(cmd, timeout_s, cwd=ROOT, env=child_env())
    rc = -1 if rc is None else rc  # timed out
    seconds = time.perf_counter() - t0
    with open(log_path, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n{out}\n{err}")
    result = {"cmd": " ".join(cmd[1:]).replace(ROOT + os.sep, ""), "rc": rc, "seconds": seconds,
              "stdout": out, "log": os.path.relpath(log_path, ROOT)}
    if b.json and os.path.exists(json_path):  # a failed run may still have written what it measured
        try:
            with open(json_path) as f:
                result["data"] = json.load(f)
        except (OSError, ValueError) as e:
            err += f"\nunreadable --json output: {e}"
    if rc == 0 and b.json and "data" not in result:
        result["rc"], err = -2, f"no readable --json output\n{err}"
    if result["rc"] != 0:
        result["error"] = (err.strip() or out.strip()).splitlines()[-12:]
    return result


# --- figures and targets ------------------------------------------------------------------------
NOISE = ("[WARNING]", "[INFO]", "No CUDA runtime", "FutureWarning", "built successfully", "figures written to")

def _num(v: float | None) -> str:
    if v is None:
        return ""
    a = abs(v)
    text = f"{v:,.0f}" if a >= 1000 else f"{v:.1f}" if a >= 100 else f"{v:.2f}" if a >= 1 else f"{v:.3f}"
    return text


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "deepspeed", "diffusers", "open_clip_torch", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def write_results(path: str, profile: str, results: dict[str, dict], skipped: dict[str, str], started, wall_s: float,
                  load0, other_cores: float | None) -> list[Target]:
    versions = _versions()
    mem = _memory_gb()
    sections, targets = [], []
    for b in BENCHES:
        if b.name in skipped:
            targets.append(Target(ITEM_OF.get(b.name, b.title), "", "", "", "not run", skipped[b.name]))
            continue
        if b.name not in results:
            continue
        r = results[b.name]
        lines = [f"### {b.title}", "", f"`{r['cmd']}` — {r['seconds']:.0f} s, full report in `{r['log']}`", ""]
        if r["rc"] != 0:
            lines += ["**Failed** (exit status {}){}:".format(r["rc"], "; the figures it measured before are below"
                                                               if "data" in r else ""),
                      "", "```text", *r.get("error", []), "```", ""]
            if b.name in ITEM_OF:
                targets.append(Target(ITEM_OF[b.name], "", "failed", "", "not run", f"{b.script} failed: "
                                      + (r.get("error") or ["?"])[-1]))
            if "data" not in r:
                sections.append("\n".join(lines))
                continue
        if not b.json:
            lines += ["```text", r["stdout"].strip(), "```", ""]
            sections.append("\n".join(lines))
            continue
        figs, tgs = SUMMARIZERS[b.name](r["data"])
        targets += tgs
        lines += ["| figure | median | min – max | spread | n | unit |", "|---|---:|---:|---:|---:|---|"]
        for f in figs:
            rng = f"{_num(f.lo)} – {_num(f.hi)}" if f.lo is not None and f.hi is not None and f.n else ""
            spread = f"{f.spread * 100:.1f}%" if f.spread is not None and f.n else ""
            lines.append(f"| {f.name} | {_num(f.median)} | {rng} | {spread} | {f.n or ''} | {f.unit} |")
        # The script's own report (runs/ is not committed): its breakdowns and notes stay with the figures.
        report = [line for line in r["stdout"].splitlines() if not any(k in line for k in NOISE)]
        lines += ["", "<details><summary>the script's report</summary>", "", "```text", *report, "```", "", "</details>", ""]
        sections.append("\n".join(lines))

    gpu_note = skipped.get("gpu", "")
    head = [
        "# Benchmark results",
        "",
        f"Written by `make bench` (`benchmarks/run_all.py`{' --quick' if profile == 'quick' else ''}) on "
        f"{started.isoformat(timespec='seconds')}; the whole run took {wall_s / 60:.1f} min."
        + (" **Quick profile: small settings for a smoke test, the figures are rough.**" if profile == "quick" else ""),
        "",
        "Performance claims here are ratios measured side by side in one run on one machine; absolute times on a "
        "shared CPU are noise. Each figure is the median over its repeats; min – max and spread "
        "((max − min) / median) are over the same repeats; n is the number of repeats (blank: a single computed value).",
        "",
        "## Machine and software",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs ({usable_cpus()} usable)"
        + (f", {mem:.1f} GB memory" if mem else "") + f"; {platform.system()} {platform.release()} {platform.machine()}",
        f"- load average before the run: {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f} (1 / 5 / 15 min)"
        if load0 else "- load average: n/a",
        f"- other processes used {other_cores:.2f} cores on average during the run (Linux /proc/stat, minus the "
        "benchmarks' own CPU time)" if other_cores is not None else "- CPU used by other processes: n/a",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- GPU: {gpu_note}" if gpu_note else "- GPU: " + (results.get("gpu", {}).get("data") or {}).get("device", "n/a"),
        "",
        "## Targets (issues 8 and 26)",
        "",
        "| item | figure | measured | target | result |",
        "|---|---|---|---|---|",
    ]
    for t in targets:
        head.append(f"| {t.item} | {t.figure} | {t.measured} | {t.target} | {t.status} |")
    notes = [f"- **{t.item}** ({t.status}): {t.why}" for t in targets if t.why]
    if notes:
        head += ["", *notes]
    head += ["", "## Figures", ""]
    with open(path, "w") as f:
        f.write("\n".join(head) + "\n" + "\n".join(sections))
    return targets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small settings for a smoke run (minutes; rough figures)")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(b.name for b in BENCHES)}")
    p.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"), help="the Markdown file to write")
    p.add_argument("--json-dir", default=os.path.join(ROOT, "runs", "bench"), help="where each benchmark's JSON and log go")
    p.add_argument("--timeout", type=int, default=900, help="seconds one benchmark may take")
    args = p.parse_args()
    names = [b.name for b in BENCHES]
    only = [v.strip() for v in args.only.split(",") if v.strip()]
    bad = [v for v in only if v not in names]
    if bad:
        p.error(f"--only: unknown {bad[0]!r}; choose from {', '.join(names)}")
    if args.timeout < 1:
        p.error("--timeout must be positive")
    os.makedirs(args.json_dir, exist_ok=True)
    profile = "quick" if args.quick else "bench"

    started_at, load0 = started()
    with CpuWindow() as window:  # and the CPU other processes used over the whole run
        t0 = window.t0
        cuda = _cuda_available()
        results, skipped = {}, {}
        for b in BENCHES:
            if only and b.name not in only:
                continue
            if b.cuda and not cuda:
                skipped[b.name] = f"none visible, benchmarks/{b.script} not run (it needs CUDA)"
                continue
            print(f"[{time.perf_counter() - t0:6.0f}s] {b.title}: {b.script} ...", flush=True)
            r = run_one(b, b.quick if args.quick else b.bench, args.json_dir, args.timeout)
            results[b.name] = r
            print(f"[{time.perf_counter() - t0:6.0f}s]   {'done' if r['rc'] == 0 else 'FAILED'} in {r['seconds']:.0f}s "
                  f"(log: {r['log']})", flush=True)
    wall = window.wall
    targets = write_results(args.out, profile, results, skipped, started_at, wall, load0, window.other)
    print(f"\nwrote {os.path.relpath(args.out, os.getcwd())} in {wall / 60:.1f} min")
    width = max((len(t.item) for t in targets), default=0)
    for t in targets:
        print(f"  {t.item:<{width}}  {t.status:<9} {t.measured}")
    failed = [name for name, r in results.items() if r["rc"] != 0]
    if failed:
        sys.exit(f"error: {', '.join(failed)} failed; see their logs in {args.json_dir}")


if __name__ == "__main__":
    main()
