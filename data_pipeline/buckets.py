"""Aspect-ratio buckets: batches of one shape, so wide and tall images keep their content.

Centre-cropping every image to a square cuts away the sides of a panorama and the top of a
portrait, and teaches a model that heads are cut off (the SDXL paper, sec. 2.3, shows it).
Buckets of about the same pixel count and different aspect ratios (as NovelAI, kohya and
mosaicml/diffusion use) let each image be resized to the nearest shape and cropped only a
little. A sample's bucket is read from its image header, so it is known without decoding,
also for samples a resume skips over.
"""
from __future__ import annotations

import math

from .images import DEFAULT_FORMATS, IMAGE_EXTS, header_size


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(w, h) shapes, multiples of `step`, each with about resolution**2 pixels (the nearest
    multiple of `step` for h given w), aspect ratios from 1/max_aspect to max_aspect."""
    if resolution % step:
        raise ValueError(f"resolution {resolution} must be a multiple of the bucket step {step}")
    area, shapes = resolution * resolution, {(resolution, resolution)}
    for w in range(step, int(resolution * max_aspect) + step, step):
        h = max(step, round(area / w / step) * step)
        if 1 / max_aspect <= w / h <= max_aspect:
            shapes.update({(w, h), (h, w)})
    return sorted(shapes, key=lambda s: s[0] / s[1])


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is closest (in log space) to `size`'s."""
    ratio = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - ratio))


class ImageBucketer:
    """Maps a raw sample to its bucket index (picklable, for DataLoader workers)."""

    def __init__(self, buckets: list[tuple[int, int]], formats: tuple[str, ...] = DEFAULT_FORMATS):
        self.buckets, self.formats = buckets, tuple(formats)  # formats: those the decoder will open

    def __call__(self, sample: dict) -> int:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        size = header_size(sample[ext], self.formats) if ext else None
        # Unreadable headers go to the square bucket; decoding will quarantine them.
        return nearest_bucket(size, self.buckets) if size and min(size) > 0 else self.square

    @property
    def square(self) -> int:
        return nearest_bucket((1, 1), self.buckets)


class LatentBucketer:
    """Maps a raw latent-cache sample to its bucket: the index of the (w, h) its .json records as
    `target_size` among the cache's bucket shapes (picklable). A sample whose .json is unreadable
    or names another shape goes to bucket 0; decoding (CachedSampleDecoder) then quarantines it."""

    def __init__(self, buckets: list[tuple[int, int]]):
        self.buckets = [tuple(b) for b in buckets]
        self._index = {b: i for i, b in enumerate(self.buckets)}

    def __call__(self, sample: dict) -> int:
        import json

        try:
            size = json.loads(bytes(sample["json"]))["target_size"]
            return self._index.get((int(size[0]), int(size[1])), 0)
        except Exception:  # hostile or missing .json: decoding names the problem
            return 0
