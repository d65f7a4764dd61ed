"""The benchmark scripts run and refuse bad arguments in one line (their figures are not tests)."""
import os

from conftest import PY, ROOT, run_cmd


def test_plan_sizes_a_run_from_counted_flops():
    out = run_cmd([PY, "benchmarks/plan.py", "--images", "2e9", "--resolution", "512", "--gpus", "256", "--gpu", "h100"])
    assert "2.41 TFLOP per image (sd21, 64x64x4 latents)" in out.stdout
    assert "VAE encoder forward      1.12 TFLOP per image" in out.stdout
    assert "cache on disk" in out.stdout and "S3 read per node" in out.stdout
    bad = run_cmd([PY, "benchmarks/plan.py", "--images", "1e6", "--gpus", "8", "--gpu", "tpu"], check=False)
    assert bad.returncode != 0 and "error: unknown --gpu 'tpu'" in bad.stderr and "Traceback" not in bad.stderr


def test_gpu_benchmark_parses_its_arguments_and_needs_cuda():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(ROOT, "benchmarks", "gpu.py"))
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    args = gpu.parse_args(["--presets", "sd21", "--resolutions", "512", "--compile", "on"])
    assert args.presets == ["sd21"] and args.resolutions == ["512"] and args.compile == ["on"]
    for bad, says in ((["--presets", "sdxl"], "unknown 'sdxl'"), (["--resolutions", "500"], "multiples of 8"),
                      (["--compile", "maybe"], "on/off")):
        out = run_cmd([PY, "benchmarks/gpu.py", *bad], check=False)
        assert out.returncode != 0 and says in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = run_cmd([PY, "benchmarks/gpu.py", "--presets", "sd15"], check=False)
    assert out.returncode != 0 and "needs a CUDA GPU" in out.stderr and "Traceback" not in out.stderr
