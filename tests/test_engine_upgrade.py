"""Runs started before issue #26 resume: bf16 was DeepSpeed's bf16 mode then (ZeRO-0: its fp16 optimizer
around torch's AdamW, with fp32 master weights beside bf16 module weights; ZeRO-1-3: optimizer files named
bf16_zero_pp_rank_*), and every checkpoint's AdamW groups said fused=None."""
import os

import torch


def _engine(stage: int):
    from trainer.core.engine import build_engine, deepspeed_config

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    return build_engine(model, deepspeed_config(batch_per_rank=4, grad_accum=1, world_size=1, zero_stage=stage,
                                                precision="bf16", lr=0.01, betas=(0.9, 0.999), weight_decay=0.01,
                                                grad_clip=1.0))


def _step(engine, poison: bool = False) -> bool:
    from trainer.core.engine import skipped_steps, step_applied

    before = skipped_steps(engine)
    loss = engine(torch.randn(4, 8)).square().mean() * (float("nan") if poison else 1.0)
    engine.backward(loss)
    engine.step()
    return bool(step_applied(engine, before))


def test_a_zero0_bf16_checkpoint_from_before_resumes_from_its_fp32_master_weights(process_group, tmp_path):
    engine = _engine(0)
    _step(engine)
    engine.save_checkpoint(str(tmp_path), tag="old")
    path = tmp_path / "old" / "mp_rank_00_model_states.pt"
    sd = torch.load(path, weights_only=False)
    master = [[p.detach().clone() + 0.25 for p in engine.module.parameters()]]  # differs from the bf16 copy
    opt = sd["optimizer"]
    for group in opt["param_groups"]:
        group["fused"] = None  # as DeepSpeed's own torch AdamW saved it
    sd["module"] = {k: v.bfloat16() for k, v in sd["module"].items()}
    sd["optimizer"] = {"dynamic_loss_scale": False, "cur_scale": 1.0, "cur_iter": 1, "optimizer_state_dict": opt,
                       "fp32_groups": master}
    torch.save(sd, path)

    resumed = _engine(0)
    resumed.load_checkpoint(str(tmp_path), tag="old", load_optimizer_states=True, load_lr_scheduler_states=False)
    assert all(torch.equal(p, w) for p, w in zip(resumed.module.parameters(), master[0]))
    assert all(g["fused"] for g in resumed.optimizer.param_groups)  # kept, not the saved None
    state = resumed.optimizer.state_dict()["state"]
    assert state and all(int(s["step"]) == 1 for s in state.values())  # the moments came along
    weights = [p.detach().clone() for p in resumed.module.parameters()]
    assert not _step(resumed, poison=True)  # the device-side skip works on the restored optimizer
    assert all(torch.equal(p, w) for p, w in zip(resumed.module.parameters(), weights))
    assert _step(resumed)


def test_a_zero2_checkpoint_with_bf16_named_optimizer_files_resumes(process_group, tmp_path):
    engine = _engine(2)
    _step(engine)
    engine.save_checkpoint(str(tmp_path), tag="old")
    folder = tmp_path / "old"
    for name in os.listdir(folder):
        if name.startswith("zero_pp_rank_"):
            os.rename(folder / name, folder / ("bf16_" + name))
    resumed = _engine(2)
    loaded, _ = resumed.load_checkpoint(str(tmp_path), tag="old", load_optimizer_states=True,
                                        load_lr_scheduler_states=False)
    assert loaded is not None
    assert all(torch.equal(p, q) for p, q in zip(engine.module.parameters(), resumed.module.parameters()))
    inner = resumed.optimizer.optimizer.state_dict()["state"]  # the base AdamW under ZeRO: moments read back
    assert inner and all(int(s["step"]) == 1 for s in inner.values())
    assert _step(resumed)
