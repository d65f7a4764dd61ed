"""Export a trained UNet run as a self-contained diffusers-format folder.

    python launch/export.py --run runs/demo/unet --out exports/demo
"""
import argparse
import sys

from data_pipeline.storage import DataError
from trainer.core.config import ConfigError, one_line
from trainer.unet.export import export_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory of launch/train_unet.py")
    p.add_argument("--out", required=True, help="a new, empty folder")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="the EMA weights (default, where the run kept an EMA) or the trained ones")
    args = p.parse_args()
    try:
        out = export_run(args.run, args.out, args.weights)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {one_line(e)}")
    print(f"exported: {out}")


if __name__ == "__main__":
    main()
