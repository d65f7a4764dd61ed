"""Each optimizer of trainer/core/optimizers.py in the project's DeepSpeed engine, on every rank: 4 steps
straight, and 2 steps, a checkpoint, a new engine resumed from it and 2 more. Rank 0 prints one JSON line
per (optimizer, ZeRO stage): the losses, whether the weights moved, whether the resumed run's weights equal
the straight run's, and the dtypes of the optimizer's state.

    torchrun --nproc_per_node 2 tests/optimizer_driver.py --root DIR --runs adamw8bit:2,prodigy:0,...
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
from trainer.core.engine import build_engine, deepspeed_config, full_weights  # noqa: E402

GLOBAL_BATCH, DIM, HIDDEN = 8, 16, 512  # 9,217 weights: bitsandbytes keeps 8-bit state for tensors of >= 4,096


def engine_for(name: str, stage: int, w: dist.World):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))
    lr = 1.0 if name == "prodigy" else 1e-3
    return build_engine(model, deepspeed_config(
        batch_per_rank=GLOBAL_BATCH // w.size, grad_accum=1, world_size=w.size, zero_stage=stage, precision="fp32",
        lr=lr, betas=(0.9, 0.999), weight_decay=0.01, grad_clip=1.0, optimizer=name, warmup=False))


def train(engine, w: dist.World, first: int, last: int) -> list[float]:
    losses = []
    for step in range(first, last):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(GLOBAL_BATCH, DIM, generator=g)
        y = torch.sin(x.sum(1, keepdim=True))
        per = GLOBAL_BATCH // w.size
        loss = torch.nn.functional.mse_loss(engine(x[w.rank * per:(w.rank + 1) * per]),
                                            y[w.rank * per:(w.rank + 1) * per])
        engine.backward(loss)
        engine.step()
        losses.append(dist.all_reduce_mean(loss.item()))
    return losses


def weights(engine) -> list[torch.Tensor]:
    with full_weights(engine) as module:  # ZeRO-3: gathered
        return [p.detach().clone() for p in module.parameters()]


def state_dtypes(engine) -> list[str]:
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the client optimizer
    return sorted({str(v.dtype) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1})


def main() -> None:
    a = argparse.ArgumentParser()
    a.add_argument("--root", required=True)
    a.add_argument("--runs", required=True, help="name:stage,...")
    args = a.parse_args()
    w = dist.init(120)
    for run in args.runs.split(","):
        name, stage = run.split(":")
        stage = int(stage)
        straight = engine_for(name, stage, w)
        start = weights(straight)
        losses = train(straight, w, 0, 4)
        end = weights(straight)
        dtypes = state_dtypes(straight)
        del straight
        first = engine_for(name, stage, w)
        train(first, w, 0, 2)
        root = os.path.join(args.root, f"{name}-{stage}")
        path = checkpoint.save(root, 2, [EnginePart(first, {"step": 2})])
        del first
        resumed = engine_for(name, stage, w)
        checkpoint.load(path, [EnginePart(resumed)])
        train(resumed, w, 2, 4)
        again = weights(resumed)
        exact = all(torch.equal(a, b) for a, b in zip(end, again))
        moved = any(not torch.equal(a, b) for a, b in zip(start, end))
        if w.is_main:
            print(json.dumps({"optimizer": name, "zero_stage": stage, "losses": losses, "moved": moved,
                              "resume_exact": exact, "state_dtypes": dtypes,
                              "class": type(getattr(resumed.optimizer, "optimizer", resumed.optimizer)).__name__}),
                  flush=True)
        del resumed
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
