"""Run logs: one JSON line per logged step, mirrored to wandb, and a loss-curve PNG; and the tally
that keeps each step's loss and skip on the device between logged steps."""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import time

import torch

WANDB_ID_FILE = "wandb_id"  # in the run directory: the run's wandb id, made once, reused on resume
_WANDB_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # a safe subset of what wandb accepts in a run id


class StepTally:
    """Each optimizer step's loss and whether it was applied, summed on the device: reading a GPU value
    on the host waits for every kernel queued before it, so the loop reads this once per logging
    interval instead of once per step (issue #26). Every rank reads the same figures: `applied` is the
    same on every rank (gradients are averaged before the norm that decides it), the loss is averaged.
    """

    def __init__(self, device: torch.device):
        zero = lambda dtype: torch.zeros((), dtype=dtype, device=device)  # noqa: E731
        self.loss_sum, self.losses = zero(torch.float64), zero(torch.int64)  # applied steps with a finite loss
        self.skipped, self.streak = zero(torch.int64), zero(torch.int64)  # skipped steps, and in a row up to now
        self.bad = zero(torch.int64)  # steps with a non-finite loss whose update was applied (never expected)

    def add(self, loss: torch.Tensor, applied: torch.Tensor) -> None:
        applied = applied.to(self.skipped.device)
        finite = torch.isfinite(loss)
        counted = finite & applied
        self.loss_sum += torch.where(counted, loss.double(), 0.0)
        self.losses += counted
        self.skipped += ~applied
        self.streak = (self.streak + 1) * ~applied
        self.bad += ~finite & applied

    def read_counts(self) -> tuple[int, int, bool]:
        """(steps skipped since the last read, skipped in a row up to now, a non-finite loss was applied
        on some rank); one host read, collective: every rank calls it at the same steps."""
        from trainer.core import dist

        bad = dist.all_reduce_sum_(self.bad.clone())
        counts = torch.stack([self.skipped, self.streak, bad]).tolist()
        self.skipped.zero_()
        return counts[0], counts[1], bool(counts[2])

    def read_loss(self) -> float:
        """Mean loss over the applied steps since the last read, over every rank (NaN: none); collective."""
        from trainer.core import dist

        sums = dist.all_reduce_sum_(torch.stack([self.loss_sum, self.losses.double()]))
        self.loss_sum.zero_()
        self.losses.zero_()
        total, n = sums.tolist()
        return total / n if n else float("nan")


def wandb_run_id(run_dir: str) -> str:
    """The wandb id of this run directory: made at random on first use, kept in
    run_dir/wandb_id, and read back on every resume.

    The directory's name alone is not unique (runs/a/unet and runs/b/unet would merge into
    one wandb run under resume="allow"). A copied or moved run directory keeps its id, as
    its history is the same run's. A run directory from before this file existed, whose
    wandb/ folder already holds the name-derived id, keeps that id so its history continues.
    """
    path = os.path.join(run_dir, WANDB_ID_FILE)
    if os.path.exists(path):
        with open(path, "rb") as f:
            raw = f.read(256)
        run_id = raw.decode("ascii", errors="replace").strip()
        if not _WANDB_ID.fullmatch(run_id):
            raise ValueError(f"{path} does not hold a wandb run id (1-64 of A-Z a-z 0-9 _ . -): {raw[:40]!r}; "
                             "delete the file to start a new wandb run for this directory")
        return run_id
    legacy = os.path.basename(os.path.abspath(run_dir))
    wandb_dir = os.path.join(run_dir, "wandb")
    if (_WANDB_ID.fullmatch(legacy) and os.path.isdir(wandb_dir)
            and any(e.endswith("-" + legacy) for e in os.listdir(wandb_dir))):
        run_id = legacy
    else:
        run_id = secrets.token_hex(8)  # 64 random bits: no two run directories share one
    os.makedirs(run_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(run_id + "\n")
    os.replace(tmp, path)  # atomic: a killed job leaves the old file or the whole new one
    return run_id


class RunLog:
    """Appends `{"step": ..., ...}` lines to `run_dir/log.jsonl` on the main rank.

    On resume the lines after the resumed step are dropped first, so a run that was killed
    and restarted has one clean history. wandb is optional: `mode` is `disabled`, `offline`
    (files under run_dir/wandb, sync later) or `online`.

    `run_dir/loss.png` (the `plot_keys` losses, the learning rate and the gradient norm) is
    redrawn from the history held in memory while the run goes, every `plot_every_s` seconds so
    that it costs nothing noticeable (the first time `plot_every_s` after the start: a drawing
    takes about a second, most of it importing matplotlib), and once more at close().
    """

    def __init__(self, run_dir: str, is_main: bool, resume_step: int = 0, resume_samples: int | None = None,
                 wandb_mode: str = "disabled",
                 wandb_project: str = "ldm", config: dict | None = None, plot_keys: tuple[str, ...] = ("loss",),
                 plot_title: str = "", plot_every_s: float = 30.0, tracker: str = "wandb"):
        self.is_main, self.path, self.wandb = is_main, os.path.join(run_dir, "log.jsonl"), None
        self.tensorboard = None
        self.png, self.plot_keys, self.plot_title = os.path.join(run_dir, "loss.png"), plot_keys, plot_title
        self.plot_every_s, self.plotted_at, self.plots = plot_every_s, time.monotonic(), 0
        self.history: list[dict] = []
        if not is_main:
            return
        os.makedirs(run_dir, exist_ok=True)
        if os.path.exists(self.path):
            # By samples where the trainer gives them: after an elastic resume onto more ranks the
            # step numbers of the earlier rows are larger than the resumed step (#13).
            self.history = [r for r in _parse_log(self.path) if (r.get("samples", 0) <= resume_samples
                            if resume_samples is not None and "samples" in r else r.get("step", 0) <= resume_step)]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.history)
        if tracker == "tensorboard":  # run_dir/tensorboard: `tensorboard --logdir RUN/tensorboard`
            self.tensorboard = _summary_writer(os.path.join(run_dir, "tensorboard"), resume_step)
        # wandb's own WANDB_MODE variable wins over the config, as wandb users expect.
        wandb_mode = os.environ.get("WANDB_MODE", wandb_mode) if tracker == "wandb" else "disabled"
        if wandb_mode != "disabled":
            run_id = wandb_run_id(run_dir)
            import wandb  # imported only when used: it starts a service process

            self.wandb = wandb.init(project=wandb_project, dir=run_dir, mode=wandb_mode, config=config,
                                    id=run_id, resume="allow")

    def log(self, step: int, **values) -> None:
        if not self.is_main:
            return
        row = {"step": step, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.history.append(row)
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if self.tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, global_step=step)
        if time.monotonic() - self.plotted_at >= self.plot_every_s:
            self.plot()

    def plot(self) -> None:
        """Redraw loss.png now. A failure is reported and training goes on: the curve is a
        view of log.jsonl, which holds everything."""
        if not self.is_main:
            return
        try:
            render_curves(self.history, self.png, self.plot_keys, self.plot_title)
            self.plots += 1
        except Exception as e:  # noqa: BLE001 - a full disk or a matplotlib error must not end a run
            print(f"warning: {self.png} not updated: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        self.plotted_at = time.monotonic()

    def log_image(self, step: int, key: str, png_path: str) -> None:
        """Record an image file: its path in the JSONL, the picture itself in wandb."""
        if not self.is_main:
            return
        row = {"step": step, key: png_path}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.history.append(row)
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(png_path)}, step=step)
        if self.tensorboard is not None:
            import numpy as np
            from PIL import Image

            with Image.open(png_path) as img:
                self.tensorboard.add_image(key, np.asarray(img.convert("RGB")), global_step=step, dataformats="HWC")

    def close(self) -> None:
        if self.is_main and self.history:
            self.plot()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _summary_writer(folder: str, resume_step: int):
    """TensorBoard's SummaryWriter (torch.utils.tensorboard; needs the tensorboard package), continuing at
    `resume_step`: TensorBoard drops the events of the steps a resume trains again (purge_step)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from trainer.core.errors import ConfigError

        raise ConfigError("tracker=tensorboard needs the tensorboard package (pip install tensorboard; the "
                          "project's setup.py installs it)") from None
    return SummaryWriter(folder, purge_step=resume_step or None)


def _parse_log(path: str) -> list[dict]:
    """The rows of a log.jsonl. A line that is not a JSON object (a write torn by a kill)
    is skipped with a warning: it held no complete record."""
    rows, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    if bad:
        print(f"warning: {path}: skipped {bad} line(s) that are not JSON objects (a torn write?)")
    return rows


def read_log(path: str) -> list[dict]:
    return _parse_log(path)


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(samples seen, value) of the rows that hold a finite number under `key`."""
    pts = [(r.get("samples", r.get("step", 0)), r[key]) for r in rows
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


def _moving_average(y: list[float], k: int) -> list[float]:
    """Mean of the last k values at each point (fewer at the start), in linear time."""
    out, total = [], 0.0
    for i, v in enumerate(y):
        total += v - (y[i - k] if i >= k else 0.0)
        out.append(total / min(i + 1, k))
    return out


def render_curves(rows: list[dict], png_path: str, keys: tuple[str, ...] = ("loss",), title: str = "") -> list[str]:
    """Losses (raw, faint, and smoothed), learning rate and gradient norm against samples
    seen, one panel each where logged. Returns the panels drawn.

    Uses matplotlib's object API with the Agg canvas (no pyplot state, no display), and
    writes to a temporary file first, so a reader never sees half a PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("loss", keys, "log")] + [(k, (k,), s) for k, s in (("lr", "linear"), ("grad_norm", "log"))
                                        if _series(rows, k)[0]]
    fig = Figure(figsize=(7, 2.2 + 1.6 * len(panels)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    drawn = []
    for ax, (name, series_keys, yscale) in zip(axes, panels):
        for key in series_keys:
            x, y = _series(rows, key)
            if not x:
                continue
            if name == "loss":
                ax.plot(x, y, alpha=0.3)
                ax.plot(x, _moving_average(y, max(1, len(y) // 20)), label=key)  # over about 5% of the run
            else:
                ax.plot(x, y, label=key)
            if name not in drawn:
                drawn.append(name)
        ax.set_ylabel({"loss": "loss", "lr": "learning rate", "grad_norm": "gradient norm"}[name])
        if name in drawn and (yscale == "linear" or all(v > 0 for k in series_keys for v in _series(rows, k)[1])):
            ax.set_yscale(yscale)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    axes[-1].set_xlabel("samples seen")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    tmp = f"{png_path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, png_path)
    return drawn


def plot_loss(log_path: str, png_path: str, keys: tuple[str, ...] = ("loss",), title: str = "") -> str:
    """Plot a log.jsonl's losses, learning rate and gradient norm against samples seen."""
    render_curves(read_log(log_path), png_path, keys, title)
    return png_path


class SampleLog:
    """`run_dir/data_log/rank-R.jsonl`: per optimizer step, the samples each rank trained on, as
    `{"samples": samples seen before the step, "keys": ["SHARD_URL:KEY", ...], "epochs": [...], "weights": [...]}`
    (weight 0: fill or a stand-in, not trained on). What a user checks data order, repeats and exactly-once
    with (data.log_samples). On resume every rank's file loses the lines from the resumed sample count
    on (those steps run again), also the files of ranks an elastic resume no longer has; rank 0 does
    that before any rank appends (`dist.barrier()` between)."""

    def __init__(self, run_dir: str, rank: int, resume_samples: int, is_main: bool):
        folder = os.path.join(run_dir, "data_log")
        self.path = os.path.join(folder, f"rank-{rank}.jsonl")
        if is_main:
            os.makedirs(folder, exist_ok=True)
            for name in sorted(n for n in os.listdir(folder) if n.startswith("rank-") and n.endswith(".jsonl")):
                path = os.path.join(folder, name)
                keep = [line for line in open(path) if _samples_of(line) < resume_samples]
                with open(path + ".tmp", "w") as f:
                    f.writelines(keep)
                os.replace(path + ".tmp", path)

    def write(self, samples: int, keys: list[str], epochs: list[int], weights: list[float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"samples": samples, "keys": keys, "epochs": epochs, "weights": weights}) + "\n")


def _samples_of(line: str) -> float:
    try:
        return json.loads(line)["samples"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a line cut by a kill: dropped

