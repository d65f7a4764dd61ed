"""Turn a folder of images with same-name .txt captions into WebDataset shards.

    python launch/make_shards.py --images photos/ --out s3://bucket/photos --per-shard 5000

`photos/cat.jpg` + `photos/cat.txt` becomes the sample `cat` with `cat.jpg` and
`cat.txt`, the layout img2dataset and LAION-style pipelines produce. Image bytes are
copied unchanged. An image without a caption is an error naming it. The output folder must
be empty or absent (shards of an earlier run would be read beside the new ones); --overwrite
first deletes the shards an earlier run left there.
"""
import argparse
import os
import sys

from tqdm import tqdm

from data_pipeline import shards
from data_pipeline.images import IMAGE_EXTS
from data_pipeline.output_folder import check_prefix, claim_output_folder
from data_pipeline.storage import DataError


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="output directory or URL")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--prefix", default="data", help="shard file name prefix")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    p.add_argument("--overwrite", action="store_true", help="replace the shards an earlier run left in --out")
    args = p.parse_args()
    if args.per_shard <= 0:
        p.error(f"--per-shard must be a positive number of samples, got {args.per_shard}")
    if (why := check_prefix(args.prefix)) is not None:
        p.error(why)
    if not os.path.isdir(args.images):
        sys.exit(f"error: --images {args.images} is not a directory")

    pairs = []
    for root, _, files in os.walk(args.images):
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower().lstrip(".") not in IMAGE_EXTS:
                continue
            caption = os.path.join(root, stem + ".txt")
            if not os.path.exists(caption):
                sys.exit(f"error: image {os.path.join(root, name)} has no caption file {caption}")
            pairs.append((os.path.join(root, name), caption, ext.lower().lstrip(".")))
    pairs.sort()
    if not pairs:
        sys.exit(f"error: no images ({', '.join(IMAGE_EXTS)}) found under {args.images}")
    try:  # checked after the inputs, so that a mistake there leaves an earlier output untouched
        claim_output_folder(args.out, args.prefix, args.overwrite, args.endpoint_url)
    except DataError as e:
        sys.exit(f"error: {e}")

    def samples():
        for i, (image, caption, ext) in enumerate(pairs):
            with open(image, "rb") as f, open(caption, "rb") as g:
                # The key is the position, not the file name: names may hold dots or
                # characters that tar readers split on; the name is kept in `.name`.
                yield {"__key__": f"{i:09d}", "jpg" if ext == "jpeg" else ext: f.read(), "txt": g.read(),
                       "name": os.path.relpath(image, args.images).encode()}

    urls = shards.write_shards(tqdm(samples(), total=len(pairs), unit="img"), args.out, args.per_shard,
                               prefix=args.prefix, endpoint_url=args.endpoint_url)
    print(f"wrote {len(pairs)} samples in {len(urls)} shards to {args.out}")


if __name__ == "__main__":
    main()
