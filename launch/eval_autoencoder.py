"""Evaluate autoencoders on held-out shards: PSNR, SSIM, LPIPS, rFID, high-frequency energy kept,
compression; writes OUT/metrics.md, OUT/metrics.json and OUT/recon_grid.png, prints the table.

    python launch/eval_autoencoder.py --model kl_plain=runs/lab/kl_plain/export \\
        --model kl_gan=runs/lab/kl_gan/export --data runs/lab/heldout --resolution 64 --out runs/lab/eval \\
        --lpips-weights /models/vgg16-397923af.pth --inception-weights /models/pt_inception-2015-12-05-6726825d.pth

--inception-weights takes pytorch-fid's pt_inception-2015-12-05-6726825d.pth (FID on the usual
scale) or torchvision's inception_v3_google-0cc3c7bd.pth (comparable only with itself); without
it, either file in torch's hub cache (~/.cache/torch/hub/checkpoints) is used, else rFID is n/a.
"""
import argparse
import sys

from data_pipeline.storage import DataError
from lab.ae_eval import run_evaluation
from trainer.core.config import ConfigError, one_line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="[LABEL=]PATH",
                   help="diffusers AutoencoderKL/VQModel folder, hub id or preset:NAME; repeat to compare")
    p.add_argument("--data", required=True, help="held-out shards: directory, glob, brace pattern, s3://...")
    p.add_argument("--resolution", type=int, default=256, help="resize + centre-crop side in pixels")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many images (default: all)")
    p.add_argument("--out", default="runs/eval_autoencoder", help="output folder")
    p.add_argument("--lpips-weights", default=None, metavar="PATH|random",
                   help="torchvision's ImageNet backbone file (default: the one in torch's hub cache), "
                        "or 'random' (random backbone, for pipeline checks)")
    p.add_argument("--lpips-net", choices=("vgg", "alex"), default="vgg")
    p.add_argument("--inception-weights", default=None, metavar="PATH", help="Inception-v3 weights file for rFID (see above)")
    p.add_argument("--batch", type=int, default=16, help="images per forward pass")
    p.add_argument("--hf-cutoff", type=float, default=0.5, help="high-frequency cut-off as a fraction of Nyquist")
    p.add_argument("--grid-images", type=int, default=4, help="rows of the reconstruction grid")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default AWS_ENDPOINT_URL)")
    args = p.parse_args()
    try:
        run_evaluation(args.model, args.data, args.out, resolution=args.resolution, limit=args.limit,
                       batch_size=args.batch, lpips_weights=args.lpips_weights, lpips_net=args.lpips_net,
                       inception_weights=args.inception_weights, hf_cutoff=args.hf_cutoff,
                       grid_images=args.grid_images, device=args.device, endpoint_url=args.endpoint_url)
    except (ConfigError, DataError, FileNotFoundError) as e:
        sys.exit(f"error: {one_line(e)}")


if __name__ == "__main__":
    main()
