"""Write the embedded default data set: captioned coloured shapes as WebDataset shards.

    python launch/make_synthetic.py --out runs/demo/shards --num 4000
    python launch/make_synthetic.py --out s3://bucket/shapes --num 100000 --endpoint-url http://minio:9000
    python launch/make_synthetic.py --out runs/lab/shards --num 4000 --textures flat,stripes,checkers,noise,gradient

--textures / --background-textures are lists the shape's / the background's fill is drawn
from per image (repeats weight the draw); the caption names a fill that is not flat:
"a red striped circle at the top left on a checkered white background".

The output folder must be empty or absent (shards of an earlier run would be read beside
the new ones); --overwrite first deletes the shards an earlier run left there.
"""
import argparse
import sys

from tqdm import tqdm

from data_pipeline import shards, synthetic
from data_pipeline.output_folder import claim_output_folder
from data_pipeline.storage import DataError


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory or URL (local, file://, s3://...)")
    p.add_argument("--num", type=int, required=True, help="number of images")
    p.add_argument("--per-shard", type=int, default=1000, help="images per tar shard")
    p.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    valid = ",".join(synthetic.TEXTURES)
    p.add_argument("--textures", default="flat", help=f"shape fills to draw from per image, from {valid}")
    p.add_argument("--background-textures", default="flat",
                   help=f"background fills to draw from per image, from {valid}")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    p.add_argument("--overwrite", action="store_true", help="replace the shards an earlier run left in --out")
    args = p.parse_args()
    if args.num <= 0 or args.per_shard <= 0 or args.resolution < 8:
        p.error("--num and --per-shard must be positive and --resolution at least 8")
    try:
        textures = synthetic.parse_textures(args.textures, "--textures")
        background_textures = synthetic.parse_textures(args.background_textures, "--background-textures")
    except ValueError as e:
        p.error(str(e))
    try:
        claim_output_folder(args.out, "shapes", args.overwrite, args.endpoint_url)
    except DataError as e:
        sys.exit(f"error: {e}")
    samples = (synthetic.sample(args.seed, i, args.resolution, textures, background_textures)
               for i in range(args.num))
    urls = shards.write_shards(tqdm(samples, total=args.num, desc="drawing", unit="img"),
                               args.out, args.per_shard, prefix="shapes", endpoint_url=args.endpoint_url)
    print(f"wrote {args.num} images in {len(urls)} shards to {args.out}")


if __name__ == "__main__":
    main()
