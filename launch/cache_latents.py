"""Encode image shards once with the frozen VAE and text encoder into a latent cache.

    python launch/cache_latents.py --config configs/cache/demo.yaml
    torchrun --nproc_per_node 8 launch/cache_latents.py --config configs/cache/sd21.yaml \
        data.urls='s3://bucket/laion/{00000..09999}.tar' out_url=s3://bucket/laion-latents
"""
from trainer.cache.job import CacheJob, cache_latents
from trainer.core.config import run

if __name__ == "__main__":
    run(CacheJob, cache_latents, __doc__)
