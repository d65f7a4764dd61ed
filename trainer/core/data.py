"""The data section shared by the training jobs, and the loader built from it."""
from __future__ import annotations

import dataclasses
import json
import os

from data_pipeline import storage
from data_pipeline.buckets import ImageBucketer, make_buckets
from data_pipeline.images import DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, check_formats
from data_pipeline.loader import Loader, ShardBatches, make_loader
from data_pipeline.quarantine import Quarantine
from data_pipeline.shards import DEFAULT_MAX_MEMBER_MB, count_samples

from trainer.core.config import ConfigError, check_endpoint, check_non_negative, check_positive
from trainer.core.dist import World


@dataclasses.dataclass
class ShardData:
    urls: str = ""  # shards: directory, brace pattern (s3://b/p/{000..127}.tar), glob, comma list; or a latent cache root
    endpoint_url: str | None = None  # S3-compatible endpoint; default AWS_ENDPOINT_URL
    num_workers: int = 1  # DataLoader processes per rank (0: read in the training process)
    shuffle_buffer: int = 1000  # samples mixed per stream
    virtual_ranks: int = 0  # data streams, fixed for the run (0: ranks x workers at the first start); a
    #   resume may use any world size dividing it: set it to the largest ranks x workers you may resume on
    resampled: bool = False  # draw shards with replacement each epoch (huge sets that never finish an epoch)
    max_error_rate: float = 0.01  # stop when more than this share of samples fails to decode
    storage_attempts: int = 5  # tries per object-store request (throttling, resets) before the error
    storage_backoff_s: float = 0.2  # wait after the first failed try, doubled after each further one
    max_member_mb: float = DEFAULT_MAX_MEMBER_MB  # a tar member larger than this (by its header) is skipped
    #   unread and its sample quarantined, so one huge or hostile member cannot exhaust memory

    def __post_init__(self) -> None:
        if not self.max_member_mb > 0:
            raise ConfigError(f"data.max_member_mb must be > 0, got {self.max_member_mb!r}")

    @property
    def max_member_bytes(self) -> int:
        return int(self.max_member_mb * 2**20)

    def configure_storage(self) -> None:
        storage.configure(attempts=self.storage_attempts, backoff_s=self.storage_backoff_s)

    def bucketer(self):
        return None

    def validate(self, prefix: str = "data.") -> None:
        """Ranges, checked when the config is resolved (login node, --dry-run), not on the nodes."""
        check_endpoint(f"{prefix}endpoint_url", self.endpoint_url)
        check_non_negative(self, ("num_workers", "shuffle_buffer", "virtual_ranks", "storage_backoff_s"), prefix)
        check_positive(self, ("storage_attempts",), prefix)
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ConfigError(f"{prefix}max_error_rate must be in [0, 1], got {self.max_error_rate}")


@dataclasses.dataclass
class LatentData(ShardData):
    repeats: int = 1  # times each sample is in an epoch (times kohya folder repeats recorded in the cache)
    class_urls: str = ""  # DreamBooth prior preservation (Ruiz et al. 2023): a second latent cache of class images
    #   ("a photo of a dog"), made with the same encoders; its samples train beside the instance data every epoch
    class_repeats: int = 1  # times each class image is in an epoch
    prior_loss_weight: float = 1.0  # the loss weight of class images (the paper's lambda; 1.0 there)
    log_samples: bool = False  # write run_dir/data_log/rank-R.jsonl: the samples (and loss weights) of every step

    def validate(self, prefix: str = "data.") -> None:
        super().validate(prefix)
        check_positive(self, ("repeats", "class_repeats"), prefix)
        for key in ("repeats", "class_repeats"):
            if getattr(self, key) > 10_000:
                raise ConfigError(f"{prefix}{key} must be at most 10000, got {getattr(self, key)}")
        if not 0.0 <= self.prior_loss_weight <= 100.0:
            raise ConfigError(f"{prefix}prior_loss_weight must be in [0, 100], got {self.prior_loss_weight}")
        if not self.class_urls and (self.class_repeats != 1 or self.prior_loss_weight != 1.0):
            raise ConfigError(f"{prefix}class_repeats/prior_loss_weight are set but {prefix}class_urls is empty: name "
                              "the class images' latent cache")
        if self.class_urls and self.class_urls.rstrip("/") == self.urls.rstrip("/"):
            raise ConfigError(f"{prefix}class_urls is {prefix}urls: the class images must be their own cache")


@dataclasses.dataclass
class ImageData(ShardData):
    resolution: int = 32  # images are resized (shorter side) and centre-cropped to this
    min_size: int = 0  # images whose shorter side is below this are quarantined (0: upscale anything)
    max_pixels: int = DEFAULT_MAX_PIXELS  # images whose header claims more pixels are quarantined (bombs)
    image_formats: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_FORMATS))  # PIL formats
    #   decoded (whatever the member's extension says); anything else is quarantined. Opt into more with
    #   care: EPS makes PIL run Ghostscript on the file's PostScript, JPEG2000 decodes ~20x slower than JPEG

    buckets: bool = False  # aspect-ratio buckets of about resolution**2 pixels instead of square crops
    bucket_step: int = 64  # bucket sides are multiples of this (the autoencoder's factor x the UNet's)
    bucket_max_aspect: float = 2.0  # the widest and the tallest bucket

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.image_formats = list(check_formats(self.image_formats))
        except ValueError as e:
            raise ConfigError(f"data.image_formats: {e}") from None

    def validate(self, prefix: str = "data.") -> None:
        super().validate(prefix)
        check_positive(self, ("resolution", "max_pixels", "bucket_step"), prefix)
        check_non_negative(self, ("min_size",), prefix)
        if self.bucket_max_aspect < 1.0:
            raise ConfigError(f"{prefix}bucket_max_aspect must be >= 1, got {self.bucket_max_aspect}")

    def decode_options(self) -> dict:
        return {"resolution": self.resolution, "min_size": self.min_size, "max_pixels": self.max_pixels,
                "formats": tuple(self.image_formats)}

    def bucketer(self):
        if not self.buckets:
            return None
        return ImageBucketer(make_buckets(self.resolution, self.bucket_step, self.bucket_max_aspect),
                             tuple(self.image_formats))


def image_shard_counts(urls: list[str], endpoint_url: str | None, run_dir: str, bucketer=None,
                       max_member_bytes: int = int(DEFAULT_MAX_MEMBER_MB * 2**20)) -> list[list[int]]:
    """Samples per image shard (and per bucket of `bucketer`): what the loader splits across ranks
    (a latent cache's manifest has them; image shards do not). Counted once by reading the tars
    without decoding (image headers only, for buckets), and kept by URL in run_dir/shard_counts.json
    for later runs. The count is of what the loader will read (data_pipeline.shards.count_samples)."""
    path = os.path.join(run_dir, "shard_counts.json")
    # The buckets' shapes are part of the key: a run with other buckets counts again.
    tag = "" if bucketer is None else "|" + ",".join(f"{w}x{h}" for w, h in bucketer.buckets)
    known = {}
    if os.path.exists(path):
        with open(path) as f:
            known = json.load(f)
    missing = [u for u in urls if u + tag not in known]
    for url, row in zip(missing, count_samples(missing, endpoint_url, bucketer, max_member_bytes=max_member_bytes)):
        known[url + tag] = row
    if missing:
        os.makedirs(run_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(known, f, indent=1)
        os.replace(path + ".tmp", path)
    return [known[u + tag] if isinstance(known[u + tag], list) else [known[u + tag]] for u in urls]


def build_loader(data: ShardData, urls: list[str], decode, batch_per_rank: int, world: World, *, seed: int,
                 run_dir: str, counts: list[int] | None = None, checksums: list[str] | None = None,
                 state: dict | None = None, read_shard=None, bucketer=None, repeats: list[int] | None = None,
                 weights: list[float] | None = None) -> Loader:
    """The rank's loader; `state` (a Loader.state_dict() from a checkpoint) continues a run.

    A resumed run keeps the stream count it started with, so that a different world size
    continues the same epochs. `bucketer`: batches of one shape by it (a latent cache's buckets),
    else data.bucketer() (an image job's data.buckets).
    """
    data.configure_storage()
    virtual_ranks = state["virtual_ranks"] if state else data.virtual_ranks
    dataset = ShardBatches(urls, decode, batch_per_rank, seed=seed, rank=world.rank, world_size=world.size,
                           num_workers=data.num_workers, virtual_ranks=virtual_ranks, counts=counts,
                           repeats=repeats, weights=weights,
                           shuffle_buffer=data.shuffle_buffer, resampled=data.resampled,
                           bucketer=bucketer if bucketer is not None else data.bucketer(),
                           quarantine=Quarantine(os.path.join(run_dir, "quarantine.jsonl"), data.max_error_rate),
                           endpoint_url=data.endpoint_url, checksums=checksums, read_shard=read_shard,
                           max_member_bytes=data.max_member_bytes)
    loader = make_loader(dataset)
    if state:
        loader.load_state_dict(state)
    return loader
