"""Train the first-stage autoencoder on image shards and export it in diffusers format.

    python launch/train_autoencoder.py --config configs/autoencoder/demo.yaml data.urls=runs/demo/shards
"""
from trainer.autoencoder import AutoencoderJob, train_autoencoder
from trainer.config import parse_cli

if __name__ == "__main__":
    train_autoencoder(parse_cli(AutoencoderJob, description=__doc__))
