"""Run logs: one JSON line per logged step, mirrored to wandb, and a loss-curve PNG."""
from __future__ import annotations

import json
import os


class RunLog:
    """Appends `{"step": ..., ...}` lines to `run_dir/log.jsonl` on the main rank.

    On resume the lines after the resumed step are dropped first, so a run that was killed
    and restarted has one clean history. wandb is optional: `mode` is `disabled`, `offline`
    (files under run_dir/wandb, sync later) or `online`.
    """

    def __init__(self, run_dir: str, is_main: bool, resume_step: int = 0, wandb_mode: str = "disabled",
                 wandb_project: str = "ldm", config: dict | None = None):
        self.is_main, self.path, self.wandb = is_main, os.path.join(run_dir, "log.jsonl"), None
        if not is_main:
            return
        lines = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(lines)
        # wandb's own WANDB_MODE variable wins over the config, as wandb users expect.
        wandb_mode = os.environ.get("WANDB_MODE", wandb_mode)
        if wandb_mode != "disabled":
            import wandb  # imported only when used: it starts a service process

            self.wandb = wandb.init(project=wandb_project, dir=run_dir, mode=wandb_mode, config=config,
                                    id=os.path.basename(os.path.abspath(run_dir)), resume="allow")

    def log(self, step: int, **values) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def log_image(self, step: int, key: str, png_path: str) -> None:
        """Record an image file: its path in the JSONL, the picture itself in wandb."""
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, key: png_path}) + "\n")
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(png_path)}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def read_log(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def plot_loss(log_path: str, png_path: str, keys: tuple[str, ...] = ("loss",), title: str = "") -> str:
    """Plot the logged losses against samples seen (raw, faint, and smoothed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        pts = [(r.get("samples", r["step"]), r[key]) for r in rows if key in r]
        if not pts:
            continue
        x, y = zip(*pts)
        ax.plot(x, y, alpha=0.3)
        k = max(1, len(y) // 20)  # moving average over about 5% of the run
        smooth = [sum(y[max(0, i - k + 1): i + 1]) / len(y[max(0, i - k + 1): i + 1]) for i in range(len(y))]
        ax.plot(x, smooth, label=key)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
