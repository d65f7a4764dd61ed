"""Turn a dataset in the layout you have into WebDataset shards for the cache job.

    python launch/make_shards.py --images photos/ --out s3://bucket/photos

Layouts (detected, or --format): a folder of images with same-name .txt/.caption captions;
kohya's `10_sks dog/` folders (10 repeats, captions beside or the folder's class); diffusers'
imagefolder (metadata.jsonl or metadata.csv with file_name and text); a Hugging Face dataset
(save_to_disk folder or .parquet files); img2dataset's WebDataset output (the original size in
its .json is kept for SDXL's conditioning). Image bytes are copied unchanged. Items without a
readable image or a caption are skipped, counted and named in the summary and in
PREFIX-skipped.jsonl beside the shards. The output folder must be empty or absent (shards of
an earlier run would be read beside the new ones); --overwrite first deletes the shards an
earlier run left there. --per-shard defaults to a size picked from the dataset (at most 1000).
"""
import argparse
import sys

from tqdm import tqdm

from data_pipeline import layouts
from data_pipeline.images import DEFAULT_FORMATS
from data_pipeline.ingest import ingest
from data_pipeline.output_folder import check_prefix
from data_pipeline.storage import DataError


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="the dataset: a folder, a .parquet file or a .tar shard")
    p.add_argument("--out", required=True, help="output directory or URL")
    p.add_argument("--format", default="", choices=("", *layouts.LAYOUTS), help="layout (default: detected)")
    p.add_argument("--per-shard", type=int, default=0, help="samples per tar shard (0: picked from the dataset)")
    p.add_argument("--prefix", default="data", help="shard file name prefix")
    p.add_argument("--caption-column", default="", help="imagefolder/hf: the caption column (default: text, "
                   "caption or prompt)")
    p.add_argument("--image-column", default="", help="imagefolder: the file name column (file_name); hf: the "
                   "image column (default: the first Image column)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    p.add_argument("--overwrite", action="store_true", help="replace the shards an earlier run left in --out")
    args = p.parse_args()
    if args.per_shard < 0:
        p.error(f"--per-shard must be a positive number of samples (or 0: picked), got {args.per_shard}")
    if (why := check_prefix(args.prefix)) is not None:
        p.error(why)
    bar = tqdm(unit="item", disable=None)  # a progress bar on a terminal only
    try:
        summary = ingest(args.images, args.out, layout=args.format, per_shard=args.per_shard, prefix=args.prefix,
                         endpoint_url=args.endpoint_url, overwrite=args.overwrite,
                         caption_column=args.caption_column, image_column=args.image_column,
                         formats=DEFAULT_FORMATS, progress=bar.update)
    except DataError as e:
        bar.close()
        sys.exit(f"error: {e}")
    bar.close()
    print("\n".join(summary.lines()))
    print(f"shards in {args.out}" + (f"; skipped items listed in {args.out}/{args.prefix}-skipped.jsonl"
                                     if summary.skipped else ""))


if __name__ == "__main__":
    main()
