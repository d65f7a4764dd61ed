"""What an image shard's `.json` member says about its sample: the contract between
launch/make_shards.py (the writer) and the cache job (the reader).

    {"name": "10_sks dog/x.png", "captions": ["...", "..."], "repeats": 10, "original_size": [4000, 3000]}

Every key is optional. `original_size` (w, h) is the size before a resize the source did
(img2dataset resizes and records `original_width`/`original_height`, read here too): SDXL is
conditioned on it. `repeats` is kohya's folder repeat count. Shards from elsewhere carry other
keys in their .json (img2dataset's url, status, exif...): those are ignored. A known key of the
wrong type is a DataError naming the sample, which the cache job quarantines.
"""
from __future__ import annotations

import dataclasses
import json

from .storage import DataError

MAX_REPEATS = 10_000
MAX_CAPTIONS = 64


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    name: str = ""
    captions: tuple[str, ...] = ()  # every caption when there are several (the .txt holds the first)
    repeats: int = 1
    original_size: tuple[int, int] | None = None

    def to_json(self) -> bytes:
        info: dict = {"name": self.name}
        if len(self.captions) > 1:
            info["captions"] = list(self.captions)
        if self.repeats != 1:
            info["repeats"] = self.repeats
        if self.original_size is not None:
            info["original_size"] = list(self.original_size)
        return json.dumps(info, sort_keys=True).encode()


def _whole(v, most: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= most


def parse(sample: dict) -> SourceInfo:
    """The SourceInfo of a raw image-shard sample (defaults when it has no .json)."""
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    if "json" not in sample:
        return SourceInfo()
    try:
        raw = json.loads(bytes(sample["json"]))
    except (ValueError, RecursionError):
        raise DataError(f"sample {where}: its .json is not valid JSON") from None
    if not isinstance(raw, dict):
        return SourceInfo()
    name = raw.get("name") if isinstance(raw.get("name"), str) else ""
    captions = raw.get("captions", [])
    if not (isinstance(captions, list) and len(captions) <= MAX_CAPTIONS and all(isinstance(c, str) for c in captions)):
        raise DataError(f"sample {where}: .json 'captions' must be a list of at most {MAX_CAPTIONS} strings")
    repeats = raw.get("repeats", 1)
    if not _whole(repeats, MAX_REPEATS):
        raise DataError(f"sample {where}: .json 'repeats' must be a whole number 1..{MAX_REPEATS}, got {repeats!r:.40}")
    size = raw.get("original_size")
    if size is None and "original_width" in raw:  # img2dataset's keys
        size = [raw.get("original_width"), raw.get("original_height")]
        if not all(_whole(v, 2**24) for v in size):
            size = None  # img2dataset writes null where it did not know: not an error
    if size is not None and not (isinstance(size, list) and len(size) == 2 and all(_whole(v, 2**24) for v in size)):
        raise DataError(f"sample {where}: .json 'original_size' must be two whole numbers (w, h), got {size!r:.40}")
    return SourceInfo(name, tuple(captions), repeats, tuple(size) if size is not None else None)
