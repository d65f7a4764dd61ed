"""Two ranks of a ZeRO-0 engine: after engine.backward each rank's gradients must be the mean of every
rank's own, on the framework's flat all-reduce (trainer/core/engine.py _lean_allreduce) as on DeepSpeed's.
With --zero12: at ZeRO-1 and ZeRO-2, the flat gradient buckets (trainer/core/zero_flat.py) train to
DeepSpeed's own weights on 2 ranks, each rank its own data, with accumulation and several buckets.

    deepspeed --num_gpus 2 tests/allreduce_driver.py [--deepspeed-own | --zero12]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from trainer.core import dist  # noqa: E402
from trainer.core.engine import build_engine, deepspeed_config  # noqa: E402


def zero12(w) -> None:
    from unittest import mock

    from trainer.core import zero_lean

    def train(stage: int, lean: bool, precision: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)], torch.nn.Linear(16, 1))
        config = deepspeed_config(batch_per_rank=4, grad_accum=2, world_size=w.size, zero_stage=stage,
                                  precision=precision, lr=0.05, betas=(0.9, 0.999), weight_decay=0.01, grad_clip=0.5)
        config["zero_optimization"]["reduce_bucket_size"] = 300
        with mock.patch.object(zero_lean, "install", zero_lean.install if lean else (lambda engine: [])):
            engine = build_engine(model, config)
        assert hasattr(engine.optimizer, "flat_gradients") == lean
        g, norms = torch.Generator().manual_seed(10 + w.rank), []
        for _ in range(3 * 2):
            engine.backward(engine(torch.randn(4, 16, generator=g)).square().mean() * 100)
            engine.step()
            norms.append(float(engine.get_global_grad_norm() or 0))  # of the mean gradient, before clipping
        return [torch.tensor(norms)] + [p.detach().clone() for p in model.parameters()]

    for stage, precision, tol in ((1, "fp32", 1e-6), (2, "fp32", 1e-6), (2, "bf16", 2e-2)):
        for a, b in zip(train(stage, True, precision), train(stage, False, precision), strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol / 10)
    if w.is_main:
        print(f"ZeRO-1/2 flat gradients train to DeepSpeed's weights on {w.size} ranks")


def main() -> None:
    w = dist.init()
    if "--zero12" in sys.argv:
        return zero12(w)
    torch.manual_seed(0)  # the same weights on both ranks
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5),
                                torch.nn.GELU(), torch.nn.Linear(5, 1))
    engine = build_engine(model, deepspeed_config(batch_per_rank=4, grad_accum=1, world_size=w.size, zero_stage=0,
                                                  precision="fp32", lr=0.01, betas=(0.9, 0.999), weight_decay=0.0,
                                                  grad_clip=0.0))
    lean = getattr(engine.allreduce_and_copy, "flat", False)
    if "--deepspeed-own" in sys.argv:
        assert lean, "the flat all-reduce was not installed"
        del engine.allreduce_and_copy  # the class's method again
        lean = False
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(w.rank))  # each rank its own data
    loss = model(x).square().mean()
    local = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    expected = []
    for g in local:
        parts = [torch.empty_like(g) for _ in range(w.size)]
        tdist.all_gather(parts, g.contiguous())
        expected.append(torch.stack(parts).mean(0))
    engine.backward(loss)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-7)
    engine.step()
    if w.is_main:
        print(f"gradients are the mean over {w.size} ranks ({'flat all-reduce' if lean else 'DeepSpeed'})")
    dist.barrier()  # both ranks done before either tears its process group down (an exit racing the peer's
    dist.shutdown()  # gloo thread aborted rank 1 once: "terminate called without an active exception")


if __name__ == "__main__":
    main()
