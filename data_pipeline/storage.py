"""URLs to bytes: local paths, file://, s3:// and any other fsspec protocol.

S3-compatible stores (MinIO, Ceph, a test server) are reached through an endpoint URL,
taken from the job config or from the standard `AWS_ENDPOINT_URL` variable; credentials
come from the usual AWS environment and files, as boto does it.
"""
from __future__ import annotations

import os
import posixpath
import uuid

from braceexpand import braceexpand
from fsspec.core import url_to_fs


class DataError(RuntimeError):
    """Input that cannot be used, reported as one line naming the URL or key at fault."""


def storage_options(url: str, endpoint_url: str | None = None) -> dict:
    """fsspec keyword arguments for `url`'s protocol."""
    if url.startswith(("s3://", "s3a://")):
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}


def filesystem(url: str, endpoint_url: str | None = None):
    """(fs, path) for a URL; a bare path is a local file."""
    try:
        return url_to_fs(url, **storage_options(url, endpoint_url))
    except (ImportError, ValueError) as e:
        raise DataError(f"cannot open {url}: {e}") from None


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
    """Open a URL for streaming; a missing or unreadable object is a DataError naming it."""
    fs, path = filesystem(url, endpoint_url)
    try:
        return fs.open(path, mode)
    except FileNotFoundError:
        raise DataError(f"shard not found: {url}") from None
    except PermissionError:
        raise DataError(f"permission denied reading {url}") from None
    except OSError as e:
        raise DataError(f"cannot open {url}: {e}") from None


def exists(url: str, endpoint_url: str | None = None) -> bool:
    fs, path = filesystem(url, endpoint_url)
    return fs.exists(path)


def read_bytes(url: str, endpoint_url: str | None = None) -> bytes:
    with open_url(url, "rb", endpoint_url) as f:
        return f.read()


def write_bytes_atomic(url: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Write an object so that readers see either nothing or all of it.

    Locally: a temporary name in the same directory, then rename. On object stores a
    single PUT is already all-or-nothing.
    """
    fs, path = filesystem(url, endpoint_url)
    if "://" not in url or url.startswith("file://"):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
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

