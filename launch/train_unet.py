"""Train the text-conditional UNet on a latent cache with DeepSpeed; rerun to resume.

    deepspeed --num_gpus 8 launch/train_unet.py --config configs/unet/demo.yaml
    python launch/train_unet.py --config configs/unet/demo.yaml total_samples=200000
"""
from trainer.core.config import run
from trainer.unet.data import dry_run_checks
from trainer.unet.job import UNetJob
from trainer.unet.train import train_unet

if __name__ == "__main__":
    run(UNetJob, train_unet, __doc__, dry_run_checks=dry_run_checks)
