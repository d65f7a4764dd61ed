"""trainer.unet.step.train_step, the one UNet step the loop and the benchmarks share: its draws are a
function of (seed, rank, step), it consumes grad_accum micro batches, and it reports what the loop logs."""
import itertools

import torch

from trainer.unet.job import UNetJob
from trainer.unet.pretrained import build_model
from trainer.unet.step import build_unet_engine, micro_seed, step_setup, train_step, unet_ds_config


def _batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    shape = (2, 4, 8, 8)
    return [{"mean": torch.randn(shape, generator=g).half(), "std": torch.rand(shape, generator=g).half() * 0.1,
             "mean_flip": torch.randn(shape, generator=g).half(), "std_flip": torch.rand(shape, generator=g).half(),
             "text_emb": torch.randn((2, 8, 32), generator=g).half(), "bytes": 100 + i} for i in range(n)]


def _run(rank: int, steps: int = 2):
    """(losses, results, weights) of `steps` optimizer steps of a fresh tiny engine on the same batches."""
    from trainer.core import dist

    dist.init()
    job = UNetJob(model="tiny", batch_per_rank=2, grad_accum=2, zero_stage=0, precision="fp32", lr=1e-3,
                  caption_dropout=0.5, random_flip=True, offset_noise=0.1, min_snr_gamma=5.0, seed=3)
    engine = build_unet_engine(job, 4, 8, 32, unet_ds_config(job, 1, "fp32"))
    setup = step_setup(job, rank=rank, device=torch.device("cpu"), dtype=torch.float32, shift=torch.tensor(0.1),
                       scale=torch.tensor(0.5), empty=torch.zeros(8, 32))
    batches = iter(_batches(2 * steps + 1))
    results = [train_step(engine, batches, step, setup) for step in range(steps)]
    left = next(batches)  # the steps took exactly grad_accum batches each
    weights = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
    return results, left, weights


def test_train_step_draws_follow_seed_rank_and_step(process_group):
    a, left, wa = _run(rank=0)
    b, _, wb = _run(rank=0)
    c, _, wc = _run(rank=1)
    assert left["bytes"] == 104 and [r.read_bytes for r in a] == [201, 205]
    assert all(r.applied for r in a) and all(r.wait_s >= 0 for r in a)
    assert [r.loss for r in a] == [r.loss for r in b] and torch.equal(wa, wb)  # bit-identical reruns
    assert [r.loss for r in a] != [r.loss for r in c] and not torch.equal(wa, wc)  # each rank draws its own
    assert len({micro_seed(3, rank, m) for rank in (0, 1) for m in range(4)}) == 8


def test_train_step_reports_a_dropped_step(process_group):
    """A NaN in the batch: the loss is NaN and the optimizer step is not applied (ZeRO-0: the fused AdamW skips itself on a non-finite gradient norm)."""
    from trainer.core import dist

    dist.init()
    job = UNetJob(model="tiny", batch_per_rank=2, zero_stage=0, precision="fp32", lr=1e-3)
    engine = build_unet_engine(job, 4, 8, 32, unet_ds_config(job, 1, "fp32"))
    setup = step_setup(job, rank=0, device=torch.device("cpu"), dtype=torch.float32, shift=torch.tensor(0.0),
                       scale=torch.tensor(1.0), empty=torch.zeros(8, 32))
    bad = _batches(1)[0]
    bad["mean"][0, 0, 0, 0] = float("nan")
    before = [p.detach().clone() for p in engine.module.parameters()]
    result = train_step(engine, itertools.repeat(bad), 0, setup)
    assert result.loss != result.loss and not result.applied
    assert all(torch.equal(p, q) for p, q in zip(before, engine.module.parameters()))


def test_channels_last_engine_builds_and_matches_the_contiguous_one(process_group):
    """channels_last=True builds under DeepSpeed (its initial broadcast views each parameter as bytes, which
    failed on NHWC weights: seen on an H200 with benchmarks/gpu.py) and computes what the default layout does."""
    from trainer.core import dist

    dist.init()
    losses = {}
    for nhwc in (False, True):
        job = UNetJob(model="tiny", batch_per_rank=2, zero_stage=0, precision="fp32", lr=1e-3, seed=3,
                      channels_last=nhwc)
        engine = build_unet_engine(job, 4, 8, 32, unet_ds_config(job, 1, "fp32"))
        convs = [p for p in engine.module.parameters() if p.dim() == 4]  # ZeRO-0: NHWC weights after initialize
        assert all(p.is_contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
                   for p in convs)
        setup = step_setup(job, rank=0, device=torch.device("cpu"), dtype=torch.float32, shift=torch.tensor(0.0),
                           scale=torch.tensor(1.0), empty=torch.zeros(8, 32))
        losses[nhwc] = [train_step(engine, iter(_batches(1)), 0, setup).loss]
    assert abs(losses[True][0] - losses[False][0]) < 1e-5


def test_compiled_blocks_train_like_the_eager_unet_and_keep_their_keys(process_group):
    """compile=true compiles each down/mid/up block in place (Module.compile): the same losses as the eager
    UNet, the same state-dict keys (checkpoints, EMA, export). aot_eager traces and differentiates every
    block's graph as inductor would, without its code generation (minutes on 2 CPU cores; the default
    backend, inductor, generates the kernels on a GPU)."""
    from trainer.core import dist
    from trainer.unet.step import prepare_unet

    dist.init()
    runs = {}
    for compiled in (False, True):
        job = UNetJob(model="tiny", batch_per_rank=2, zero_stage=0, precision="fp32", lr=1e-3, seed=3,
                      compile=compiled, compile_backend="aot_eager")
        engine = build_unet_engine(job, 4, 8, 32, unet_ds_config(job, 1, "fp32"))
        setup = step_setup(job, rank=0, device=torch.device("cpu"), dtype=torch.float32, shift=torch.tensor(0.0),
                           scale=torch.tensor(1.0), empty=torch.zeros(8, 32))
        losses = [float(train_step(engine, iter([b]), i, setup).loss) for i, b in enumerate(_batches(3))]
        runs[compiled] = losses, list(engine.module.state_dict())
        blocks = [*engine.module.down_blocks, engine.module.mid_block, *engine.module.up_blocks]
        assert all((b._compiled_call_impl is not None) == compiled for b in blocks)
    assert runs[True][1] == runs[False][1]
    assert max(abs(a - b) for a, b in zip(runs[True][0], runs[False][0])) < 1e-4, runs
    job = UNetJob(model="tiny", compile=True, compile_mode="max-autotune-no-cudagraphs")
    assert prepare_unet(build_model(job, 4, 8, 32), job).down_blocks[0]._compiled_call_impl is not None


def test_the_optimizer_is_torchs_fused_adamw(process_group):
    """ZeRO-0 steps torch's fused AdamW itself (one kernel for every tensor); ZeRO-1/2 hand it the flat partitions."""
    from trainer.core import dist

    dist.init()
    for stage in (0, 2):
        job = UNetJob(model="tiny", batch_per_rank=2, zero_stage=stage, precision="fp32")
        engine = build_unet_engine(job, 4, 8, 32, unet_ds_config(job, 1, "fp32"))
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        assert isinstance(inner, torch.optim.AdamW) and all(g["fused"] for g in inner.param_groups)
