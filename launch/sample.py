"""Sample a PNG grid from a trained UNet run (one row per prompt).

    python launch/sample.py --run runs/demo/unet --prompt "a red circle at the center on a white background"
"""
import argparse
import sys

from data_pipeline.storage import DataError
from trainer.core.config import ConfigError, one_line
from trainer.core.job_checks import check_guidance
from trainer.unet.sampling import generate, save_grid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory of launch/train_unet.py")
    p.add_argument("--prompt", action="append", required=True, help="a caption; repeat for more rows")
    p.add_argument("--out", default=None, help="grid PNG path (default RUN/samples.png); each image is also saved "
                   "at full size in the folder of the same name without .png")
    p.add_argument("--per-prompt", type=int, default=6, help="images per prompt")
    p.add_argument("--guidance", type=float, default=5.0,
                   help="classifier-free guidance scale >= 0: 1 the prompt alone, > 1 away from the negative prompt")
    p.add_argument("--negative-prompt", default="",
                   help="a caption to steer away from (replaces the empty caption in guidance; needs --guidance > 1)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--sampler", choices=("ddim", "dpm"), default="ddim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="", help="WIDTHxHEIGHT in pixels, e.g. 1152x896 (an aspect-ratio bucket; SDXL "
                   "runs are conditioned on it as original and target size); default the cache's square resolution")
    p.add_argument("--original-size", default="", help="SDXL: the original WIDTHxHEIGHT to condition on (default "
                   "--size); small values ask for the look of an upscaled small image")
    p.add_argument("--crop", default="", help="SDXL: crop TOP,LEFT in pixels to condition on (default 0,0: uncropped)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="the EMA weights (default, where the run kept an EMA) or the trained ones")
    args = p.parse_args()
    out = args.out or f"{args.run.rstrip('/')}/samples.png"
    if not out.lower().endswith(".png"):
        sys.exit(f"error: --out must name a .png file, got {out!r}")
    for name in ("per_prompt", "steps"):
        if getattr(args, name) <= 0:
            sys.exit(f"error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    try:
        check_guidance(args.guidance, args.negative_prompt, "--guidance", "--negative-prompt")
        rows = generate(args.run, args.prompt, weights=args.weights, per_prompt=args.per_prompt, guidance=args.guidance,
                        steps=args.steps, sampler=args.sampler, seed=args.seed, negative_prompt=args.negative_prompt,
                        size=args.size, original_size=args.original_size, crop=args.crop)
    except (ConfigError, DataError, FileNotFoundError) as e:
        sys.exit(f"error: {one_line(e)}")
    save_grid(rows, args.prompt, out)
    print(f"samples: {out} (full size: {out[:-4]}/)")


if __name__ == "__main__":
    main()
