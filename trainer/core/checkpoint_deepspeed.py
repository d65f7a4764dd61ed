"""The DeepSpeed engine as a checkpoint part (trainer/core/checkpoint.py), with elastic resume
through DeepSpeed's universal checkpoint.

Every rank writes its own shard of the engine's files (a save gated on rank 0 hangs under
ZeRO, diffusers #2606); a model with `save_pretrained` is also written whole in diffusers
format under `unet/`, for sampling and export. A ZeRO-1/2/3 checkpoint loads as saved only at
its own world size and stage; `universal=True` converts it once into `universal/` inside the
checkpoint (DeepSpeed's ds_to_universal) and loads that at any world size (and ZeRO-1 <-> 2).
ZeRO-0 keeps whole optimizer state in one file: any world size, as saved.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import tempfile

from data_pipeline import storage

from trainer.core import dist
from trainer.core.checkpoint import info, scalars
from trainer.core.checkpoint_io import cache, download, is_url, local_path, remove, upload
from trainer.core.checkpoint_trust import RANK_FILE, CheckpointError, DamagedCheckpoint, refuse_links, verify_files

UNIVERSAL = "universal"  # the converted (world-size-free) copy, inside the checkpoint folder
CONVERTED = "CONVERTED"  # written last into UNIVERSAL/
PRETRAINED = "unet"  # the whole model in diffusers format, beside the engine's files


def _convert(src: str, out: str) -> None:
    """DeepSpeed's ds_to_universal on the checkpoint's own top-level .pt files (it walks its
    input folder recursively, so `unet/` or an older `universal/` must not be in it). They are
    hard-linked, not symlinked, into its input: a checkpoint never holds a symbolic link."""
    from deepspeed.checkpoint import ds_to_universal

    with tempfile.TemporaryDirectory(prefix=".universal-", dir=src) as tmp:
        inp, work = os.path.join(tmp, "in"), os.path.join(tmp, "out")
        os.makedirs(inp)
        for name in os.listdir(src):
            if name.endswith(".pt"):
                try:
                    os.link(os.path.join(src, name), os.path.join(inp, name))
                except OSError:  # a filesystem without hard links
                    shutil.copyfile(os.path.join(src, name), os.path.join(inp, name))
        args = argparse.Namespace(input_folder=inp, output_folder=work, num_extract_workers=1, num_merge_workers=1,
                                  keep_temp_folder=False, strict=True, inject_missing_state=True)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(work, out)
    with open(os.path.join(out, CONVERTED), "w") as f:
        f.write("ds_to_universal\n")


def to_universal(path: str, endpoint_url: str | None = None, local_dir: str | None = None) -> str:
    """Collective: rank 0 converts the checkpoint at `path` into `path/universal` (once; a URL
    is fetched, converted and the result uploaded), the others wait. Returns that path, or
    `path` itself for a ZeRO-0 checkpoint: its optimizer state is whole in the model file and
    loads at any world size as it is."""
    meta, out = info(path, endpoint_url), storage.join(path, UNIVERSAL)
    if meta.get("zero_stage") == 0:
        return path
    error = None
    if dist.world().is_main and not storage.exists(storage.join(out, CONVERTED), endpoint_url):
        try:
            src = (download(path, cache(path, local_dir), endpoint_url, lambda rel: rel.endswith(".pt")
                            and "/" not in rel) if is_url(path) else local_path(path))
            refuse_links(src)
            verify_files(src, None)  # the conversion unpickles every rank's files unrestricted
            _convert(src, os.path.join(src, UNIVERSAL))
            if is_url(path):
                remove(out, endpoint_url)
                upload(os.path.join(src, UNIVERSAL), out, endpoint_url)
        except Exception as e:  # told to every rank, so that none waits for a conversion that failed
            error = e if isinstance(e, CheckpointError) else CheckpointError(
                f"converting {path} to a universal checkpoint failed: {type(e).__name__}: {e}")
    message = dist.all_gather_objects(None if error is None else str(error))[0]
    if error is not None or message is not None:
        raise error or CheckpointError(message)
    return out


def _check_fits(path: str, meta: dict, stage: int, size: int, universal: bool) -> None:
    """Refuse, in one line, what DeepSpeed would fail on obscurely or load only in part.

    ds_to_universal writes zero/optimizer_state.pt in the saving stage's own format (ZeRO-1/2:
    the optimizer's global state; ZeRO-3: its nested optimizer_state_dict), and ZeRO-3 names
    its model files per rank: a universal checkpoint moves between ZeRO-1 and 2 only."""
    saved, ranks = meta.get("zero_stage"), meta.get("world_size")
    if saved is None:  # a marker from before these fields: DeepSpeed's own checks only
        return
    if saved != stage and not (universal and {saved, stage} <= {1, 2}):
        hint = "load it with universal=True" if {saved, stage} <= {1, 2} else f"resume it at ZeRO-{saved}"
        raise CheckpointError(f"checkpoint {path} was written at ZeRO-{saved}, this engine runs ZeRO-{stage}: {hint}")
    if saved > 0 and not universal and ranks not in (None, size):
        raise CheckpointError(f"checkpoint {path} was written by {ranks} ranks at ZeRO-{saved}, this job has "
                              f"{size}: load it with universal=True")


def _save_trainable(module, folder: str) -> None:
    """The trainable parameters alone, in the layout of a diffusers model folder."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    if hasattr(module, "save_config"):
        module.save_config(folder)
    state = {n: p.detach().float().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}
    save_file(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


class EnginePart:
    """Model, optimizer and a client state dict (the job's step, loader positions, ...) of a
    DeepSpeed engine. Set `state` before a save (its scalars go into the marker); `load` sets
    it to the saved one. `universal=True` loads at another world size (see the module doc).
    `exclude_frozen=True` saves only the parameters that train (LoRA adapters; `unet/` then
    holds them alone, with the model's config): the job rebuilds the frozen rest on load."""

    def __init__(self, engine, state: dict | None = None, universal: bool = False, exclude_frozen: bool = False):
        self.engine, self.state, self.universal, self.exclude_frozen = engine, state, universal, exclude_frozen

    def _stage(self) -> int:
        return int(self.engine.zero_optimization_stage())

    def marker(self) -> dict:
        return {**scalars(self.state or {}), "zero_stage": self._stage()}

    def save(self, folder: str) -> None:
        from trainer.core.engine import full_weights  # deepspeed is imported only by jobs that use it

        parent, tag = os.path.split(folder)
        self.engine.save_checkpoint(parent, tag=tag, client_state=self.state or {}, save_latest=False,
                                    exclude_frozen_parameters=self.exclude_frozen)
        if self.exclude_frozen:
            if dist.world().is_main:
                _save_trainable(self.engine.module, os.path.join(folder, PRETRAINED))
        elif hasattr(self.engine.module, "save_pretrained"):
            with full_weights(self.engine) as module:
                if dist.world().is_main:
                    module.save_pretrained(os.path.join(folder, PRETRAINED), safe_serialization=True)

    def check(self, path: str, meta: dict) -> None:
        _check_fits(path, meta, self._stage(), dist.world().size, self.universal)
        self.universal = self.universal and self._stage() != 0  # ZeRO-0 needs no conversion (see to_universal)

    def prepare(self, path: str, meta: dict, endpoint_url: str | None, local_dir: str | None) -> None:
        if self.universal:
            to_universal(path, endpoint_url, local_dir)

    def _rank(self) -> int | None:
        """The rank whose files this rank reads: universal: rank 0's model file on every rank;
        an elastic ZeRO checkpoint: every rank's; else its own."""
        elastic = bool(self.engine.zero_optimization() and self.engine.zero_elastic_checkpoint())
        return 0 if self.universal else None if elastic else dist.world().rank

    def wants(self, rel: str) -> bool:
        if self.universal:
            if not rel.startswith(UNIVERSAL + "/"):
                return False
            rel = rel[len(UNIVERSAL) + 1:]
            if rel.startswith("zero/"):
                return True
        m, rank = RANK_FILE.match(rel), self._rank()
        return "/" not in rel and rel.endswith(".pt") and (rank is None or not m or int(m.group(1)) == rank)

    def verify(self, folder: str) -> None:
        if not self.universal:  # the files DeepSpeed's load_checkpoint opens for this rank must all be there
            names, rank = os.listdir(folder), self._rank()
            if not any(n.endswith("model_states.pt") for n in names):
                raise DamagedCheckpoint(f"checkpoint {folder} is damaged: it has no model states "
                                        "(mp_rank_00_model_states.pt)")
            if self._stage() > 0 and rank is not None and not any(
                    (m := RANK_FILE.match(n)) and int(m.group(1)) == rank and n.endswith("optim_states.pt")
                    for n in names):
                raise DamagedCheckpoint(f"checkpoint {folder} is damaged: it has no optimizer states of rank {rank} "
                                        f"(zero_pp_rank_{rank}_mp_rank_00_optim_states.pt)")
        verify_files(os.path.join(folder, UNIVERSAL) if self.universal else folder, self._rank())

    def load(self, folder: str) -> None:
        root, tag = (folder, UNIVERSAL) if self.universal else os.path.split(os.path.normpath(folder))
        saved_flag = self.engine._config.load_universal_checkpoint  # read by load_checkpoint only
        self.engine._config.load_universal_checkpoint = self.universal
        try:
            loaded, state = self.engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                        load_lr_scheduler_states=False,
                                                        load_module_strict=not self.exclude_frozen)
        finally:
            self.engine._config.load_universal_checkpoint = saved_flag
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {os.path.join(root, tag)}")
        self.state = state
