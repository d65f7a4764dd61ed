"""#29: optimizer=adamw|adamw8bit|prodigy|adafactor, each in the project's DeepSpeed engine on 2 ranks under the
ZeRO stages where it can work (two steps straight and across a checkpoint: the resumed weights are exact), and
refused with the reason where it cannot."""
from __future__ import annotations

import json
import math

import pytest

from conftest import ranks_of, run_cmd

RUNS = ["adamw8bit:2", "adamw8bit:3", "prodigy:0", "adafactor:0"]


def test_each_optimizer_trains_and_resumes_exactly_on_two_ranks(tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is a dependency (setup.py); this machine lacks it")
    out = run_cmd([*ranks_of(2), "tests/optimizer_driver.py", "--root", str(tmp_path), "--runs", ",".join(RUNS)],
                  timeout=600)
    rows = {f"{r['optimizer']}:{r['zero_stage']}": r for r in
            (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))}
    assert sorted(rows) == sorted(RUNS)
    classes = {"adamw8bit": "AdamW8bit", "prodigy": "Prodigy", "adafactor": "Adafactor"}
    for run, row in rows.items():
        assert row["class"] == classes[row["optimizer"]], run
        assert row["moved"] and row["resume_exact"], run
        assert all(math.isfinite(x) for x in row["losses"]) and row["losses"][-1] < row["losses"][0], run
    # 8-bit: the moments are uint8 (with fp32 block maxima), under ZeRO's flat slices as on whole weights.
    assert "torch.uint8" in rows["adamw8bit:2"]["state_dtypes"] and "torch.uint8" in rows["adamw8bit:3"]["state_dtypes"]


@pytest.mark.parametrize("settings, message", [
    (dict(optimizer="adafactor", zero_stage=2), "optimizer=adafactor runs at zero_stage=0 (got 2)"),
    (dict(optimizer="prodigy", lr=1e-4), "use lr=1.0"),
    (dict(optimizer="prodigy", lr=1.0, zero_stage=1, elastic_resume=True), "elastic_resume at zero_stage=1"),
    (dict(optimizer="lion"), "optimizer must be one of adamw, adamw8bit, prodigy, adafactor"),
])
def test_what_cannot_work_is_refused_with_the_reason(settings, message):
    from trainer.core.config import ConfigError
    from trainer.core.data import LatentData
    from trainer.unet.job import UNetJob

    cfg = UNetJob(data=LatentData(urls="/cache"), run_dir="/tmp/run", **settings)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg.validate()


def test_prodigy_under_zero_on_cpu_ranks_is_refused_before_it_fails():
    """prodigyopt sums the ranks' step-size estimates through a CUDA tensor (its fsdp_in_use)."""
    import torch

    from trainer.core.config import ConfigError
    from trainer.core.optimizers import build

    params = [torch.nn.Parameter(torch.zeros(4))]
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: prodigy at ZeRO-2 runs")
    with pytest.raises(ConfigError, match="use zero_stage=0 on CPUs"):
        build("prodigy", params, lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, zero_stage=2,
              world_size=2, warmup=True)
    assert type(build("prodigy", params, lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, zero_stage=2,
                      world_size=1, warmup=True)).__name__ == "Prodigy"  # one rank: its slice is everything


def test_the_unet_job_trains_with_8bit_adamw(tiny_cache, tmp_path):
    """The user's path: optimizer= on train_unet's command line, 2 ranks at ZeRO-2, two steps."""
    from trainer.core.metrics import read_log

    pytest.importorskip("bitsandbytes", reason="bitsandbytes is a dependency (setup.py); this machine lacks it")
    run_dir = tmp_path / "run"
    run_cmd([*ranks_of(2), "launch/train_unet.py", f"run_dir={run_dir}", f"data.urls={tiny_cache}", "model=tiny",
             "batch_per_rank=8", "total_samples=32", "warmup_samples=0", "log_every_samples=16", "optimizer=adamw8bit",
             "zero_stage=2", "wandb=disabled", "data.num_workers=0"], timeout=600)
    rows = [r for r in read_log(str(run_dir / "log.jsonl")) if "loss" in r]
    assert [r["samples"] for r in rows] == [16, 32] and all(math.isfinite(r["loss"]) for r in rows)
