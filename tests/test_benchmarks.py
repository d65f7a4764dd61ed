"""The benchmark scripts run and refuse bad arguments in one line (their figures are not tests)."""
from conftest import PY, run_cmd


def test_plan_sizes_a_run_from_counted_flops():
    out = run_cmd([PY, "benchmarks/plan.py", "--images", "2e9", "--resolution", "512", "--gpus", "256", "--gpu", "h100"])
    assert "2.41 TFLOP per image (sd21, 64x64x4 latents)" in out.stdout
    assert "VAE encoder forward      1.12 TFLOP per image" in out.stdout
    assert "cache on disk" in out.stdout and "S3 read per node" in out.stdout
    bad = run_cmd([PY, "benchmarks/plan.py", "--images", "1e6", "--gpus", "8", "--gpu", "tpu"], check=False)
    assert bad.returncode != 0 and "error: unknown --gpu 'tpu'" in bad.stderr and "Traceback" not in bad.stderr
