"""A tiny MLP trained with the project's DeepSpeed engine, for checkpoint tests.

The data and the global batch are the same at every world size (each rank takes its slice
of the step's global batch), so that losses can be compared across world sizes. Rank 0
appends `{"zero", "step", "loss"}` per step to --log.

    python tests/ckpt_driver.py --root ROOT --steps 6 --save-every 2 [--resume] [--universal]
    deepspeed --num_gpus 2 tests/ckpt_driver.py ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from trainer.core import checkpoint, dist  # noqa: E402
from trainer.core.checkpoint_deepspeed import EnginePart  # noqa: E402
from trainer.core.engine import build_engine, deepspeed_config  # noqa: E402

GLOBAL_BATCH, DIM = 8, 16


def batch(step: int, w: dist.World) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, DIM, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    per = GLOBAL_BATCH // w.size
    return x[w.rank * per:(w.rank + 1) * per], y[w.rank * per:(w.rank + 1) * per]


def run(a: argparse.Namespace, w: dist.World, zero: int, root: str, log) -> None:
    torch.manual_seed(0)
    # 16*13 + 13 + 13 + 1 = 235 parameters: odd, so that ZeRO pads its partitions
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 13), torch.nn.Tanh(), torch.nn.Linear(13, 1))
    engine = build_engine(model, deepspeed_config(
        batch_per_rank=GLOBAL_BATCH // w.size, grad_accum=1, world_size=w.size, zero_stage=zero, precision="fp32",
        lr=0.01, betas=(0.9, 0.999), weight_decay=0.01, grad_clip=1.0))
    step = 0
    if a.resume or a.resume_from:
        path = a.resume_from or checkpoint.latest(root, a.endpoint_url)
        part = EnginePart(engine, universal=a.universal)
        checkpoint.load(path, [part], endpoint_url=a.endpoint_url, local_dir=a.local_dir)
        step = part.state["step"]
        if w.is_main:
            print(f"resumed from {path} at step {step}", flush=True)
    while step < a.steps:
        x, y = batch(step, w)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        step += 1
        mean = dist.all_reduce_mean(loss.item())
        if log:
            log.write(json.dumps({"zero": zero, "step": step, "loss": mean}) + "\n")
            log.flush()
        if a.save_every and step % a.save_every == 0:
            if step == a.crash_before_marker:
                def crash(*_args, **_kwargs):
                    os._exit(3)
                checkpoint.mark_complete = crash  # rank 0 writes the marker; the others die at the barrier
            checkpoint.save(root, step * GLOBAL_BATCH, [EnginePart(engine, {"step": step})], keep_last=a.keep_last,
                            endpoint_url=a.endpoint_url, local_dir=a.local_dir)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--endpoint-url")
    p.add_argument("--zero", default="2", help="ZeRO stage, or stages 3,0: one run each under ROOT/zeroS/checkpoints")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--crash-before-marker", type=int, default=0, help="exit at this step's save, before its marker")
    p.add_argument("--resume", action="store_true", help="from the newest complete checkpoint under --root")
    p.add_argument("--resume-from", help="from this checkpoint")
    p.add_argument("--universal", action="store_true")
    p.add_argument("--loss-log")
    p.add_argument("--local-dir")
    p.add_argument("--local-rank", "--local_rank", type=int)  # the deepspeed launcher passes it
    a = p.parse_args()

    w = dist.init()
    log = open(a.loss_log, "a") if a.loss_log and w.is_main else None
    stages = [int(z) for z in a.zero.split(",")]
    for zero in stages:  # one process for several stages: the launcher's start-up is most of a run's time
        root = a.root if len(stages) == 1 else os.path.join(a.root, f"zero{zero}", "checkpoints")
        run(a, w, zero, root, log)
    dist.barrier()
    dist.shutdown()
    if log:
        log.close()
    # Skip interpreter teardown: a 2-rank ZeRO-3 run on gloo was seen to abort there now and then
    # ("terminate called without an active exception") after all its work was done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
