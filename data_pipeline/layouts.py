"""The dataset layouts users arrive with, read as one kind of item for launch/make_shards.py.

* `folder`: images with a same-name caption file beside them (`cat.jpg` + `cat.txt` or
  `cat.caption`), searched recursively. In the folder layouts a `cat.mask.png` beside an image is
  its loss mask (white trains, black does not; the cache job's mask=file reads it).
* `kohya`: kohya's sd-scripts convention, `10_sks dog/` = 10 repeats of the class "sks dog":
  captions in `.txt` or `.caption` files beside the images, else the class is the caption.
* `imagefolder`: Hugging Face's / diffusers' layout, `metadata.jsonl` or `metadata.csv` (in the
  folder or its split folders) with a `file_name` column and a caption column (`text`).
* `hf`: a Hugging Face dataset saved with `save_to_disk`, or `.parquet` files, through the
  `datasets` library: an Image column and a caption column.
* `webdataset`: tar shards as img2dataset writes them (`.jpg` + `.txt`, and a `.json` with the
  caption and the original size before img2dataset resized it).

`detect` names the layout a folder holds. Every reader yields `Item`s and `Problem`s in a fixed
order; nothing is dropped without a Problem naming it. Image bytes are never decoded here beyond
the header check that the summary's "unreadable" needs.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import re
from typing import Iterator

from .images import CAPTION_EXTS, DEFAULT_FORMATS, IMAGE_EXTS, header_size
from .shards import DEFAULT_MAX_MEMBER_MB, iter_samples
from .source_info import MAX_CAPTIONS, MAX_REPEATS
from .storage import DataError

LAYOUTS = ("folder", "kohya", "imagefolder", "hf", "webdataset")
KOHYA_FOLDER = re.compile(r"(\d+)_(.+)")
MASK = ".mask.png"  # NAME.mask.png beside NAME.jpg: its loss mask, not an image of its own
CAPTION_COLUMNS = ("text", "caption", "prompt")  # tried in this order when --caption-column is not given
MAX_CAPTION_BYTES = 64 * 1024  # a caption file larger than this is not a caption
MAX_IMAGE_BYTES = int(DEFAULT_MAX_MEMBER_MB * 2**20)  # what readers of the shards accept by default


@dataclasses.dataclass
class Item:
    name: str  # where it came from, relative to the input (a file, a row, a tar member)
    image: bytes
    ext: str  # jpg | png | webp (the member name it gets in the shard)
    captions: list[str]  # one or more captions (the trainer picks one per sample per epoch)
    repeats: int = 1  # times per epoch (kohya's folder prefix)
    original_size: tuple[int, int] | None = None  # (w, h) before a resize the source did (img2dataset)
    mask: bytes | None = None  # a loss mask: NAME.mask.png beside the image (white trains, black does not)


@dataclasses.dataclass
class Problem:
    name: str
    reason: str


def detect(path: str) -> str:
    """The layout of the folder (or file) `path`; a DataError naming what was looked for."""
    if os.path.isfile(path):
        if path.endswith(".parquet"):
            return "hf"
        if path.endswith(".tar"):
            return "webdataset"
        raise DataError(f"--images {path} is a file: give a folder (or a .parquet or .tar file)")
    if not os.path.isdir(path):
        raise DataError(f"--images {path} does not exist")
    top = sorted(os.listdir(path))
    if {"dataset_info.json", "state.json"} <= set(top) or "dataset_dict.json" in top:
        return "hf"
    if any(n.endswith(".parquet") for n in top):
        return "hf"
    if _metadata_files(path):
        return "imagefolder"
    if any(n.endswith(".tar") for n in top):
        return "webdataset"
    subdirs = [n for n in top if os.path.isdir(os.path.join(path, n))]
    if subdirs and any(KOHYA_FOLDER.fullmatch(n) for n in subdirs):
        return "kohya"
    return "folder"


def read(path: str, layout: str, *, caption_column: str = "", image_column: str = "",
         formats: tuple[str, ...] = DEFAULT_FORMATS) -> Iterator[Item | Problem]:
    """Items and Problems of `path` read as `layout`, each image's header checked against `formats`."""
    readers = {"folder": _folder, "kohya": _kohya, "imagefolder": _imagefolder, "hf": _hf, "webdataset": _webdataset}
    if layout not in readers:
        raise DataError(f"--format must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    kw = {"caption_column": caption_column, "image_column": image_column} if layout in ("imagefolder", "hf") else {}
    for got in readers[layout](path, **kw):
        if isinstance(got, Item):
            size = header_size(got.image, formats)
            if size is None:
                got = Problem(got.name, f"not a readable {'/'.join(formats)} image")
            elif not any(c.strip() for c in got.captions):
                got = Problem(got.name, "empty caption")
        yield got


def estimate(path: str, layout: str) -> tuple[int | None, float | None]:
    """(items, mean image bytes) where a listing tells them cheaply; None where it does not."""
    if layout not in ("folder", "kohya", "imagefolder") or not os.path.isdir(path):
        return None, None
    files = _image_files(path)
    sizes = [os.path.getsize(f) for f in files[:1000]]
    return len(files), (sum(sizes) / len(sizes) if sizes else None)


# --- files on disk ------------------------------------------------------------------------------

def _image_files(root: str) -> list[str]:
    out = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        out += [os.path.join(folder, f) for f in sorted(files) if _ext(f) in IMAGE_EXTS and not f.endswith(MASK)]
    return out


def _ext(name: str) -> str:
    return os.path.splitext(name)[1].lower().lstrip(".")


def _read_file(path: str, limit: int | None = None) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1 if limit else -1)
    if limit and len(data) > limit:
        raise DataError(f"its {os.path.basename(path)} is larger than {limit} bytes")
    return data


def _caption_beside(image: str) -> str | None:
    stem = os.path.splitext(image)[0]
    for ext in CAPTION_EXTS:
        if os.path.isfile(stem + "." + ext):
            return _read_file(stem + "." + ext, MAX_CAPTION_BYTES).decode("utf-8", errors="replace").strip()
    return None


def _from_file(root: str, image: str, captions: list[str], repeats: int = 1) -> Item | Problem:
    ext, mask = _ext(image), os.path.splitext(image)[0] + MASK
    if os.path.getsize(image) > MAX_IMAGE_BYTES:  # the loaders would skip it unread (data.max_member_mb)
        return Problem(os.path.relpath(image, root), f"larger than {MAX_IMAGE_BYTES >> 20} MB (data.max_member_mb)")
    return Item(os.path.relpath(image, root), _read_file(image), "jpg" if ext == "jpeg" else ext, captions, repeats,
                mask=_read_file(mask) if os.path.isfile(mask) else None)


def _with_caption(root: str, image: str, default: str | None = None, repeats: int = 1) -> Item | Problem:
    """The image with its caption file's text (else `default`); a Problem naming it when there is neither,
    or the caption file is too large."""
    try:
        caption = _caption_beside(image)
    except DataError as e:
        return Problem(os.path.relpath(image, root), str(e))
    if caption is None or (caption == "" and default is not None):  # kohya: an empty file means the class
        caption = default
    if caption is None:
        exts = " or ".join("." + e for e in CAPTION_EXTS)
        return Problem(os.path.relpath(image, root), f"no caption file ({exts})")
    return _from_file(root, image, [caption], repeats)


def _folder(root: str) -> Iterator[Item | Problem]:
    for image in _image_files(root):
        yield _with_caption(root, image)


def _kohya(root: str) -> Iterator[Item | Problem]:
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            if _ext(name) in IMAGE_EXTS:
                yield Problem(name, "an image outside the N_class folders (kohya reads only those)")
            continue
        m = KOHYA_FOLDER.fullmatch(name)
        if m is None:
            for image in _image_files(folder):
                yield Problem(os.path.relpath(image, root),
                              f"its folder {name!r} is not named N_class (e.g. 10_sks dog)")
            continue
        repeats, klass = int(m.group(1)), m.group(2).strip()
        if not 1 <= repeats <= MAX_REPEATS:
            for image in _image_files(folder):
                yield Problem(os.path.relpath(image, root), f"folder {name!r}: repeats must be 1..{MAX_REPEATS}")
            continue
        for image in _image_files(folder):
            yield _with_caption(root, image, klass, repeats)


def _metadata_files(root: str) -> list[str]:
    """metadata.jsonl / metadata.csv in `root` or its direct subfolders (splits such as train/)."""
    found = []
    for pattern in ("metadata.jsonl", "metadata.csv", "*/metadata.jsonl", "*/metadata.csv"):
        found += sorted(glob.glob(os.path.join(glob.escape(root), pattern)))
    return found


def _captions_of(value, where: str) -> list[str] | Problem:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and 0 < len(value) <= MAX_CAPTIONS and all(isinstance(v, str) for v in value):
        return value
    return Problem(where, f"its caption is {type(value).__name__}, not a string or a list of 1..{MAX_CAPTIONS} strings")


def _imagefolder(root: str, caption_column: str = "", image_column: str = "") -> Iterator[Item | Problem]:
    listed = set()
    for meta in _metadata_files(root):
        base = os.path.dirname(meta)
        for i, row in enumerate(_rows(meta)):
            where = f"{os.path.relpath(meta, root)} row {i + 1}"
            if not isinstance(row, dict):
                yield Problem(where, "not an object")
                continue
            name = row.get(image_column or "file_name")
            if not isinstance(name, str) or not name:
                yield Problem(where, f"no {image_column or 'file_name'} column")
                continue
            path = os.path.realpath(os.path.join(base, name))  # links resolved: a link out is outside too
            if os.path.isabs(name) or not path.startswith(os.path.realpath(root) + os.sep):
                yield Problem(where, f"file_name {name[:80]!r} points outside {root}")
                continue
            listed.add(path)
            column = caption_column or next((c for c in CAPTION_COLUMNS if c in row), "")
            if not column or column not in row:
                yield Problem(where, f"no caption column ({caption_column or ', '.join(CAPTION_COLUMNS)})")
                continue
            captions = _captions_of(row[column], where)
            if isinstance(captions, Problem):
                yield captions
            elif not os.path.isfile(path) or _ext(path) not in IMAGE_EXTS:
                yield Problem(where, f"{name[:80]!r} is not an image file ({', '.join(IMAGE_EXTS)})")
            else:
                yield _from_file(root, path, captions)
    for image in _image_files(root):
        if os.path.realpath(image) not in listed:
            yield Problem(os.path.relpath(image, root), "no row in any metadata file")


def _rows(path: str):
    try:
        if path.endswith(".csv"):
            with open(path, newline="", encoding="utf-8", errors="replace") as f:
                yield from csv.DictReader(f)
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                for i, line in enumerate(f):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except (ValueError, RecursionError):
                            yield f"line {i + 1} is not JSON"
    except csv.Error as e:
        raise DataError(f"{path} is not a readable CSV file: {e}") from None


# --- Hugging Face datasets -------------------------------------------------------------------------

def _hf(path: str, caption_column: str = "", image_column: str = "") -> Iterator[Item | Problem]:
    import datasets

    try:
        if os.path.isdir(path) and not any(n.endswith(".parquet") for n in os.listdir(path)):
            ds = datasets.load_from_disk(path)
        else:
            files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(glob.escape(path), "*.parquet")))
            ds = datasets.load_dataset("parquet", data_files=files, split="train")
    except Exception as e:  # the library's own errors: a damaged or foreign folder
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DataError(f"--images {path} is not a readable Hugging Face dataset: {why}") from None
    splits = ds.items() if isinstance(ds, datasets.DatasetDict) else [("", ds)]
    for split, part in splits:
        features = part.features
        image = image_column or next((n for n, f in features.items() if isinstance(f, datasets.Image)), "")
        if image not in features:
            raise DataError(f"--images {path}{'/' + split if split else ''} has no image column (columns: "
                            f"{', '.join(features)}); name it with --image-column")
        column = caption_column or next((c for c in CAPTION_COLUMNS if c in features), "")
        if column not in features:
            raise DataError(f"--images {path}{'/' + split if split else ''} has no caption column "
                            f"({caption_column or ', '.join(CAPTION_COLUMNS)}; columns: {', '.join(features)}); "
                            "name it with --caption-column")
        if isinstance(features[image], datasets.Image):
            part = part.cast_column(image, datasets.Image(decode=False))  # the stored bytes, unchanged
        for i, row in enumerate(part):
            where = f"{split + ' ' if split else ''}row {i}"
            value, captions = row[image], _captions_of(row[column], where)
            if isinstance(captions, Problem):
                yield captions
                continue
            data = value.get("bytes") if isinstance(value, dict) else value if isinstance(value, bytes) else None
            if data is None and isinstance(value, dict) and isinstance(value.get("path"), str):
                yield Problem(where, f"its image is a path ({value['path'][:80]}), not stored bytes")
                continue
            if not isinstance(data, (bytes, bytearray)):
                yield Problem(where, f"column {image!r} holds no image bytes")
                continue
            yield Item(where, bytes(data), _sniff(bytes(data)), captions)


def _sniff(data: bytes) -> str:
    """The member extension for image bytes whose file name is unknown (the decoder reads the header)."""
    if data.startswith(b"\x89PNG"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"


# --- WebDataset shards (img2dataset) --------------------------------------------------------------

def _webdataset(path: str) -> Iterator[Item | Problem]:
    urls = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
    for url in urls:
        problems: list[Problem] = []
        report = lambda u, key, message: problems.append(Problem(f"{os.path.basename(u)}:{key}", message))  # noqa: E731
        for s in iter_samples(url, on_error=report):
            yield from problems
            problems.clear()
            where = f"{os.path.basename(url)}:{s['__key__']}"
            ext = next((e for e in IMAGE_EXTS if e in s), None)
            meta = _json(s.get("json"))
            caption = next((s[e].decode("utf-8", errors="replace").strip() for e in CAPTION_EXTS if e in s), None)
            if caption is None and isinstance(meta.get("caption"), str):
                caption = meta["caption"]
            if ext is None:
                yield Problem(where, "no image member")
            elif caption is None:
                yield Problem(where, "no caption (.txt, or caption in .json)")
            else:
                size = _size(meta.get("original_width"), meta.get("original_height"))
                yield Item(where, s[ext], "jpg" if ext == "jpeg" else ext, [caption], original_size=size)
        yield from problems


def _json(data) -> dict:
    try:
        value = json.loads(bytes(data)) if data is not None else {}
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _size(w, h) -> tuple[int, int] | None:
    ok = all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**24 for v in (w, h))
    return (w, h) if ok else None


