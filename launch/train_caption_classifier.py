"""Train the caption-accuracy classifier and report its accuracy on held-out synthetic images.

    python launch/train_caption_classifier.py --out runs/lab/classifier --resolution 32 --steps 1500 \\
        --textures flat,stripes,checkers,noise,gradient --background-textures flat,stripes,checkers,noise,gradient
    python launch/train_caption_classifier.py --out runs/lab/classifier --data runs/lab/shards --resolution 32

Without --data the training images are drawn from the generator (--seed, --num); with it they
are read from shards written by make_synthetic.py (labels parsed from the captions). Held-out
images are always drawn from the generator at --eval-seed with --textures/--background-textures,
so give those options the values the shards were made with. The accuracy is printed and saved as
held_out.json beside the model (caption_classifier.safetensors + caption_classifier.json).
"""
import argparse
import json
import os
import sys

from data_pipeline import synthetic
from lab.caption_classifier import SyntheticSet, caption_accuracy, synthetic_images, train_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for the model")
    p.add_argument("--data", default=None, help="synthetic shards to train on (else drawn from the generator)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for --data")
    p.add_argument("--resolution", type=int, default=32, help="image side in pixels ")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=32, help="channels of the first convolutions")
    p.add_argument("--seed", type=int, default=0, help="generator seed of the training images, and init seed")
    p.add_argument("--num", type=int, default=6000, help="training images (drawn; or at most this many from --data)")
    valid = ",".join(synthetic.TEXTURES)
    p.add_argument("--textures", default="flat", help=f"shape fills, from {valid}")
    p.add_argument("--background-textures", default="flat", help=f"background fills, from {valid}")
    p.add_argument("--eval-seed", type=int, default=None, help="generator seed of the held-out images (default seed+1)")
    p.add_argument("--eval-num", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for this small CNN)")
    args = p.parse_args()
    try:
        textures = synthetic.parse_textures(args.textures, "--textures")
        background_textures = synthetic.parse_textures(args.background_textures, "--background-textures")
    except ValueError as e:
        p.error(str(e))
    if args.num <= 0 or args.eval_num <= 0 or args.steps <= 0:
        p.error("--num, --eval-num and --steps must be positive")
    data = args.data or SyntheticSet(args.seed, args.num, textures, background_textures)
    try:
        model = train_classifier(data, args.resolution, args.steps, args.out, batch_size=args.batch_size,
                                 lr=args.lr, seed=args.seed, width=args.width, endpoint_url=args.endpoint_url,
                                 max_images=args.num, device=args.device, threads=args.threads, log=print)
    except ValueError as e:
        sys.exit(f"error: {e}")
    held = SyntheticSet(args.seed + 1 if args.eval_seed is None else args.eval_seed, args.eval_num,
                        textures, background_textures)
    images, _ = synthetic_images(held, args.resolution)
    prompts = [synthetic.caption(synthetic.attributes(held.seed, i, textures, background_textures))
               for i in range(held.num)]
    acc = caption_accuracy(model, images.float().div(127.5).sub(1.0), prompts)
    with open(os.path.join(args.out, "held_out.json"), "w") as f:
        json.dump({"held_out": {"seed": held.seed, "num": held.num, "textures": list(textures),
                                "background_textures": list(background_textures)}, "accuracy": acc}, f, indent=1)
    print("held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
