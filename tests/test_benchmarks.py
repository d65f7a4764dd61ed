"""The benchmark scripts run and refuse bad arguments in one line (their figures are not tests).

Refusals and the plan run in this process (conftest.run_script: a subprocess spends seconds on
imports); the timed benchmarks run as real processes (they set torch's thread count)."""
import os
import sys

from conftest import PY, ROOT, run_cmd, run_script


def _refused(args: list[str], says: str, capfd) -> None:
    code, _, err = run_script(args[0], args[1:], capfd)
    assert code != 0 and says in err, err[-2000:]


def test_plan_sizes_a_run_from_counted_flops(capfd):
    code, out, _ = run_script("benchmarks/plan.py", ["--images", "2e9", "--resolution", "512", "--gpus", "256",
                                                     "--gpu", "h100"], capfd)
    assert code == 0 and "2.41 TFLOP per image (sd21, 0.87B parameters, 64x64x4 latents)" in out
    assert "VAE encoder forward      1.12 TFLOP per image" in out
    assert "cache on disk" in out and "S3 read per node" in out
    _refused(["benchmarks/plan.py", "--images", "1e6", "--gpus", "8", "--gpu", "tpu"], "error: unknown --gpu 'tpu'",
             capfd)


def test_plan_sizes_sdxl_at_1024_with_both_text_encoders_and_zero_memory(capfd):
    code, out, _ = run_script("benchmarks/plan.py", ["--model", "sdxl", "--resolution", "1024", "--images", "1e9",
                                                     "--gpus", "256", "--gpu", "h100"], capfd)
    assert code == 0 and "20.23 TFLOP per image (sdxl, 2.57B parameters, 128x128x4 latents)" in out
    assert "ViT-L-14 + ViT-bigG-14" in out and "585 KB per sample" in out
    # fp32 weights under bf16 autocast: 16 B/param unpartitioned; ZeRO-2: 4 + 16/256 B/param of 2.57B parameters.
    assert "ZeRO-0                   41.1 GB" in out and "ZeRO-2                   10.4 GB" in out
    assert "training MFU" in out


def test_plan_sizes_flux_and_the_variable_length_t5_cache(capfd):
    """#30: Flux.1-dev at 1024 px: 11.9B parameters (190 GB of model states, the issue's 192 GB), the transformer's
    FLOPs with its 512 text tokens, and the cache at a 40-token caption against every T5 token's states."""
    code, out, _ = run_script("benchmarks/plan.py", ["--model", "flux", "--resolution", "1024", "--images", "1e8",
                                                     "--gpus", "64", "--gpu", "h100"], capfd)
    assert code == 0 and "223.14 TFLOP per image (flux, 11.90B parameters, 128x128x16 latents, 512 text tokens)" in out
    assert "1382 KB per sample" in out and "5249 KB per sample" in out and "ViT-L-14 + T5-XXL" in out
    assert "ZeRO-0                 190.4 GB" in out
    # How many 80 GB GPUs each stage needs for the model states alone (80% of memory): ZeRO-2's 4 B/param stay
    # whole on every GPU, ZeRO-3 partitions all 20.
    assert "ZeRO-2                 12 GPU(s)" in out and "ZeRO-3                 4 GPU(s)" in out
    assert "ZeRO-1                 does not fit" in out


def test_plan_takes_the_training_mfu_measured_in_docs_gpu(tmp_path):
    """plan.py's training MFU is the best benchmarks/gpu.py measured for the model, nearest in resolution,
    from the newest file; smoke runs and other kinds of row do not count."""
    import json

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from plan import measured_mfu

    def write(name, date, rows, smoke=False):
        (tmp_path / name).write_text(json.dumps({"benchmark": "gpu", "date": date, "device": "H100", "smoke": smoke,
                                                 "rows": rows}))
    row = dict(kind="framework", preset="sd15", resolution=512, batch=16)
    write("old.json", "2026-01-01", [dict(row, mfu=0.10)])
    write("new.json", "2026-02-01", [dict(row, mfu=0.30), dict(row, resolution=256, mfu=0.5),
                                     dict(row, kind="reference", mfu=0.9)])
    write("smoke.json", "2026-03-01", [dict(row, mfu=0.99)], smoke=True)
    mfu, source = measured_mfu("sd15", 512, str(tmp_path))
    assert mfu == 0.30 and "on H100" in source and "new.json" in source
    assert measured_mfu("sdxl", 1024, str(tmp_path)) is None


def test_the_benchmark_stepper_steps_an_sdxl_unet(process_group):
    """benchmarks/common.py's Stepper (what gpu.py times) on the tiny SDXL layout: pooled + time_ids batches."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from common import Stepper
    from trainer.core import dist
    from trainer.unet.job import UNetJob

    dist.init()
    stepper = Stepper(UNetJob(model="tiny_sdxl", batch_per_rank=2, zero_stage=0, precision="fp32"), (4, 8, 8),
                      (77, 80), pooled_dim=40)
    stepper.step(2)
    assert stepper.i == 2


def test_gpu_benchmark_parses_its_arguments_and_needs_cuda(capfd):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(ROOT, "benchmarks", "gpu.py"))
    gpu = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gpu  # its dataclasses look their module up
    spec.loader.exec_module(gpu)
    args = gpu.parse_args(["--only", "sd15_512,diffusers", "--steps", "3"])
    assert args.only == ["sd15_512", "diffusers"] and args.steps == 3 and not args.smoke
    for bad, says in ((["--only", "sd3_1024"], "unknown row 'sd3_1024'"), (["--steps", "0"], "must be positive")):
        _refused(["benchmarks/gpu.py", *bad], says, capfd)
    out = run_cmd([PY, "benchmarks/gpu.py", "--only", "sd15_512"], check=False)  # a real process, once
    assert out.returncode != 0 and "needs a CUDA GPU" in out.stderr and "Traceback" not in out.stderr


def test_gpu_benchmark_runs_end_to_end_on_the_cpu_with_smoke(tmp_path):
    """--smoke: the device run's code paths at toy sizes (framework, plain, diffusers-script and cache rows, the
    profile, the JSON written after each row), so that the one GPU call a session gets works the first time."""
    out = tmp_path / "gpu.json"
    res = run_cmd([PY, "benchmarks/gpu.py", "--smoke", "--only", "sd15_512,reference,diffusers,cache", "--steps", "1",
                   "--warmup", "0", "--json", str(out)])
    import json

    d = json.loads(out.read_text())
    rows = {r["name"]: r for r in d["rows"]}
    assert d["smoke"] and list(rows) == ["sd15_512", "reference", "diffusers", "cache"]
    assert all("error" not in r and r["images_per_s"] > 0 for r in rows.values()), rows
    assert rows["sd15_512"]["profile"]["top"] and rows["sd15_512"]["preset"] == "tiny"
    assert set(d["targets"]) == {"sd15_512_images_per_s", "vs_diffusers", "vs_reference_time"}
    assert "targets (issue #26):" in res.stdout


# --- issue 8: the benchmarks make bench runs (benchmarks/run_all.py) ----------------------------------------------
def test_distributed_benchmark_refuses_bad_arguments(capfd):
    _refused(["benchmarks/distributed.py", "--parts", "speed"], "--parts takes step and/or memory", capfd)
    _refused(["benchmarks/distributed.py", "--stages", "0,4"], "ZeRO stages 0-3", capfd)
    _refused(["benchmarks/distributed.py", "--stages", "two"], "ZeRO stages 0-3", capfd)
    _refused(["benchmarks/distributed.py", "--ranks", "1"], "--ranks must be at least 2", capfd)
    _refused(["benchmarks/distributed.py", "--rounds", "0"], "must be positive", capfd)
    _refused(["benchmarks/_zero_worker.py", "memory", "--zero", "4"], "invalid choice", capfd)


def test_zero_worker_counts_what_one_rank_holds(tmp_path):
    """One rank, ZeRO-2: the walk finds parameters 4, gradients 4, fp32 master 4 and Adam 8 bytes per parameter."""
    out = tmp_path / "mem.json"
    run_cmd([PY, "benchmarks/_zero_worker.py", "memory", "--zero", "2", "--width", "64", "--layers", "2",
             "--steps", "1", "--json", str(out)])
    import json

    rank = json.loads(out.read_text())["ranks"][0]
    per_param = {k: v / rank["params"] for k, v in rank["held_bytes"].items()}
    for key, expected in (("parameters", 4), ("gradients", 4), ("fp32_master", 4), ("adam_state", 8)):
        assert abs(per_param[key] - expected) < 0.5, (key, per_param)
    assert rank["rss_growth_bytes"] is not None and rank["peak_rss_growth_bytes"] is not None


def test_pixel_vs_latent_runs_and_refuses_bad_arguments(tmp_path, capfd):
    _refused(["benchmarks/pixel_vs_latent.py", "--resolution", "30"], "multiple of 8", capfd)
    _refused(["benchmarks/pixel_vs_latent.py", "--flop-presets", "sdxl"], "unknown 'sdxl'", capfd)
    out = tmp_path / "pvl.json"
    res = run_cmd([PY, "benchmarks/pixel_vs_latent.py", "--preset", "tiny", "--resolution", "16", "--pixel-batch", "1",
                   "--latent-batch", "2", "--seconds", "0", "--repeats", "1", "--flop-presets", "tiny",
                   "--flop-resolutions", "32", "--json", str(out)])
    assert "512x512x3 / 64x64x4 = 48" in res.stdout
    import json

    d = json.loads(out.read_text())
    assert d["numbers_ratio"] == 48 and d["ratio_flops"] > 1 and d["ratio_time"]["median"] > 0
    assert [(f["preset"], f["resolution"]) for f in d["flops"]] == [("tiny", 16), ("tiny", 32)]


def test_loader_headroom_runs_and_refuses_bad_arguments(tmp_path, capfd):
    _refused(["benchmarks/loader_throughput.py", "--headroom", "huge"], "unknown UNet preset 'huge'", capfd)
    _refused(["benchmarks/loader_throughput.py", "--headroom", "tiny", "--workers", "0"], "include 1 in --workers", capfd)
    out = tmp_path / "loader.json"
    res = run_cmd([PY, "benchmarks/loader_throughput.py", "--workers", "1", "--num", "64", "--per-shard", "32",
                   "--batch", "16", "--latent-shape", "4x4x4", "--text-emb", "8x16", "--headroom", "tiny",
                   "--step-threads", "1", "--seconds", "0.2", "--repeats", "1", "--warmup", "0", "--resolution", "16",
                   "--draw-size", "24", "--unique", "8", "--json", str(out)])
    assert "loader headroom:" in res.stdout
    import json

    d = json.loads(out.read_text())
    latent = next(r for r in d["loader"] if r["pipeline"] == "latent" and r["workers"] == 1)
    assert abs(d["headroom"]["median"] - latent["samples_per_s"]["median"] / d["train_step"]["median"]) < 1e-6
    assert d["train_step"]["threads"] == 1 and d["headroom"]["target"] == 10


def test_run_all_writes_results(tmp_path, capfd):
    _refused(["benchmarks/run_all.py", "--only", "speed"], "--only: unknown 'speed'", capfd)
    out = tmp_path / "RESULTS.md"
    run_cmd([PY, "benchmarks/run_all.py", "--only", "plan", "--out", str(out), "--json-dir", str(tmp_path)])
    text = out.read_text()
    assert "## Machine and software" in text and "deepspeed" in text and "diffusers" in text
    assert "## Targets (issues 8 and 26)" in text and "2.41 TFLOP per image" in text


def test_distributed_benchmark_reports_a_failed_launch(tmp_path):
    """A launch past --timeout is killed with its ranks; the JSON lists the error and the exit status is 1."""
    out = tmp_path / "dist.json"
    res = run_cmd([PY, "benchmarks/distributed.py", "--parts", "memory", "--stages", "0", "--width", "64", "--layers",
                   "2", "--timeout", "2", "--json", str(out)], check=False)
    assert res.returncode == 1 and "timed out after 2s" in res.stderr and "Traceback" not in res.stderr
    import json

    d = json.loads(out.read_text())
    assert d["memory"][0]["stage"] == 0 and "timed out" in d["memory"][0]["error"] and len(d["errors"]) == 1


def test_step_overhead_compares_the_framework_step_with_the_plain_one(tmp_path, capfd):
    """benchmarks/step_overhead.py at a tiny size: both sides run, ops and host reads are counted, the last
    line has the ratios. At ZeRO-0 the framework's step dispatches what the plain PyTorch step does, within
    the issue's 10%, with no host read (counts, unlike times, do not depend on the machine)."""
    _refused(["benchmarks/step_overhead.py", "--stages", "4"], "ZeRO stages 0-3", capfd)
    _refused(["benchmarks/step_overhead.py", "--context", "77"], "TOKENSxWIDTH", capfd)
    out = tmp_path / "overhead.json"
    res = run_cmd([PY, "benchmarks/step_overhead.py", "--model", "tiny", "--stages", "0", "--steps", "1", "--warmup",
                   "1", "--batch", "2", "--latent", "8", "--context", "8x32", "--json", str(out)])
    import json

    assert res.stdout.strip().splitlines()[-1].startswith("step overhead: zero0 ops ")
    row = json.loads(out.read_text())["rows"][0]
    assert row["framework"]["ops"] > 100 and row["reference"]["host_reads"] == 0
    assert row["ops_ratio"] <= 1.10 and row["syncs"] == 0, row
