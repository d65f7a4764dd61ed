from setuptools import setup

# torch/torchvision ranges admit the releases most clusters already have; the
# upper bounds are left open so a user's newer CUDA build is not downgraded.
setup(
    name="ldm-train",
    version="0.1.0",
    description="Train latent diffusion models at scale: shards -> autoencoder -> cached latents -> DeepSpeed UNet",
    packages=["trainer", "trainer.core", "trainer.autoencoder", "trainer.cache", "trainer.unet", "lab", "models", "data_pipeline"],
    python_requires=">=3.10,<3.13",
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "deepspeed>=0.15",
        "webdataset>=0.2.90",
        "accelerate>=0.30",
        "open-clip-torch>=2.24",
        "lpips>=0.1.4",
        "wandb>=0.17",
        "fsspec>=2024.3",
        "s3fs>=2024.3",
        "diffusers>=0.30",
        # The text encoders and tokenizers inside every diffusers Stable Diffusion pipeline folder.
        "transformers>=4.41",
        # LoRA adapters the way diffusers makes and loads them (unet.add_adapter, load_lora_weights).
        "peft>=0.11",
        "safetensors>=0.4",
        "pillow>=10",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.66",
        # Loss-curve PNGs; plotting by hand with PIL would be more code than it saves.
        "matplotlib>=3.7",
        # Hugging Face datasets (save_to_disk folders, parquet) read by launch/make_shards.py (#28): their
        # Arrow files and Image features are the library's own format; reading them by hand would repeat it.
        "datasets>=2.19",
        # tracker=tensorboard: torch.utils.tensorboard writes its event files through this package (#29).
        "tensorboard>=2.14",
        # optimizer=adamw8bit (#29): block-wise 8-bit Adam moments are bitsandbytes' own kernels (CUDA, and CPU since
        # 0.45); optimizer=prodigy: the reference implementation of Prodigy by its authors. Rewriting either
        # would be more code to trust than the packages users already run with kohya's and diffusers' scripts.
        "bitsandbytes>=0.45",
        "prodigyopt>=1.0",
    ],
    extras_require={"test": ["pytest>=8", "pytest-timeout>=2.2", "moto[server]>=5"]},
)
