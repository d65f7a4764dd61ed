"""Train the first-stage autoencoder on image shards and export it in diffusers format.

    python launch/train_autoencoder.py --config configs/autoencoder/demo.yaml data.urls=runs/demo/shards
"""
from trainer.autoencoder.job import AutoencoderJob
from trainer.autoencoder.train import train_autoencoder
from trainer.core.config import run

if __name__ == "__main__":
    run(AutoencoderJob, train_autoencoder, __doc__)
