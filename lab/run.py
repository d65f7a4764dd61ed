"""The autoencoder lab: three first stages and raw pixels, compared on reconstruction and on
the diffusion model that each one's latent space gets.

    python launch/compare_autoencoders.py --config configs/lab/lab_cpu.yaml

`run_lab` trains (or loads) a textbook VAE (`kl_plain`), Stable Diffusion's KL-VAE with LPIPS +
PatchGAN (`kl_gan`) and a VQ-GAN (`vq_gan`), measures their reconstructions on held-out images,
caches the training set's latents with each and with the identity first stage (pixels, the
latent-diffusion paper's LDM-1), trains the same UNet in all four spaces, samples a fixed prompt
set from each and scores the samples — with a caption classifier on synthetic data; with sample
FID and CLIP score wherever their weights are available locally — then writes `report.md`.

Every stage is a function whose result (paths, numbers, seconds taken) is written to
`run_dir/stages/NAME.json` when it finishes; rerunning the same command reads those files
instead of redoing the stages, and a stage that was interrupted resumes from its own job's
checkpoints (the training jobs) or finished shards (the caches).
"""
from __future__ import annotations

import functools
import json
import math
import os
import statistics
import time

import torch

from data_pipeline import shards, synthetic
from data_pipeline.images import to_tensor
from models.autoencoder import IDENTITY
from models.caption_classifier import load_classifier
from models.unet import build_unet

from lab.ae_eval import ImageBatches, run_evaluation
from lab.caption_classifier import SyntheticSet, caption_accuracy, train_classifier
from lab.config import (
    FIRST_STAGES,
    PIXELS,
    SPACES,
    LabJob,
    autoencoder_job,
    cache_job,
    heldout_urls,
    stage_dir,
    train_urls,
    unet_job,
)
from lab.report import write_lab_report
from lab.sample_quality import SampleQuality, check_clip_spec
from trainer.autoencoder.train import train_autoencoder
from trainer.cache.job import cache_latents
from trainer.cache.manifest import Manifest
from trainer.core import config as config_lib
from trainer.core import dist
from trainer.core.errors import TrainingError
from trainer.core.flops import unet_train_flops_per_sample
from trainer.core.metrics import read_log
from trainer.unet.sampling import load_run, sample_rows, save_grid
from trainer.unet.train import train_unet

EXPORT_WEIGHTS = "diffusion_pytorch_model.safetensors"  # written last by save_pretrained
SCORED_HEADS = ("shape", "color", "position")  # what the prompts must get right, jointly


class Stages:
    """Runs a stage once: its result is kept in run_dir/stages/NAME.json (written atomically,
    last), and a later run returns that instead of running the stage again."""

    def __init__(self, run_dir: str):
        self.dir = os.path.join(run_dir, "stages")
        os.makedirs(self.dir, exist_ok=True)

    def run(self, name: str, fn) -> dict:
        path = os.path.join(self.dir, f"{name}.json")
        if os.path.exists(path):
            print(f"[lab] {name}: done before, skipped", flush=True)
            with open(path) as f:
                return json.load(f)
        print(f"[lab] {name} ...", flush=True)
        t0 = time.perf_counter()
        result = fn()
        result["seconds"] = time.perf_counter() - t0
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"[lab] {name}: done in {result['seconds']:.1f}s", flush=True)
        return result


# ---------------------------------------------------------------- stages

def draw_synthetic(cfg: LabJob, out: str, num: int, seed: int) -> dict:
    """Textured synthetic shapes as shards (the make_synthetic.py code path)."""
    d = cfg.data
    samples = (synthetic.sample(seed, i, d.resolution, d.textures, d.background_textures) for i in range(num))
    urls = shards.write_shards(samples, out, d.per_shard, prefix="shapes")
    return {"urls": out, "images": num, "shards": len(urls), "seed": seed}


def first_stage(cfg: LabJob, name: str) -> dict:
    """A given model, or the export of a finished training, or a training (resumed if begun)."""
    given = getattr(cfg.models, name)
    if given:
        return {"vae": given, "trained": False}
    job = autoencoder_job(cfg, name, train_urls(cfg))
    export = os.path.join(job.run_dir, "export")
    if not os.path.exists(os.path.join(export, EXPORT_WEIGHTS)):
        if train_autoencoder(job) != export:  # stop_after_samples in the overrides ended it early
            raise TrainingError(f"autoencoder {name} stopped before the end (stop_after_samples); "
                                "rerun the same command to continue")
    with open(os.path.join(export, "config.json")) as f:
        scaling = json.load(f)["scaling_factor"]
    return {"vae": export, "trained": True, "run": job.run_dir, "scaling_factor": scaling}


def reconstruction(cfg: LabJob, vaes: dict[str, str]) -> dict:
    """ae_eval on the held-out shards: metrics per first stage and the reconstruction grid."""
    e, said = cfg.eval, []
    out = stage_dir(cfg, "eval")
    results = run_evaluation([f"{n}={vaes[n]}" for n in FIRST_STAGES], heldout_urls(cfg), out,
                             resolution=cfg.data.resolution, limit=e.images, batch_size=e.batch_size,
                             lpips_weights=cfg.autoencoder.lpips_weights, lpips_net=cfg.autoencoder.lpips_net,
                             inception_weights=e.inception_weights or None, hf_cutoff=e.hf_cutoff,
                             grid_images=e.grid_images, endpoint_url=cfg.data.endpoint_url, say=said.append)
    missing = {m.split(":")[0].lower(): m for m in said if m.startswith(("LPIPS: n/a", "rFID: n/a"))}
    return {"models": results, "grid": os.path.join(out, "recon_grid.png"), "missing": missing,
            "notes": [m[2:] for m in said if m.startswith("- ")]}


def cache_space(cfg: LabJob, space: str, vae: str) -> dict:
    job = cache_job(cfg, vae, space)
    cache_latents(job)
    manifest = Manifest.read(job.out_url, job.out_endpoint_url)
    return {"cache": job.out_url, "vae": vae, "latent_shape": list(manifest.latent_shape),
            "text_emb_shape": list(manifest.text_emb_shape), "scaling_factor": manifest.vae.scaling_factor,
            "samples": manifest.num_samples}


def train_space(cfg: LabJob, space: str, cache: dict) -> dict:
    """The UNet of one space, with its model FLOPs per image (as the trainer counts them) and
    the images/s and loss it logged."""
    job = unet_job(cfg, space, cache["cache"])
    checkpoint = train_unet(job)
    shape, text = tuple(cache["latent_shape"]), tuple(cache["text_emb_shape"])
    with torch.device("meta"):  # shapes only: instant at any size
        flops = unet_train_flops_per_sample(build_unet(job.model, shape[0], shape[1], text[1]), shape, text)
    rows = read_log(os.path.join(job.run_dir, "log.jsonl"))
    losses = [r["loss"] for r in rows if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])]
    rates = [r["images_per_s"] for r in rows if r.get("images_per_s")]
    return {"run": job.run_dir, "checkpoint": checkpoint, "latent_shape": list(shape), "train_flops_per_image": flops,
            "images_per_s": statistics.median(rates) if rates else None,  # the median interval: start-up excluded
            "final_loss": losses[-1] if losses else None}


def heldout_pairs(cfg: LabJob, num: int) -> tuple[torch.Tensor, list[str]]:
    """The first `num` synthetic held-out images ([-1, 1]) and their captions."""
    d, images, captions = cfg.data, [], []
    for i in range(num):
        attrs = synthetic.attributes(d.seed + 1, i, d.textures, d.background_textures)
        images.append(to_tensor(synthetic.draw(attrs, d.resolution)))
        captions.append(synthetic.caption(attrs))
    return torch.stack(images), captions


def classifier_stage(cfg: LabJob) -> dict:
    """The caption classifier, trained on the training set's generator, and its own accuracy on
    held-out real images: the ceiling for the samples' scores."""
    c, d = cfg.classifier, cfg.data
    out = stage_dir(cfg, "classifier")
    data = SyntheticSet(seed=d.seed, num=c.images, textures=tuple(d.textures),
                        background_textures=tuple(d.background_textures))
    model = train_classifier(data, d.resolution, c.steps, out, batch_size=c.batch_size, seed=cfg.seed, width=c.width,
                             threads=1)
    images, captions = heldout_pairs(cfg, min(d.heldout_images, 512))
    return {"dir": out, "heldout_accuracy": score(model, images, captions)}


def score(classifier, images: torch.Tensor, prompts: list[str]) -> dict:
    acc = caption_accuracy(classifier, images, prompts)
    acc["shape+color+position"] = caption_accuracy(classifier, images, prompts, heads=SCORED_HEADS)["all"]
    return acc


def sample_space(cfg: LabJob, space: str, unet_run: str, prompts: list[str], classifier,
                 quality: SampleQuality) -> dict:
    """Samples of the fixed prompts from the space's EMA UNet: a grid, their time, their scores."""
    s = cfg.sampling
    unet, vae, text_encoder, job, manifest = load_run(unet_run, weights="ema")
    device = dist.device()
    t0 = time.perf_counter()
    rows = sample_rows(unet.to(device), vae.to(device), text_encoder.to(device), manifest, job, prompts,
                       per_prompt=s.per_prompt, guidance=s.guidance, steps=s.steps, sampler=s.sampler, seed=cfg.seed)
    seconds_per_image = (time.perf_counter() - t0) / (len(prompts) * s.per_prompt)
    grid = save_grid(rows[:s.grid_prompts], prompts[:s.grid_prompts], os.path.join(cfg.run_dir, f"samples_{space}.png"),
                     tile=64)
    images, image_prompts = [im for row in rows for im in row], [p for p in prompts for _ in range(s.per_prompt)]
    result = {"grid": grid, "seconds_per_image": seconds_per_image, "accuracy": None, "scored": 0,
              **quality(images, image_prompts)}
    if classifier is not None:
        result["accuracy"] = score(classifier, torch.stack([to_tensor(im) for im in images]), image_prompts)
        result["scored"] = len(images)
    return result


# ---------------------------------------------------------------- the lab

@config_lib.holds_run_dir
def run_lab(cfg: LabJob) -> str:
    """Every stage of the comparison in order; returns the report's path."""
    # Before hours of training rather than after them, and before the config is saved, so that
    # the corrected path is not "a different config" to this run directory.
    check_clip_spec(cfg.eval.clip_model, need_file=True)
    config_lib.save_resolved(cfg, cfg.run_dir)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    stages, results = Stages(cfg.run_dir), {}
    run = lambda name, fn, *args: results.setdefault(name, stages.run(name, functools.partial(fn, *args)))  # noqa: E731

    # --- a. data: textured synthetic shapes, unless image shards are given ---------------------
    if cfg.synthetic:
        run("data_train", draw_synthetic, cfg, train_urls(cfg), cfg.data.train_images, cfg.data.seed)
        run("data_heldout", draw_synthetic, cfg, heldout_urls(cfg), cfg.data.heldout_images, cfg.data.seed + 1)

    # --- b. the three first stages: given, exported before, or trained (resumed if begun) ------
    vaes = {name: run(f"autoencoder_{name}", first_stage, cfg, name)["vae"] for name in FIRST_STAGES}
    vaes[PIXELS] = IDENTITY  # LDM-1: the image is the latent

    # --- c. reconstruction on held-out images: metrics and a grid --------------------------------
    run("reconstruction", reconstruction, cfg, vaes)

    # --- d, e. per space: the latent cache, then the same UNet config trained on it ----------------
    for space in SPACES:
        cache = run(f"cache_{space}", cache_space, cfg, space, vaes[space])
        run(f"unet_{space}", train_space, cfg, space, cache)

    # --- f. samples of a fixed prompt set from each UNet, scored by the caption classifier, and by
    #        sample FID against the held-out images and CLIP score where their weights are given --
    prompts = list(cfg.sampling.prompts) or heldout_pairs(cfg, cfg.sampling.num_prompts)[1]
    classifier = None
    if cfg.synthetic:  # captions in the synthetic grammar: the classifier can check them
        classifier = load_classifier(run("classifier", classifier_stage, cfg)["dir"])
    e = cfg.eval
    real = lambda: ImageBatches(heldout_urls(cfg), cfg.data.resolution, e.batch_size, e.images,  # noqa: E731
                                cfg.data.endpoint_url)
    quality = SampleQuality(e.inception_weights, e.clip_model, real, dist.device(), e.batch_size)
    for space in SPACES:
        run(f"samples_{space}", sample_space, cfg, space, results[f"unet_{space}"]["run"], prompts, classifier,
            quality)

    # --- g. the report -------------------------------------------------------------------------------
    report = write_lab_report(cfg, results, prompts)
    print(f"[lab] report: {report}")
    return report
