"""URLs to bytes: local paths, file://, s3:// and any other fsspec protocol.

S3-compatible stores (MinIO, Ceph, a test server) are reached through an endpoint URL,
taken from the job config or from the standard `AWS_ENDPOINT_URL` variable; credentials
come from the usual AWS environment and files, as boto does it.

Requests to S3 retry with backoff as `data_pipeline.s3` describes; after the last attempt
the error is a DataError naming the URL.
"""
from __future__ import annotations

import os
import posixpath
import sys

from braceexpand import braceexpand
from fsspec.core import url_to_fs

from .s3 import RetryPolicy, configure, retry_policy, s3_filesystem_class  # noqa: F401 (re-exported)


class DataError(RuntimeError):
    """Input that cannot be used, reported as one line naming the URL or key at fault."""


class StorageReadError(DataError):
    """A stream from `open_url` failed while reading (or writing), retries exhausted.

    The message is fixed at construction: webdataset's tar reader appends its own text
    to `args[0]` of exceptions passing through it, which must not change what is shown.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return type(self), (self.message,)


def _is_s3(url: str) -> bool:
    return url.startswith(("s3://", "s3a://"))


def is_local(url: str) -> bool:
    """A plain path or file:// URL (not object storage)."""
    return "://" not in url or url.startswith("file://")


def storage_options(url: str, endpoint_url: str | None = None) -> dict:
    """fsspec keyword arguments for `url`'s protocol."""
    if _is_s3(url):
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        # one attempt per botocore call: the retrying is ours (see the module docstring)
        options: dict = {"config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 1}}}
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        return options
    return {}


def filesystem(url: str, endpoint_url: str | None = None):
    """(fs, path) for a URL; a bare path is a local file. s3:// gives a RetryingS3FileSystem."""
    try:
        if _is_s3(url) and "::" not in url:
            cls = s3_filesystem_class()
            fs = cls(**{**cls._get_kwargs_from_urls(url), **storage_options(url, endpoint_url)})
            return fs, cls._strip_protocol(url)
        return url_to_fs(url, **storage_options(url, endpoint_url))
    except (ImportError, ValueError) as e:
        raise DataError(f"cannot open {url}: {e}") from None


def _storage_error(e: BaseException) -> bool:
    """An error of the storage layer (not of the caller's code)."""
    if isinstance(e, OSError):
        return True
    kinds: tuple = ()
    if "botocore.exceptions" in sys.modules:
        from botocore.exceptions import BotoCoreError, ClientError
        kinds += (BotoCoreError, ClientError)
    if "aiohttp" in sys.modules:
        import aiohttp
        kinds += (aiohttp.ClientError,)
    if "s3fs.core" in sys.modules:
        kinds += tuple(sys.modules["s3fs.core"].S3_RETRYABLE_ERRORS)
    return bool(kinds) and isinstance(e, kinds)


def _describe(e: BaseException) -> str:
    """One line for a storage error: its message (with its kind where that says more) and
    how many attempts were made."""
    what = type(e).__name__
    detail = str(e) or what
    if not isinstance(e, OSError) and what not in detail:
        detail = f"{what}: {detail}"
    attempts = getattr(e, "storage_attempts", 1)
    return f"{detail} (gave up after {attempts} attempts)" if attempts > 1 else detail


class _NamedStream:
    """A file object from `open_url` whose storage failures are DataErrors naming the URL.

    Everything else is the wrapped object's (attributes, seek, tell, ...).
    """

    def __init__(self, f, url: str, mode: str = "rb"):
        self._f = f
        self.url = url
        self._doing = "reading" if "r" in mode else "writing"

    def _guard(self, method, *args):
        try:
            return method(*args)
        except DataError:
            raise
        except Exception as e:
            if not _storage_error(e):
                raise
            raise StorageReadError(f"{self._doing} {self.url} failed: {_describe(e)}") from e

    def read(self, *args):
        return self._guard(self._f.read, *args)

    def read1(self, *args):
        return self._guard(self._f.read1, *args)

    def readinto(self, b):
        return self._guard(self._f.readinto, b)

    def readline(self, *args):
        return self._guard(self._f.readline, *args)

    def readlines(self, *args):
        return self._guard(self._f.readlines, *args)

    def write(self, data):
        return self._guard(self._f.write, data)

    def flush(self):
        return self._guard(self._f.flush)

    def close(self):
        return self._guard(self._f.close)

    def __iter__(self):
        return self

    def __next__(self):
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._guard(self._f.__exit__, *exc)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __repr__(self):
        return f"<stream {self.url}>"


def join(base: str, *names: str) -> str:
    if "://" in base:
        return posixpath.join(base.rstrip("/"), *names)
    return os.path.join(base, *names)


def expand_shards(spec: str | list[str], endpoint_url: str | None = None, suffix: str = ".tar") -> list[str]:
    """Shard URLs from a spec: brace patterns (`s3://b/p/{00000..00127}.tar`), directories
    (every `*.tar` inside, sorted), globs, or a list of any of these; comma-separated too."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    specs = [s.strip() for item in specs for s in item.split(",") if s.strip()]
    urls: list[str] = []
    for item in specs:
        for url in braceexpand(item):
            fs, path = filesystem(url, endpoint_url)
            protocol = url.split("://")[0] + "://" if "://" in url else ""
            if any(c in path for c in "*?["):
                urls += [_unstrip(protocol, p) for p in sorted(fs.glob(path)) if p.endswith(suffix)]
            elif not url.endswith(suffix) and fs.isdir(path):
                found = sorted(p for p in fs.find(path) if p.endswith(suffix))
                if not found:
                    raise DataError(f"no {suffix} shards found under {url}")
                urls += [_unstrip(protocol, p) for p in found]
            else:
                urls.append(url)
    if not urls:
        raise DataError(f"the shard list {spec!r} is empty")
    return urls


def _unstrip(protocol: str, path: str) -> str:
    if protocol in ("", "file://"):
        return path if protocol == "" else "file://" + path
    return protocol + path


def open_url(url: str, mode: str = "rb", endpoint_url: str | None = None):
    """Open a URL for streaming; a missing or unreadable object is a DataError naming it.

    Remote streams are wrapped so that a read failing for good (object-store retries
    exhausted, see `configure`) is a DataError (`StorageReadError`) naming the URL too.
    """
    fs, path = filesystem(url, endpoint_url)
    kwargs = {}
    if _is_s3(url) and "r" in mode and retry_policy().block_size is not None:
        kwargs["block_size"] = retry_policy().block_size
    try:
        f = fs.open(path, mode, **kwargs)
    except FileNotFoundError:
        raise DataError(f"shard not found: {url}") from None
    except PermissionError:
        raise DataError(f"permission denied reading {url}") from None
    except Exception as e:
        if not _storage_error(e):
            raise
        raise DataError(f"cannot open {url}: {_describe(e)}") from None
    return f if is_local(url) else _NamedStream(f, url, mode)


def exists(url: str, endpoint_url: str | None = None) -> bool:
    fs, path = filesystem(url, endpoint_url)
    return fs.exists(path)


def identity(url: str, endpoint_url: str | None = None) -> str:
    """What tells one version of an object from another without reading it: its size and, on object
    stores, its ETag, locally its modification time (ns) and inode. '' where the store says neither."""
    fs, path = filesystem(url, endpoint_url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise DataError(f"shard not found: {url}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot stat {url}: {_describe(e)}") from None
    if "://" not in url or url.startswith("file://"):
        st = os.stat(path)
        return f"size={st.st_size} mtime_ns={st.st_mtime_ns} inode={st.st_ino}"
    tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
    return f"size={info.get('size')} etag={str(tag).strip(chr(34))}"


def read_bytes(url: str, endpoint_url: str | None = None) -> bytes:
    with open_url(url, "rb", endpoint_url) as f:
        return f.read()


def write_bytes_atomic(url: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Write an object so that readers see either nothing or all of it.

    Locally: a hidden temporary name in the same directory (fixed, so that a rerun after a
    kill replaces a dead run's leftover), then rename. On object stores a single PUT is
    already all-or-nothing.
    """
    fs, path = filesystem(url, endpoint_url)
    if "://" not in url or url.startswith("file://"):
        folder, name = os.path.split(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.partial")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def makedirs(url: str, endpoint_url: str | None = None) -> None:
    fs, path = filesystem(url, endpoint_url)
    if "://" not in url or url.startswith("file://"):
        fs.makedirs(path, exist_ok=True)



def is_disk_full(e: BaseException) -> bool:
    """A write that failed for want of space: ENOSPC/EDQUOT, also as torch.save reports it (its zip
    writer's "file write failed", or "unexpected pos" when a write came up short) or wrapped in another
    error's text. For errors raised while writing only."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(k in text for k in ("No space left on device", "Disk quota exceeded", "file write failed",
                                   "unexpected pos"))


def disk_full(path: str, what: str, needed_bytes: int | None = None) -> str:
    """One line for a write to local `path` that ran out of space: how much is free there, how much
    `what` needs where that is known."""
    import shutil

    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    need = f"; it needs about {needed_bytes / 2**20:.1f} MB" if needed_bytes else ""
    return f"no space left on the device of {path} while writing {what} ({free / 2**20:.1f} MB free{need})"
