"""Export a trained UNet run as a complete diffusers StableDiffusionPipeline folder (or, for a
LoRA run, its diffusers LoRA weights; --merge: a pipeline with them folded in).

    python launch/export.py --run runs/demo/unet --out exports/demo
"""
import argparse
import sys

from data_pipeline.storage import DataError
from trainer.core.config import ConfigError, one_line
from trainer.unet.export import FORMATS, export_run
from trainer.unet.model_card import push_to_hub


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory of launch/train_unet.py")
    p.add_argument("--out", required=True, help="a new, empty folder")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="the EMA weights (default, where the run kept an EMA) or the trained ones")
    p.add_argument("--merge", action="store_true",
                   help="a LoRA run: a complete pipeline with the adapters folded into the UNet (default: the "
                   "diffusers LoRA file alone, for load_lora_weights on the pretrained pipeline)")
    p.add_argument("--format", choices=FORMATS, default="diffusers",
                   help="diffusers: a pipeline folder (default; a LoRA run: diffusers' LoRA file); single_file: "
                   "OUT/model.safetensors in the original Stable Diffusion layout (ComfyUI, A1111, from_single_file; "
                   "a LoRA run: its adapter as kohya, --merge: the merged model); kohya: a LoRA run's adapter as "
                   "OUT/lora_kohya.safetensors (kohya's layout: A1111, ComfyUI, load_lora_weights)")
    p.add_argument("--vae", default="", help="ship this autoencoder folder instead of the cache's: a decoder-only "
                   "fine-tune of it (train_autoencoder train_encoder=false; its encoder is checked)")
    p.add_argument("--trigger", default="", help="the trigger words of a DreamBooth/LoRA subject, for the model card")
    p.add_argument("--push-to-hub", default="", metavar="REPO", help="upload the export to this Hugging Face hub "
                   "repository (private; created if absent); needs network and a token (huggingface-cli login)")
    args = p.parse_args()
    try:
        out = export_run(args.run, args.out, args.weights, merge=args.merge, fmt=args.format, vae_source=args.vae,
                         trigger=args.trigger)
        print(f"exported: {out} (model card: {out}/README.md)")
        if args.push_to_hub:
            print(f"pushed: {push_to_hub(out, args.push_to_hub)}")
    except (ConfigError, DataError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {one_line(e)}")


if __name__ == "__main__":
    main()
