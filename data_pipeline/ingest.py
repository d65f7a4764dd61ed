"""A dataset in any layout users have (data_pipeline/layouts.py) written as WebDataset shards.

Each item becomes the sample `NNNNNNNNN` (its position: names may hold dots or characters tar
readers split on) with the image bytes unchanged, its first caption as `.txt`, and a `.json`
(data_pipeline/source_info.py, the contract with the cache job) keeping what the layout knew: the source name,
every caption when there are several, kohya's repeat count, the original size before a resize
the source did. Samples of different repeat counts go to different shards, so that a shard has
one repeat count (the loader repeats shards). Every item that is not written is a Problem: counted,
named in the summary, and listed in `PREFIX-skipped.jsonl` beside the shards.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math

from . import layouts, storage
from .images import DEFAULT_FORMATS, MASK_MEMBER
from .output_folder import claim_output_folder
from .shards import ShardWriter
from .source_info import SourceInfo
from .storage import DataError

DEFAULT_SAMPLES_PER_SHARD = 1000
TARGET_SHARD_BYTES = 512 * 2**20  # 100 MB to 1 GB is what WebDataset readers stream well


@dataclasses.dataclass
class Summary:
    layout: str
    written: int
    shards: list[str]
    skipped: list[layouts.Problem]
    repeats: dict[int, int]  # repeat count -> samples with it

    def lines(self, show: int = 20) -> list[str]:
        out = [f"read {self.written + len(self.skipped)} items as {self.layout}: wrote {self.written} samples in "
               f"{len(self.shards)} shards" + (f", skipped {len(self.skipped)}" if self.skipped else "")]
        if len(self.repeats) > 1 or any(r != 1 for r in self.repeats):
            out.append("repeats per epoch: " + ", ".join(f"{n} samples x{r}" for r, n in sorted(self.repeats.items())))
        for reason, n in collections.Counter(p.reason for p in self.skipped).most_common():
            out.append(f"  skipped {n}: {reason}")
        for p in self.skipped[:show]:
            out.append(f"    {p.name}: {p.reason}")
        if len(self.skipped) > show:
            out.append(f"    ... and {len(self.skipped) - show} more")
        return out


def samples_per_shard(count: int | None, mean_bytes: float | None) -> int:
    """A shard size for `count` items of `mean_bytes`: at most 1000 samples and about 512 MB, and at
    least 100 samples (so a set of a few thousand is not cut into slivers): 40 images make one shard,
    100,000 make 100. Shard count no longer limits training (the loader splits samples); it sets how
    many ranks the cache job can encode with."""
    per = DEFAULT_SAMPLES_PER_SHARD
    if mean_bytes:
        per = min(per, max(1, int(TARGET_SHARD_BYTES // max(mean_bytes, 1))))
    if count:
        per = min(per, max(100, math.ceil(count / 64)))
    return max(1, per)


def source_json(item: layouts.Item) -> bytes:
    return SourceInfo(item.name, tuple(item.captions), item.repeats, item.original_size).to_json()


def ingest(path: str, out_url: str, *, layout: str = "", per_shard: int = 0, prefix: str = "data",
           endpoint_url: str | None = None, overwrite: bool = False, caption_column: str = "",
           image_column: str = "", formats: tuple[str, ...] = DEFAULT_FORMATS, progress=None) -> Summary:
    """Write the dataset at `path` (`layout`, or detected) as shards in `out_url`; see the module docstring."""
    layout = layout or layouts.detect(path)
    if per_shard <= 0:
        per_shard = samples_per_shard(*layouts.estimate(path, layout))
    items = layouts.read(path, layout, caption_column=caption_column, image_column=image_column, formats=formats)
    first = next(items, None)  # the input is readable before anything in the output is touched
    claim_output_folder(out_url, prefix, overwrite, endpoint_url)
    storage.makedirs(out_url, endpoint_url)
    writers: dict[int, ShardWriter] = {}  # repeat count -> its open shard
    shards, skipped, repeats, written = [], [], collections.Counter(), 0
    try:
        for got in _chain(first, items):
            if progress is not None:
                progress()
            if isinstance(got, layouts.Problem):
                skipped.append(got)
                continue
            writer = writers.get(got.repeats)
            if writer is None:
                shards.append(storage.join(out_url, f"{prefix}-{len(shards):06d}.tar"))
                writer = writers[got.repeats] = ShardWriter(shards[-1], endpoint_url).__enter__()
            writer.write({"__key__": f"{written:09d}", got.ext: got.image, "txt": got.captions[0].encode(),
                          "json": source_json(got), **({MASK_MEMBER: got.mask} if got.mask is not None else {})})
            written += 1
            repeats[got.repeats] += 1
            if writer.count == per_shard:
                writers.pop(got.repeats).__exit__(None, None, None)
    except BaseException as e:
        for w in writers.values():
            w.__exit__(type(e), e, None)
        raise
    for w in writers.values():
        w.__exit__(None, None, None)
    if skipped:
        lines = "".join(json.dumps(dataclasses.asdict(p)) + "\n" for p in skipped)
        storage.write_bytes_atomic(storage.join(out_url, f"{prefix}-skipped.jsonl"), lines.encode(), endpoint_url)
    if not written:
        reasons = ", ".join(f"{n} {r}" for r, n in collections.Counter(p.reason for p in skipped).most_common(3))
        raise DataError(f"no usable images found in {path} (read as {layout}){': ' + reasons if reasons else ''}")
    return Summary(layout, written, shards, skipped, dict(repeats))


def _chain(first, rest):
    if first is not None:
        yield first
    yield from rest

