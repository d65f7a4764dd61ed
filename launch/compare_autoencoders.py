"""The autoencoder lab: train (or load) kl_plain, kl_gan and vq_gan, evaluate them, train the
same UNet on each latent space and on pixels, sample, score, and write RUN_DIR/report.md.

    python launch/compare_autoencoders.py --config configs/lab/lab_cpu.yaml
    python launch/compare_autoencoders.py --config configs/lab/tiny.yaml run_dir=runs/lab_tiny --dry-run

Rerunning the same command skips finished stages and resumes an interrupted one.
"""
from trainer.core.config import run
from lab.run import run_lab
from lab.config import LabJob

if __name__ == "__main__":
    run(LabJob, run_lab, __doc__)
