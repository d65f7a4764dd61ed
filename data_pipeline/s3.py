"""Retries for object stores: the one retrying layer under every S3 request.

Requests retry throttling (SlowDown, other 5xx, 429) and broken connections (resets, a body
cut short) with exponential backoff, `configure(attempts=...)` attempts in all per request.
A ranged GET (how an opened object is streamed) counts as one attempt together with reading
its body. botocore's retries are switched off (see `storage.storage_options`) and s3fs's own
loops make one attempt each: left as they are, they nest inside each other and above
botocore's, so that attempts multiply, and their backoff cannot be configured. Below us,
aiohttp sends a request once more by itself when the connection dies before any response,
and s3fs waits 0.1 s after some failures before passing them on.
"""
from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import dataclass

MAX_BACKOFF_S = 20.0


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # tries per request in all, the first one included
    backoff_s: float = 0.2  # the wait after the n-th failure: backoff_s * 2**(n-1), jittered, capped
    block_size: int | None = None  # bytes per ranged GET when streaming; None: s3fs's (50 MiB)


_policy = RetryPolicy()


def configure(attempts: int = 5, backoff_s: float = 0.2, block_size: int | None = None) -> RetryPolicy:
    """Set the process-wide policy for object stores; returns the previous one.

    `attempts`: how many times one request (a ranged GET with its body, a HEAD, a listing,
    a PUT) is tried; throttling, 5xx and broken connections are retried, a missing
    object or denied access is not. `backoff_s`: the wait after the first failure,
    doubled after each further one (times a random 0.5-1, at most MAX_BACKOFF_S).
    `block_size`: bytes fetched per GET when reading an opened object (s3fs's read-ahead).

    Read at the time of each request, so it applies to filesystems made earlier too;
    DataLoader workers are forked and inherit it.
    """
    global _policy
    if int(attempts) < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    if not float(backoff_s) >= 0:
        raise ValueError(f"backoff_s must be >= 0, got {backoff_s}")
    if block_size is not None and int(block_size) < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    previous = _policy
    _policy = RetryPolicy(int(attempts), float(backoff_s), None if block_size is None else int(block_size))
    return previous


def retry_policy() -> RetryPolicy:
    return _policy


def _backoff(policy: RetryPolicy, failures: int) -> float:
    return min(policy.backoff_s * 2 ** (failures - 1), MAX_BACKOFF_S) * random.uniform(0.5, 1.0)


# Error codes of throttling and transient server trouble (as botocore's standard retry mode).
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "RequestLimitExceeded", "TooManyRequests", "TooManyRequestsException",
    "BandwidthLimitExceeded", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeoutException",
    "PriorRequestNotComplete",
})
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})


def _transient(e: BaseException) -> bool:
    """Whether a failed S3 request is worth another attempt."""
    import aiohttp
    import s3fs.core
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError
    from botocore.exceptions import IncompleteReadError

    # s3fs turns a ClientError into an OSError (FileNotFoundError, ...) caused by it
    cause = e if isinstance(e, ClientError) else e.__cause__
    if isinstance(cause, ClientError):
        response = getattr(cause, "response", None) or {}
        code = (response.get("Error") or {}).get("Code")
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS
    return isinstance(e, tuple(s3fs.core.S3_RETRYABLE_ERRORS) + (
        BotoConnectionError, HTTPClientError, IncompleteReadError, aiohttp.ClientConnectionError,
        aiohttp.ClientPayloadError, ConnectionError, TimeoutError))


async def _with_retries(attempt):
    """Await `attempt()` until it succeeds, fails for good, or the policy's attempts are
    used up; the error raised carries `storage_attempts` (how many were made)."""
    policy = _policy
    failures = 0
    while True:
        try:
            return await attempt()
        except Exception as e:
            failures += 1
            if failures >= policy.attempts or not _transient(e):
                try:
                    e.storage_attempts = failures
                except AttributeError:  # pragma: no cover - exceptions with __slots__
                    pass
                raise
            await asyncio.sleep(_backoff(policy, failures))


class _BufferedBody:
    """A GET's body already read (inside the attempt), for s3fs code that reads it next."""

    def __init__(self, data: bytes):
        self._data, self._pos = data, 0

    async def read(self, amt=None):
        end = len(self._data) if amt is None or amt < 0 else self._pos + amt
        out = self._data[self._pos:end]
        self._pos += len(out)
        return out

    def close(self):
        pass


_S3_CLASS = None
_S3_CLASS_LOCK = threading.Lock()


def s3_filesystem_class():
    """`RetryingS3FileSystem`, made on first use (importing s3fs costs a noticeable time)."""
    global _S3_CLASS
    with _S3_CLASS_LOCK:
        if _S3_CLASS is None:
            _S3_CLASS = _make_s3_class()
    return _S3_CLASS


def _make_s3_class():
    from fsspec.asyn import sync_wrapper
    from s3fs import S3FileSystem

    class RetryingS3FileSystem(S3FileSystem):
        """s3fs with this module's retry policy as the one layer that retries.

        Every client call goes through `_call_s3`; s3fs's wrappers around it try once.
        A ranged GET (`S3File` reading a block, `cat_file` with start/end) has its
        body read within the attempt, so a connection cut mid-body is retried too.
        Whole-object GETs (`cat_file`, `get` without range) retry the request only.
        """

        retries = 1

        async def _call_s3(self, method, *akwarglist, **kwargs):
            call = super()._call_s3
            if method == "get_object" and "Range" in kwargs:
                async def attempt():
                    resp = await call(method, *akwarglist, **kwargs)
                    body = resp["Body"]
                    try:
                        data = await body.read()
                    finally:
                        body.close()
                    return {**resp, "Body": _BufferedBody(data)}
            else:
                async def attempt():
                    return await call(method, *akwarglist, **kwargs)
            return await _with_retries(attempt)

        # s3fs's blocking twin (used by S3File's uploads) wraps the base method; rebind
        call_s3 = sync_wrapper(_call_s3)

    RetryingS3FileSystem.__module__ = __name__
    RetryingS3FileSystem.__qualname__ = "RetryingS3FileSystem"
    return RetryingS3FileSystem


def __getattr__(name: str):
    if name == "RetryingS3FileSystem":  # so that pickled filesystems find their class
        return s3_filesystem_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
