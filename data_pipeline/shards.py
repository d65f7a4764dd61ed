"""WebDataset tar shards: write them atomically anywhere fsspec reaches, read them as samples.

Writing is webdataset's `TarWriter`; file names are split into key and extension by its
rule (`base_plus_ext`). Reading is done here, on fsspec streams (webdataset has no opener
for `s3://` URLs), because shards are hostile input and webdataset's reader is not built
for that:

* shards are read as plain, uncompressed tar streams only. WebDataset shards are normally
  uncompressed (the images inside already are), and a compressed shard decompressed on
  the fly is a bomb (a 1 MB .tar.gz took 2.3 GB of memory): a gzip, bzip2, xz or zstd
  shard is refused with a one-line DataError naming it;
* a member larger than `max_member_bytes` (by its tar header) is skipped without being
  read into memory, and its sample is quarantined;
* a leading `./` in member names (what `tar cf x.tar ./*` writes) is dropped; a key that
  is still not a plain name (a directory in it, a leading dot, `..`) is quarantined.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from typing import Iterator

import webdataset as wds
from webdataset.tariterators import base_plus_ext

from .storage import DataError, filesystem, join, makedirs, open_url


# Largest tar member read by default: a 64-megapixel photo is ~30 MB as JPEG; latent
# shards' members are well below 1 MB.
DEFAULT_MAX_MEMBER_MB = 64.0

# Magic numbers of the compressions tarfile (or a user) might put around a shard.
_COMPRESSIONS = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
                 (b"\x28\xb5\x2f\xfd", "zstd"))


def plain_key(key: str) -> bool:
    """The sample keys this project writes and reads: a plain name, no '/' and no '.'
    (a latent shard maps each key back to a file name, and its extension starts at a '.')."""
    return bool(key) and "/" not in key and "." not in key


class _AtomicFile:
    """A local file that appears at `url` only when closed without error.

    Local targets: written under a temporary name beside the target, then renamed.
    Remote targets: spooled to a local temporary file, then uploaded in one go, so a
    killed job never leaves a partial object behind.
    """

    def __init__(self, url: str, endpoint_url: str | None = None):
        self.url, self.endpoint_url = url, endpoint_url
        self.fs, self.path = filesystem(url, endpoint_url)
        self.local = "://" not in url or url.startswith("file://")
        if self.local:
            # A fixed temporary name: a rerun after a kill overwrites the dead run's partial
            # file instead of leaving it behind. Hidden, and not *.tar, so no reader lists it.
            folder, name = os.path.split(os.path.abspath(self.path))
            os.makedirs(folder, exist_ok=True)
            self.tmp = os.path.join(folder, f".{name}.partial")
            self.file = open(self.tmp, "wb")
        else:
            fd, self.tmp = tempfile.mkstemp(prefix="shard-", suffix=".tar")
            self.file = os.fdopen(fd, "wb")

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.local:
            os.replace(self.tmp, self.path)
        else:
            self.fs.put_file(self.tmp, self.path)
            os.unlink(self.tmp)

    def abort(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


class ShardWriter:
    """Write samples (dicts of `__key__` plus `ext: bytes`) into one tar shard at `url`.

    Use as a context manager; the shard becomes visible only when the block ends cleanly.
    """

    def __init__(self, url: str, endpoint_url: str | None = None):
        self.url = url
        self._file = _AtomicFile(url, endpoint_url)
        # mtime fixed so that the same samples always give byte-identical shards.
        self._tar = wds.TarWriter(self._file.file, encoder=False, mtime=0.0)
        self.count = 0

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        if not plain_key(key):
            raise DataError(f"invalid sample key {key!r} for {self.url}: keys are plain names without '/' or '.'")
        for ext, value in sample.items():
            if not ext.startswith("__") and not isinstance(value, (bytes, bytearray)):
                raise TypeError(f"sample {key}: field {ext!r} must be bytes, got {type(value).__name__}")
        self._tar.write(sample)
        self.count += 1

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._tar.close()  # ends the tar stream; leaves our file open for commit/abort
        if exc_type is None:
            self._file.commit()
        else:
            self._file.abort()


def write_shards(samples, out_url: str, per_shard: int, prefix: str = "shard",
                 endpoint_url: str | None = None) -> list[str]:
    """Write an iterable of samples into `out_url/prefix-000000.tar`, ... of `per_shard` each."""
    makedirs(out_url, endpoint_url)
    urls, writer = [], None
    try:
        for sample in samples:
            if writer is None:
                urls.append(join(out_url, f"{prefix}-{len(urls):06d}.tar"))
                writer = ShardWriter(urls[-1], endpoint_url).__enter__()
            writer.write(sample)
            if writer.count == per_shard:
                writer.__exit__(None, None, None)
                writer = None
    except BaseException as e:
        if writer is not None:
            writer.__exit__(type(e), e, None)
        raise
    if writer is not None:
        writer.__exit__(None, None, None)
    return urls


def _safe_key(key: str) -> bool:
    """Keys become file names downstream; absolute paths and '..' components never do."""
    return bool(key) and not key.startswith("/") and ".." not in key.split("/")


class _Hashing:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.h.hexdigest()


class _Replay:
    """A stream whose first bytes were already read (to look at them): gives them back first."""

    def __init__(self, head: bytes, f):
        self.head, self.f = head, f

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.f.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.f.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out if len(out) == n else out + self.f.read(n - len(out))


def _compression(head: bytes) -> str | None:
    return next((name for magic, name in _COMPRESSIONS if head.startswith(magic)), None)


def _members(stream, url: str, max_member_bytes: int):
    """(name, bytes or None) per regular member of an uncompressed tar stream; None when the
    member is larger than `max_member_bytes` (skipped unread: tarfile's stream mode reads
    past it in fixed-size blocks). WebDataset's `__meta__` members are passed over."""
    head = stream.read(512)
    kind = _compression(head)
    if kind is not None:
        raise DataError(f"shard {url} is {kind}-compressed: compressed shards are not read (a compressed "
                        "shard can be a decompression bomb); store shards as plain .tar")
    with tarfile.open(fileobj=_Replay(head, stream), mode="r|") as tar:
        for info in tar:
            if info.isreg():
                name = info.name
                while name.startswith("./"):  # what `tar cf x.tar ./*` writes
                    name = name[2:]
                if name.startswith("__") and name.endswith("__") and "/" not in name:
                    continue
                yield name, (tar.extractfile(info).read() if info.size <= max_member_bytes else None), info.size
            tar.members = []  # stream mode: keep no list of every member seen


def iter_samples(url: str, endpoint_url: str | None = None, on_error=None,
                 sha256: str | None = None, max_member_bytes: int = int(DEFAULT_MAX_MEMBER_MB * 2**20)
                 ) -> Iterator[dict]:
    """Yield the samples of one shard as dicts: `__key__`, `__url__` and `ext: bytes`.

    A bad sample (unsafe or not plain member name, the same field twice, a member over
    `max_member_bytes`) or an unreadable rest of the shard (truncated, not a tar) is
    reported as `on_error(url, key, message)` and passed over, so the intact samples still
    come through; with no `on_error` it is a DataError. A compressed shard is always a
    DataError (see the module docstring). Files are grouped into samples by webdataset's
    key rule (`base_plus_ext`). With `sha256` the bytes are hashed on the way and a
    mismatch, found at the end of the shard, is a DataError naming it (never quarantined:
    a shard that changed after it was written is not to be trusted).
    """
    def bad(key, message):
        if on_error is None:
            raise DataError(f"shard {url}: sample {key}: {message}" if key else f"shard {url}: {message}")
        on_error(url, key, message)

    def verify(stream):
        if sha256 is not None and (got := stream.drain()) != sha256:
            raise DataError(f"shard {url} is corrupted: its sha256 is {got[:16]}..., the manifest "
                            f"records {sha256[:16]}...; rebuild it with launch/cache_latents.py")

    limit_mb = f"{max_member_bytes / 2**20:g}"
    with open_url(url, "rb", endpoint_url) as raw:
        stream = _Hashing(raw) if sha256 is not None else raw
        current, broken, last_good = None, None, None
        try:
            for fname, data, size in _members(stream, url, max_member_bytes):
                key, ext = base_plus_ext(fname)
                if key is None:
                    continue
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield from _finish(current, broken, bad)
                        last_good = current["__key__"]
                    current, broken = {"__key__": key, "__url__": url}, None
                ext = ext.lower()
                if data is None:
                    broken = (f"member {fname} is {size / 2**20:.1f} MB, more than max_member_mb={limit_mb}; "
                              "skipped unread")
                    data = b""
                elif ext in current:
                    broken = broken or f"duplicate member {fname}"
                current[ext] = data
        except (tarfile.TarError, EOFError) as e:
            verify(stream)
            # Damaged data: the samples before the damage were yielded; the partial one is not.
            if current is None:
                bad(None, f"not a readable tar file: {e}")
            else:
                lost = f"{current['__key__']} and everything after it are lost"
                bad(None, f"unreadable after {last_good or 'the start'}; {lost} ({e})")
            return
        except DataError:
            raise
        except OSError as e:  # storage, not data: retries are exhausted; never skip silently
            raise DataError(f"reading {url} failed: {e}") from None
        if current is not None:
            verify(stream)
            yield from _finish(current, broken, bad)
        else:
            verify(stream)


def _finish(sample: dict, broken: str | None, bad):
    key = sample["__key__"]
    if not _safe_key(key):
        bad(key, "unsafe member name (absolute or '..')")
    elif not plain_key(key):
        bad(key, "member name is not a plain key (a directory or '.' in it); write shards with plain "
                 "member names like 000123.jpg")
    elif broken:
        bad(key, broken)
    else:
        yield sample


def count_samples(urls: list[str], endpoint_url: str | None = None, bucketer=None, read_shard=None,
                  max_member_bytes: int = int(DEFAULT_MAX_MEMBER_MB * 2**20)) -> list[list[int]]:
    """Samples per shard and bucket, by reading the shards (not decoding): what the loader will read,
    so samples the tar reader passes over (bad names, oversize members, a damaged rest) are left out;
    the loader quarantines them when it meets them."""
    read_shard, buckets = read_shard or iter_samples, len(bucketer.buckets) if bucketer is not None else 1
    out = []
    for url in urls:
        row = [0] * buckets
        for s in read_shard(url, endpoint_url, on_error=_pass_over, max_member_bytes=max_member_bytes):
            row[bucketer(s) if bucketer is not None else 0] += 1
        out.append(row)
    return out


def _pass_over(url, key, message) -> None:
    """Counting passes over bad samples; the loader quarantines them when it reads them."""
