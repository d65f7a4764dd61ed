"""What run_all.py reads out of each benchmark's JSON: the figures for RESULTS.md and, for each
target of issue 8, whether it was met, with a sentence where it was not."""
from __future__ import annotations

import dataclasses

@dataclasses.dataclass
class Figure:
    name: str
    median: float
    lo: float | None = None
    hi: float | None = None
    unit: str = ""
    n: int | None = None  # repeats behind the median

    @property
    def spread(self) -> float | None:
        if self.lo is None or self.hi is None or not self.median:
            return None
        return (self.hi - self.lo) / abs(self.median)


@dataclasses.dataclass
class Target:
    item: str
    figure: str
    measured: str
    target: str
    status: str  # met | MISSED | reported (no numeric target) | not run
    why: str = ""


def _fig(name: str, s: dict, unit: str = "", n: int | None = None) -> Figure:
    """A figure from a {median, min, max[, values | per_repeat]} dict of a benchmark's JSON."""
    values = s.get("values") or s.get("per_repeat")
    return Figure(name, s["median"], s.get("min", s["median"]), s.get("max", s["median"]), unit,
                  len(values) if values else n)


def summarize_cache(d: dict, label: str) -> tuple[list[Figure], list[Target]]:
    r, v = d["ratio"], d["variants"]
    ratio = Figure("on the fly / cached, step time", r["measured"], min(r["per_repeat"]), max(r["per_repeat"]), "x",
                   len(r["per_repeat"]))
    figs = [_fig("cached step", v["cached"]["ms_per_step"], "ms"), _fig("on-the-fly step", v["on_the_fly"]["ms_per_step"], "ms"),
            ratio, Figure("on the fly / cached, CPU time", r["cpu_time"], unit="x"),
            Figure("FLOP-predicted ratio (VAE + text + UNet) / UNet", r["flop_predicted"], unit="x")]
    f = d["flops_per_image"]
    why = ""
    if abs(r["measured"] / r["flop_predicted"] - 1) > 0.1:
        if r["measured"] < r["flop_predicted"]:
            why = (f"Measured below the FLOP prediction: per FLOP the no-grad encoder forwards "
                   f"({(f['vae_encode'] + f['text_encode']) / 1e9:.3f} GFLOP/image) ran faster than the UNet's training "
                   f"step ({f['unet_train'] / 1e9:.3f} GFLOP/image), whose optimizer and elementwise work the FLOP count "
                   "leaves out.")
        else:
            why = ("Measured above the FLOP prediction: the encoders ran at a lower FLOP rate than the UNet step "
                   "(small convolutions at full image resolution, no-grad overheads).")
    t = Target(f"1. cache speedup ({label})", "step time on the fly / cached", f"{r['measured']:.2f}x "
               f"(FLOP-predicted {r['flop_predicted']:.2f}x)", "none set; FLOP prediction beside",
               "reported", why)
    return figs, [t]


def summarize_loader(d: dict) -> tuple[list[Figure], list[Target]]:
    figs = []
    for row in d["loader"]:
        s = row["samples_per_s"]
        figs.append(Figure(f"loader, {row['pipeline']} shards, {row['workers']} worker(s)", s["median"], s["min"], s["max"],
                           "samples/s", d["settings"]["repeats"]))
    step, h = d.get("train_step"), d.get("headroom")
    if not step or not h:
        return figs, [Target("2. loader headroom", "", "", ">= 10", "not run", "run without --headroom")]
    figs.append(_fig(f"training step consumes (UNet {step['preset']}, batch {step['batch']}, {step['threads']} threads)",
                     step, "samples/s"))
    figs.append(Figure("loader headroom (loader on 1 worker / step)", h["median"], h["min"], h["max"], "x",
                       d["settings"]["repeats"]))
    met = h["median"] >= h["target"]
    why = "" if met else (
        f"One worker delivers {h['median']:.1f}x what the step consumes: each rank needs more than a tenth of a worker, "
        "so slower storage or a faster step would leave the step waiting; more data.num_workers restore the margin.")
    return figs, [Target("2. loader headroom", "latent samples/s on 1 worker / samples/s the step consumes",
                         f"{h['median']:.1f}x (range {h['min']:.1f}-{h['max']:.1f})", f">= {h['target']:g}",
                         "met" if met else "MISSED", why)]


def summarize_precompute(d: dict) -> tuple[list[Figure], list[Target]]:
    figs = [_fig(row["label"].strip(), row["images_per_s"], "images/s", d["settings"]["repeats"]) for row in d["rows"]]
    for key, label in (("ratio_job_over_bare", "job / bare vae.encode (b)"),
                       ("ratio_job_over_bare_with_text", "job / bare vae.encode + text encoder (b')")):
        figs.append(_fig(label, d[key], "x"))
    r = d["ratio_job_over_bare"]
    met = r["median"] >= d["target"]
    why = ""
    if not met:
        parts = sorted(d.get("breakdown", []), key=lambda p: -p["share"])
        bare = next((row for row in d["rows"] if row["label"].startswith("(b) ")), None)
        vae = next((p for p in parts if p["part"].startswith("VAE encode")), None)
        why = f"The job reached {r['median']:.2f} of the bare loop"
        if parts:
            why += "; its encode phase went to " + ", ".join(f"{p['part'].split(':')[0].split(' (')[0]} "
                                                             f"{p['share'] * 100:.0f}%" for p in parts[:3])
        if vae and bare:
            bare_s = d["settings"]["num"] / bare["images_per_s"]["median"]
            why += (f"; the VAE calls alone took {vae['seconds']:.2f}s inside the job against {bare_s:.2f}s for the same "
                    "images in the bare loop")
        why += (f". Against the loop that also runs the text encoder, as the job must, the ratio is "
                f"{d['ratio_job_over_bare_with_text']['median']:.2f}.")
        if d.get("ceiling_on_cpu") is not None:
            why += (f" On this CPU the target is out of reach: the VAE already keeps every core busy, so the "
                    f"decoding in the loader worker ({d['worker_cpu_s']:.2f}s of CPU) and the text encoder, work "
                    f"the bare loop does not do, cap the median ratio at about {d['ceiling_on_cpu']:.2f}. On a GPU node the "
                    "encoders run on the GPU while the CPU cores decode.")
        if d.get("noisy"):
            why += " The run was noisy (other processes on the cores)."
    return figs, [Target("3. precompute efficiency", "cache_latents images/s / bare encode loop images/s",
                         f"{r['median']:.2f} (per repeat {', '.join(f'{v:.2f}' for v in r['per_repeat'])})",
                         f">= {d['target']:g}", "met" if met else "MISSED", why)]


def _sci(n: float) -> str:
    """5000000 -> 5e6."""
    return f"{n:.0e}".replace("e+0", "e").replace("e+", "e")


def summarize_distributed(d: dict) -> tuple[list[Figure], list[Target]]:
    figs, targets = [], []
    step = d.get("step")
    if step:
        n = step["ranks"]
        figs += [_fig("1-rank step (demo UNet, ZeRO-2)", step["one_rank_ms"], "ms"),
                 _fig(f"{n}-rank step, same per-rank batch", step["n_rank_ms"], "ms"),
                 _fig(f"{n}-rank / 1-rank step time", step["ratio"], "x"),
                 _fig(f"{n}-rank / 1-rank CPU time per step", step["cpu_ratio"], "x")]
        r = step["ratio"]
        why = (f"Each of the {n} ranks does {step['cpu_ratio']['median']:.2f}x the CPU work of the single rank "
               "(gradient reduce-scatter and parameter all-gather over gloo, ZeRO's bookkeeping)"
               + (f"; other processes used up to {step['other_cores_max']:.1f} of the cores during a launch, so the "
                  "wall-clock ratio is noisy and the CPU-time ratio is the steadier figure."
                  if (step.get("other_cores_max") or 0) > 0.5 else "."))
        targets.append(Target("4. distributed overhead", f"{n}-rank ZeRO-2 / 1-rank step time, same per-rank batch",
                              f"{r['median']:.2f}x (per round {', '.join(f'{v:.2f}' for v in r['values'])})",
                              "none set; ideal 1.00", "reported", why))
    mem = [row for row in d.get("memory") or [] if "error" not in row]  # failed launches are in d["errors"]
    if mem:
        n, params = d["settings"]["ranks"], mem[0]["params"]

        def label(row: dict) -> str:
            return f"ZeRO-{row['stage']}" + (f" (reduce bucket {_sci(row['reduce_bucket'])})" if row.get("reduce_bucket") else "")
        for row in mem:
            figs.append(Figure(f"{label(row)} model states held per rank (predicted {row['predicted_model_states']:.2f})",
                               row["model_states_per_param"], unit="B/param"))
            figs.append(Figure(f"{label(row)} optimizer state (fp32 master + Adam) per rank (predicted "
                               f"{row['predicted_optimizer_state']:.2f})", row["optimizer_state_per_param"], unit="B/param"))
            for key, what in (("rss_at_count_per_param", "RSS growth at the count"),
                              ("peak_rss_steps_per_param", "peak RSS growth over the steps")):
                if row.get(key) is not None:
                    figs.append(Figure(f"{label(row)} {what}", row[key], unit="B/param"))
        plain = [row for row in mem if not row.get("reduce_bucket")]
        off = [row for row in plain if abs(row["optimizer_state_per_param"] - row["predicted_optimizer_state"])
               > 0.05 * max(row["predicted_optimizer_state"], 1.0)]
        notes = []
        for row in plain:
            h, p = row["held_per_param"], row["predicted_per_param"]
            if abs(h["gradients"] - p["gradients"]) > 0.5:
                notes.append(f"ZeRO-{row['stage']} holds {h['gradients']:.1f} B/param of gradients after the backward "
                             f"where the model predicts {p['gradients']:.1f} (DeepSpeed reduces the full gradients into "
                             "this rank's partition at the end of the backward and frees them)")
        if all(row.get("rss_at_count_per_param") is not None for row in mem):
            notes.append("RSS growth at the count, against the walked model states (B/param): " + ", ".join(
                f"{label(row)} {row['rss_at_count_per_param']:.1f} vs {row['model_states_per_param']:.1f}" for row in mem))
            three = next((row for row in plain if row["stage"] == 3), None)
            small = next((row for row in mem if row.get("reduce_bucket")), None)
            if three is not None:
                extra = three["rss_at_count_per_param"] - three["model_states_per_param"]
                text = (f"ZeRO-3 keeps {extra:.1f} B/param beyond its model states with DeepSpeed's default reduce bucket "
                        f"(reduce_bucket_size 5e8 elements, {three['held_per_param']['buffers'] * params / 1e9:.1f} GB "
                        "allocated per rank, which every gradient passes through)")
                if small is not None:
                    text += (f", {small['rss_at_count_per_param'] - small['model_states_per_param']:.1f} with a "
                             f"{_sci(small['reduce_bucket'])}-element bucket")
                notes.append(text)
        if all(row.get("peak_rss_steps_per_param") is not None for row in plain):
            notes.append("peak RSS growth over the steps (B/param): " + ", ".join(
                f"ZeRO-{row['stage']} {row['peak_rss_steps_per_param']:.1f}" for row in plain)
                + ": transients (full gradients before their reduction, the optimizer step's temporaries, ZeRO-3's "
                "gathered layers) come on top of the model states, so peaks fall less than the model states do")
        why = "; ".join(notes)
        why = (why[0].upper() + why[1:] + ".") if why else ""
        if off:
            why = ("Optimizer state differs from the prediction at " + ", ".join(f"ZeRO-{r['stage']}" for r in off)
                   + ". " + why)
        shares = ", ".join(f"ZeRO-{row['stage']} {row['optimizer_state_per_param']:.1f}" for row in plain)
        predicted = ", ".join(f"{row['predicted_optimizer_state']:.1f}" for row in plain)
        targets.append(Target("4. ZeRO memory per rank", f"optimizer state per rank, {n} ranks, B/param (master + Adam)",
                              f"{shares} (predicted {predicted})", "falls as the ZeRO paper's model predicts",
                              "MISSED" if off else "met", why))
    return figs, targets


def summarize_pixel(d: dict) -> tuple[list[Figure], list[Target]]:
    s = d["steps"]
    res = d["settings"]["resolution"]
    figs = [_fig(f"pixel step, 3x{res}x{res}, batch {s['pixel']['batch']}", s["pixel"]["ms_per_image"], "ms/image"),
            _fig(f"latent step, 4x{res // 8}x{res // 8}, batch {s['latent']['batch']}", s["latent"]["ms_per_image"],
                 "ms/image"),
            _fig(f"pixel / latent step time per image at {res}px", d["ratio_time"], "x"),
            _fig(f"pixel / latent CPU time per image at {res}px", d["ratio_cpu_time"], "x")]
    for f in d["flops"]:
        figs.append(Figure(f"FLOP ratio pixel / latent, {f['preset']} at {f['resolution']}px "
                           f"({f['pixel_flops'] / 1e9:.4g} / {f['latent_flops'] / 1e9:.4g} GFLOP)", f["ratio"], unit="x"))
    figs.append(Figure("numbers per image, pixel / latent (the claim)", d["numbers_ratio"], unit="x"))
    big = [f for f in d["flops"] if f["resolution"] == 512] or d["flops"]
    low = min([d["ratio_time"]["median"]] + [f["ratio"] for f in d["flops"]])
    met = low >= d["numbers_ratio"]
    why = "" if met else (f"The smallest cost ratio measured is {low:.1f}x, below the {d['numbers_ratio']:.0f}x fewer "
                          "numbers: at that size the pixel-space network costs less than its input size suggests.")
    return figs, [Target("5. pixel vs latent", "cost per image, pixel / latent (f=8), same UNet",
                         f"step time {d['ratio_time']['median']:.0f}x at {res}px; FLOPs "
                         + ", ".join(f"{f['ratio']:.0f}x ({f['preset']} {f['resolution']}px)" for f in big),
                         f">= {d['numbers_ratio']:.0f}x (the 48x claim)", "met" if met else "MISSED", why)]


def summarize_gpu(d: dict) -> tuple[list[Figure], list[Target]]:
    figs = []
    for row in d["rows"]:
        if "error" in row:
            continue
        label = f"{row['name']} (batch {row['batch']})"
        figs.append(Figure(f"{label}: images/s", row["images_per_s"], unit="images/s"))
        figs.append(Figure(f"{label}: step (spread {row['step_ms_spread']:.0%})", row["step_ms"], unit="ms"))
        if row.get("mfu") is not None:
            figs.append(Figure(f"{label}: MFU", row["mfu"] * 100, unit="%"))
    targets = [Target(f"6. GPU: {key}", f"on {d['device']}", f"{t['measured']:.3g}", f"{t['goal']}",
                      "met" if t["met"] else "MISSED",
                      "" if t["met"] else "see the row's figures and the sd15_512 profile in gpu.json")
               for key, t in d.get("targets", {}).items()]
    return figs, targets or [Target("6. GPU", "", "no target measured", "issue #26 targets", "reported")]


def summarize_step_overhead(d: dict) -> tuple[list[Figure], list[Target]]:
    figs, targets, t = [], [], d["targets"]
    for row in d["rows"]:
        z = f"ZeRO-{row['stage']}"
        figs += [Figure(f"{z}: operators per step, framework / reference", row["ops_ratio"], unit="x"),
                 Figure(f"{z}: step time, framework / reference", row["time_ratio"], unit="x"),
                 Figure(f"{z}: host reads per framework step", row["syncs"])]
        why = "" if row["met"] else (
            "DeepSpeed's ZeRO-1/2 optimizer still copies, views and takes a norm of each gradient tensor "
            "(its reduction hooks and partition bookkeeping) and reads the norm on the host; see docs/benchmarks.md, "
            "\"The step's own cost\"." if row["stage"] else "see the step's top operators in the log")
        targets.append(Target(f"7. step overhead ({z})", "framework step / plain PyTorch step, one rank",
                              f"ops {row['ops_ratio']:.2f}x, time {row['time_ratio']:.2f}x, {row['syncs']} host reads",
                              f"ops <= {t['ops']}x, time <= {t['time']}x, <= {t['syncs']} reads",
                              "met" if row["met"] else "MISSED", why))
    return figs, targets


SUMMARIZERS = {"cache_tiny": lambda d: summarize_cache(d, "tiny"), "cache_demo": lambda d: summarize_cache(d, "demo"),
               "loader": summarize_loader, "precompute": summarize_precompute, "distributed": summarize_distributed,
               "pixel_vs_latent": summarize_pixel, "gpu": summarize_gpu, "step_overhead": summarize_step_overhead}
ITEM_OF = {"cache_tiny": "1. cache speedup (tiny)", "cache_demo": "1. cache speedup (demo)", "loader": "2. loader headroom",
           "precompute": "3. precompute efficiency", "distributed": "4. distributed overhead / ZeRO memory",
           "pixel_vs_latent": "5. pixel vs latent", "gpu": "6. GPU MFU",
           "step_overhead": "7. step overhead"}


# --- the report -------------------------------------------------------------------------------------
