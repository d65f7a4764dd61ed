"""One rank of benchmarks/distributed.py, started by the `deepspeed` launcher (or plain python: 1 rank).

    deepspeed --num_gpus 2 benchmarks/_zero_worker.py step --zero 2 --json OUT
    deepspeed --num_gpus 2 benchmarks/_zero_worker.py memory --zero 3 --json OUT

Every rank uses one torch thread, so one and two ranks compete fairly on a 2-core CPU; rank 0
writes every rank's figures to --json. step: the demo UNet on 4x8x8 latents in the UNet job's
engine, fp32, stepped by its train_step on cache batches in memory; --repeats windows of --steps
steps between barriers after --warmup. memory: an MLP through the same engine config at ZeRO
--zero; after --steps steps, one more backward, and before its optimizer step the bytes this rank
holds are counted by walking the engine's tensors (each storage once), beside the RSS growth from
just before the model was built: then, its peak while building, and its peak over the steps
(Linux VmHWM, reset through /proc/self/clear_refs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import warnings

import torch
from common import CpuWindow, Stepper  # benchmarks/common.py

from trainer.core import dist
from trainer.core.engine import build_engine
from trainer.unet.job import UNetJob
from trainer.unet.step import unet_ds_config

# Model states (the ZeRO paper's 16 bytes/param: parameters, gradients, optimizer state = fp32
# master copy + Adam m, v), then the residual: fixed-size communication buckets and the rest.
CATEGORIES = ("parameters", "gradients", "fp32_master", "adam_state", "buffers", "other")


# --- resident memory -----------------------------------------------------------------------------
def _status_kb(key: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: resident peak), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Make VmHWM start again from the current RSS (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --- the bytes a rank holds ----------------------------------------------------------------------
def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _tensors(obj, path: str, seen: set[int], depth: int):
    """(path, tensor) for every tensor reachable from `obj` through lists, dicts and DeepSpeed's
    or torch's own objects (not modules: those are walked by their parameters)."""
    if id(obj) in seen or depth < 0:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
        if obj.grad is not None:
            yield path + ".grad", obj.grad
        ds = getattr(obj, "ds_tensor", None)
        if isinstance(ds, torch.Tensor):
            yield path + ".ds_tensor", ds
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}[{k if isinstance(k, (str, int)) else type(k).__name__}]", seen, depth - 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]", seen, depth - 1)
    elif isinstance(obj, torch.nn.Module):
        return
    elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
        for k, v in vars(obj).items():
            yield from _tensors(v, f"{path}.{k}", seen, depth - 1)


def _category_of_attribute(path: str) -> str:
    """Where DeepSpeed keeps a tensor, by the ZeRO optimizer's attribute names (stage_1_and_2.py,
    stage3.py): gradient buckets and partitions, flat parameter buffers, fp32 master partitions."""
    name = path.split(".")[1].split("[")[0] if "." in path else path
    leaf = path.rsplit(".", 1)[-1]
    if "ipg" in name:  # reduce buckets of reduce_bucket_size elements, whatever the model's size
        return "buffers"
    if leaf == "grad" or "grad" in name:
        return "gradients"
    if "fp32" in name:
        return "fp32_master"
    if any(k in name for k in ("bit16", "fp16", "param", "lp_")):
        return "parameters"
    return "other"


def held_bytes(engine) -> tuple[dict[str, int], list[tuple[str, str, int]]]:
    """Bytes of distinct tensor storages this rank holds, by category, and the largest holders.

    Claimed in this order, so a storage reachable from two places counts once, under the first:
    the inner torch optimizer's state (Adam m and v: `adam_state`); the tensors that optimizer
    updates (the module's own parameters at ZeRO-0: `parameters`; DeepSpeed's fp32 master
    partitions at ZeRO-1..3: `fp32_master`) and their gradients; the module's parameters, their
    ZeRO-3 `ds_tensor` partitions and gradients; then everything else the ZeRO optimizer object
    holds, by attribute name (`_category_of_attribute`).
    """
    claimed: dict[int, tuple[str, str, int]] = {}

    def claim(path: str, t: torch.Tensor, category: str) -> None:
        if t.device.type == "meta" or t.numel() == 0:
            return
        ptr, nbytes = _storage(t)
        if ptr and ptr not in claimed:
            claimed[ptr] = (path, category, nbytes)

    module_ptrs = {_storage(p)[0] for p in engine.module.parameters() if p.numel()}
    zero_opt = engine.optimizer
    inner = getattr(zero_opt, "optimizer", zero_opt)
    if isinstance(inner, torch.optim.Optimizer):
        for i, state in enumerate(inner.state.values()):
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    claim(f"optimizer.state[{i}].{k}", v, "adam_state")
        for g, group in enumerate(inner.param_groups):
            for i, p in enumerate(group["params"]):
                kind = "parameters" if _storage(p)[0] in module_ptrs else "fp32_master"
                claim(f"optimizer.param_groups[{g}][{i}]", p, kind)
                if p.grad is not None:
                    claim(f"optimizer.param_groups[{g}][{i}].grad", p.grad, "gradients")
    for name, p in engine.module.named_parameters():
        ds = getattr(p, "ds_tensor", None)
        if isinstance(ds, torch.Tensor):
            claim(f"module.{name}.ds_tensor", ds, "parameters")
        claim(f"module.{name}", p, "parameters")
        if p.grad is not None:
            claim(f"module.{name}.grad", p.grad, "gradients")
    if zero_opt is not inner:
        for path, t in _tensors(zero_opt, "zero_optimizer", set(), depth=6):
            claim(path, t, _category_of_attribute(path))
    totals = dict.fromkeys(CATEGORIES, 0)
    for _, category, nbytes in claimed.values():
        totals[category] += nbytes
    holders: dict[tuple[str, str], int] = {}
    for path, category, nbytes in claimed.values():  # grouped by attribute, indices dropped
        key = (path.split("[")[0] if path.startswith(("zero_optimizer", "optimizer")) else "module.*"
               + (".grad" if path.endswith(".grad") else ".ds_tensor" if path.endswith("ds_tensor") else ""), category)
        holders[key] = holders.get(key, 0) + nbytes
    top = sorted(((k[0], k[1], v) for k, v in holders.items()), key=lambda r: -r[2])
    return totals, top


# --- the two modes -------------------------------------------------------------------------------
def _mlp(width: int, layers: int) -> torch.nn.Module:
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*mods[:-1])


def _config(args, w: dist.World, batch: int) -> dict:
    """The UNet job's DeepSpeed config at this batch and ZeRO stage, fp32; --reduce-bucket overrides
    DeepSpeed's reduce_bucket_size."""
    cfg = unet_ds_config(_job(args, batch), w.size, "fp32")
    if args.reduce_bucket:
        cfg["zero_optimization"]["reduce_bucket_size"] = args.reduce_bucket
    return cfg


def _job(args, batch: int) -> UNetJob:
    return UNetJob(model="demo", batch_per_rank=batch, zero_stage=args.zero, precision="fp32", lr=1e-4)


def run_memory(args, w: dist.World) -> dict:
    import deepspeed

    cfg = _config(args, w, args.batch)
    # A throw-away engine on a tiny model first: DeepSpeed's one-time costs (lazy imports, its
    # communication op, ~200 MB of RSS) fall before the baseline instead of into the figures.
    tiny = build_engine(_mlp(16, 2), cfg)
    tiny.backward(tiny(torch.ones(args.batch, 16)).pow(2).mean())
    tiny.step()
    del tiny
    torch.manual_seed(0)
    rss0 = _status_kb("VmRSS")
    peak_reset = reset_peak_rss()  # from here VmHWM is the peak since the baseline
    if args.zero == 3:  # each layer is partitioned as it is built: no rank ever holds the whole model
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = _mlp(args.width, args.layers)
        numel = sum(p.ds_numel for p in model.parameters())
    else:
        model = _mlp(args.width, args.layers)
        numel = sum(p.numel() for p in model.parameters())
    engine = build_engine(model, cfg)
    hwm_init = _status_kb("VmHWM")  # building the model and the engine (DeepSpeed's flattening copies)
    peak_reset = peak_reset and reset_peak_rss()  # from here: the training steps only
    g = torch.Generator().manual_seed(w.rank)
    x = torch.randn(args.batch, args.width, generator=g)
    y = torch.randn(args.batch, args.width, generator=g)
    for _ in range(args.steps):
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
    loss = torch.nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    totals, top = held_bytes(engine)  # gradients and optimizer state both held here
    rss1 = _status_kb("VmRSS")
    engine.step()
    hwm = _status_kb("VmHWM")
    return {"rank": w.rank, "params": numel, "held_bytes": totals, "held_total": sum(totals.values()),
            "holders": top[:8],
            "rss_growth_bytes": None if rss0 is None or rss1 is None else (rss1 - rss0) * 1024,
            "peak_rss_growth_init_bytes": None if not peak_reset or rss0 is None else (hwm_init - rss0) * 1024,
            "peak_rss_growth_bytes": None if not peak_reset or rss0 is None or hwm is None else (hwm - rss0) * 1024}


def run_step(args, w: dist.World) -> dict:
    s = Stepper(_job(args, args.batch), (4, 8, 8), (32, 64), count=4, seed=1000 + w.rank, world_size=w.size,
                rank=w.rank, ds_config=_config(args, w, args.batch))
    s.step(args.warmup)
    ms, cpu_ms = [], []
    for _ in range(args.repeats):
        dist.barrier()
        with CpuWindow() as cpu:
            s.step(args.steps)
            dist.barrier()
        ms.append(cpu.wall / args.steps * 1e3)
        cpu_ms.append(cpu.own / args.steps * 1e3)
    return {"rank": w.rank, "params": s.params, "ms_per_step": ms, "cpu_ms_per_step": cpu_ms,
            "median_ms": statistics.median(ms)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["step", "memory"])
    p.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3], help="ZeRO stage")
    p.add_argument("--batch", type=int, default=0, help="samples per rank (default: 64 for step, 8 for memory)")
    p.add_argument("--steps", type=int, default=0, help="step: steps per window; memory: full steps before "
                   "counting (default: 5 and 2)")
    p.add_argument("--repeats", type=int, default=3, help="step: timed windows")
    p.add_argument("--warmup", type=int, default=2, help="step: untimed steps first")
    p.add_argument("--width", type=int, default=2048, help="memory: MLP width")
    p.add_argument("--layers", type=int, default=10, help="memory: MLP Linear layers")
    p.add_argument("--reduce-bucket", type=int, default=0,
                   help="DeepSpeed reduce_bucket_size in elements (0: the trainer's config, DeepSpeed's default 5e8)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher may pass it
    p.add_argument("--json", default="", metavar="OUT", help="rank 0 writes every rank's figures here")
    args = p.parse_args()
    args.batch = args.batch or (64 if args.mode == "step" else 8)
    args.steps = args.steps or (5 if args.mode == "step" else 2)
    if min(args.batch, args.steps, args.repeats, args.width, args.layers) < 1 or min(args.warmup, args.reduce_bucket) < 0:
        p.error("--batch, --steps, --repeats, --width and --layers must be positive, --warmup and --reduce-bucket "
                "non-negative")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's notes on DeepSpeed's collectives
    w = dist.init()
    result = run_memory(args, w) if args.mode == "memory" else run_step(args, w)
    result["threads"] = torch.get_num_threads()
    ranks = dist.all_gather_objects(result)
    if w.is_main:
        out = {"mode": args.mode, "zero": args.zero, "world_size": w.size, "settings": vars(args), "ranks": ranks}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)
        else:
            print(json.dumps(out, indent=2))
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
