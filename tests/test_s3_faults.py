"""S3 reads under injected faults: throttling (503 SlowDown) and broken connections.

A small proxy on 127.0.0.1 forwards every request to the moto server of conftest and fails
chosen requests for objects; shards are read through it with `iter_samples`. With at most
`attempts - 1` failures of a request the read must give every sample, byte-identical;
with more it must raise a DataError naming the shard URL, never end early in silence.
The proxy counts the requests, so the tests see that the retries happened, and how many.
Only loopback is used; the backoff is shortened so that the whole file takes seconds.
"""
from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from data_pipeline import s3, storage
from data_pipeline.shards import iter_samples, write_shards
from data_pipeline.storage import DataError, StorageReadError

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "content-length"}
SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message><RequestId>FAULT</RequestId></Error>")
UNAVAILABLE = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
               b"<Message>Service is unable to handle request.</Message><RequestId>FAULT</RequestId></Error>")


class FaultProxy:
    """Forwards HTTP requests to `upstream`; fails the requests for objects (not listings)
    with the planned method whose number (0, 1, ..., counted from the last `plan`) is in the
    plan, in one of these ways:

    slowdown:    HTTP 503 with S3's SlowDown error document (a HEAD: 503 without a body)
    unavailable: HTTP 503 ServiceUnavailable
    reset:       the connection is reset (RST) before any response
    cut:         status, headers and half of the body, then a reset (GET only)
    """

    def __init__(self, upstream: str):
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.lock = threading.Lock()
        self.plan("slowdown", ())
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                proxy.handle(self)

            do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def plan(self, mode: str, fail, method: str = "GET"):
        with self.lock:
            self.mode, self.fail, self.method = mode, set(fail), method
            self.log: dict[str, list[tuple[str, bool]]] = {"GET": [], "HEAD": [], "PUT": []}

    @property
    def gets(self) -> list[tuple[str, bool]]:
        """(path, failed) for each GET of an object since the last plan."""
        return self.log["GET"]

    @property
    def heads(self):
        return self.log["HEAD"]

    @property
    def puts(self):
        return self.log["PUT"]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    @staticmethod
    def _is_object(path: str) -> bool:
        bare, _, query = path.partition("?")
        return len([p for p in bare.split("/") if p]) >= 2 and "list-type" not in query

    def handle(self, h: BaseHTTPRequestHandler):
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        fail = False
        if h.command in self.log and self._is_object(h.path):
            with self.lock:
                log = self.log[h.command]
                fail = h.command == self.method and len(log) in self.fail
                log.append((h.path, fail))
        if fail and h.command == "HEAD" and self.mode != "reset":
            return self._send(h, 503, "Slow Down", {}, b"")
        if fail and self.mode in ("slowdown", "unavailable"):
            return self._send(h, 503, "Slow Down", {"Content-Type": "application/xml"},
                              SLOWDOWN if self.mode == "slowdown" else UNAVAILABLE)
        if fail and self.mode == "reset":
            return self._reset(h)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_BY_HOP}
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
            size = resp.getheader("Content-Length") if h.command == "HEAD" else str(len(data))
        finally:
            conn.close()
        h.send_response_only(resp.status, resp.reason)
        for k, v in out:
            h.send_header(k, v)
        if size is not None:
            h.send_header("Content-Length", size)
        h.end_headers()
        if h.command != "HEAD":
            if fail:  # "cut"
                h.wfile.write(data[: len(data) // 2])
                return self._reset(h)
            h.wfile.write(data)

    @staticmethod
    def _send(h, status, reason, headers, body):
        h.send_response_only(status, reason)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    @staticmethod
    def _reset(h):
        """Close with SO_LINGER 0: the peer gets a TCP RST, not an orderly end."""
        h.close_connection = True
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.rfile.close()  # drops the makefile reference, so that close() really closes
        h.connection.close()


BACKOFF = 0.01  # s: the default (0.2) would only make the tests slower


@pytest.fixture(autouse=True)
def policy():
    """The default number of attempts (5) with a short backoff for every test, restored
    afterwards. (fsspec's cached filesystems are kept: each proxy has its own URL, so
    its filesystem is new; the one for moto itself is worth reusing.)"""
    previous = storage.configure(backoff_s=BACKOFF)
    yield
    storage.configure(previous.attempts, previous.backoff_s, previous.block_size)


@pytest.fixture(autouse=True, scope="module")
def no_cached_filesystems():
    yield
    s3.RetryingS3FileSystem.clear_instance_cache()  # they hold connections to stopped proxies


@pytest.fixture
def proxy(s3_endpoint):
    p = FaultProxy(s3_endpoint)
    yield p
    p.stop()


def make_samples(n: int, size: int, seed: int = 5) -> list[dict]:
    rng = random.Random(seed)
    return [{"__key__": f"{i:06d}", "bin": rng.randbytes(size), "txt": f"sample {i}".encode()} for i in range(n)]


def shard(s3_bucket, samples) -> str:
    bucket, endpoint = s3_bucket
    (url,) = write_shards(samples, f"{bucket}/faults", per_shard=len(samples), endpoint_url=endpoint)
    return url


def plain(got: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in got]


def read_until_error(url: str, endpoint: str):
    """(samples yielded, exception raised or None)."""
    got = []
    try:
        for s in iter_samples(url, endpoint):
            got.append(s)
    except Exception as e:  # noqa: BLE001 - the caller checks the kind
        return got, e
    return got, None


SENDS = {"reset": 2}  # requests on the wire per attempt, by kind of failure


# -- a whole small shard in one GET ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["slowdown", "unavailable", "reset", "cut"])
def test_three_failures(s3_bucket, proxy, mode):
    samples = make_samples(8, 1500)
    url = shard(s3_bucket, samples)
    proxy.plan(mode, range(3))
    got = list(iter_samples(url, proxy.url))
    assert plain(got) == samples
    assert all(s["__url__"] == url for s in got)
    # one GET for the whole (small) object: three failed, the fourth served it (for resets
    # that is two of our attempts, see SENDS)
    assert [failed for _, failed in proxy.gets] == [True, True, True, False]
    assert {path for path, _ in proxy.gets} == {"/" + url[len("s3://"):]}


@pytest.mark.parametrize("mode", ["slowdown", "reset"])
def test_ten_failures(s3_bucket, proxy, mode):
    url = shard(s3_bucket, make_samples(8, 1500))
    proxy.plan(mode, range(10))
    got, err = read_until_error(url, proxy.url)
    assert isinstance(err, DataError), err
    assert str(err).startswith(f"reading {url} failed: ")
    if mode == "slowdown":
        assert "reduce your request rate" in str(err)
    assert "(gave up after 5 attempts)" in str(err)
    assert got == []
    # the configured 5 attempts, no more; aiohttp itself sends a request once more when the
    # connection dies before any response (meant for stale keep-alive connections)
    assert [failed for _, failed in proxy.gets] == [True] * 5 * SENDS.get(mode, 1)


@pytest.mark.parametrize("attempts,ok", [(2, False), (4, True)])
def test_attempts_config(s3_bucket, proxy, attempts, ok):
    samples = make_samples(4, 800)
    url = shard(s3_bucket, samples)
    storage.configure(attempts=attempts, backoff_s=BACKOFF)
    proxy.plan("slowdown", range(3))
    got, err = read_until_error(url, proxy.url)
    if ok:
        assert err is None and plain(got) == samples
        assert len(proxy.gets) == 4
    else:
        assert isinstance(err, DataError) and str(err).startswith(f"reading {url} failed: ")
        assert got == [] and len(proxy.gets) == attempts


def test_throttled_open(s3_bucket, proxy):
    """A HEAD (opening the object) answered 503 with no body, as S3 does: retried too, and
    after the attempts it is a DataError naming the URL."""
    samples = make_samples(3, 500)
    url = shard(s3_bucket, samples)
    proxy.plan("slowdown", range(10), method="HEAD")
    with pytest.raises(DataError) as e:
        list(iter_samples(url, proxy.url))
    assert str(e.value).startswith(f"cannot open {url}: ")
    assert "(gave up after 5 attempts)" in str(e.value)
    assert len(proxy.heads) == 5 and proxy.gets == []


def test_read_bytes_named(s3_bucket, proxy):
    bucket, endpoint = s3_bucket
    url = f"{bucket}/faults/blob.bin"
    storage.write_bytes_atomic(url, b"x" * 1000, endpoint)
    proxy.plan("reset", range(3))
    assert storage.read_bytes(url, proxy.url) == b"x" * 1000
    proxy.plan("cut", range(10))
    with pytest.raises(StorageReadError) as e:
        storage.read_bytes(url, proxy.url)
    assert str(e.value).startswith(f"reading {url} failed: ")
    assert len(proxy.gets) == 5


# -- failures in the middle of a stream of ranged GETs -----------------------------------------------------

BLOCK = 64 * 1024


@pytest.fixture
def big_shard(s3_bucket):
    samples = make_samples(24, 24 * 1024, seed=9)  # ~600 KB: about 8 ranged GETs of 64 KiB + 10 KiB
    return shard(s3_bucket, samples), samples


@pytest.mark.parametrize("mode", ["slowdown", "reset", "cut"])
def test_midstream_retried(big_shard, proxy, mode):
    url, samples = big_shard
    storage.configure(backoff_s=BACKOFF, block_size=BLOCK)
    proxy.plan(mode, {1, 2, 3})  # the first range is served, the second fails three times
    got = list(iter_samples(url, proxy.url))
    assert plain(got) == samples
    outcomes = [failed for _, failed in proxy.gets]
    assert outcomes[:5] == [False, True, True, True, False]
    assert not any(outcomes[5:]) and len(outcomes) >= 7  # many ranged GETs, not one


@pytest.mark.parametrize("mode", ["slowdown", "cut"])
def test_midstream_gives_up(big_shard, proxy, mode):
    url, samples = big_shard
    storage.configure(backoff_s=BACKOFF, block_size=BLOCK)
    proxy.plan(mode, range(1, 11))
    got, err = read_until_error(url, proxy.url)
    assert isinstance(err, DataError), err
    assert str(err).startswith(f"reading {url} failed: ")
    assert " @ " not in str(err)  # webdataset's annotation of exceptions does not garble it
    # what came before the failing range came out, then the error: no sample skipped
    assert 0 < len(got) < len(samples)
    assert plain(got) == samples[: len(got)]
    assert [failed for _, failed in proxy.gets] == [False] + [True] * 5


def test_configure():
    with pytest.raises(ValueError):
        storage.configure(attempts=0)
    with pytest.raises(ValueError):
        storage.configure(backoff_s=-1)
    with pytest.raises(ValueError):
        storage.configure(block_size=0)
    previous = storage.configure(attempts=7, backoff_s=0.5, block_size=BLOCK)
    assert previous == storage.RetryPolicy(5, BACKOFF, None)
    assert storage.retry_policy() == storage.RetryPolicy(7, 0.5, BLOCK)
    # botocore's own retries are off: ours are the only ones
    opts = storage.storage_options("s3://b/x.tar", "http://127.0.0.1:1")
    assert opts["config_kwargs"]["retries"]["total_max_attempts"] == 1
    fs, path = storage.filesystem("s3://b/x.tar", "http://127.0.0.1:1")
    assert isinstance(fs, s3.RetryingS3FileSystem) and path == "b/x.tar"
    assert fs.retries == 1
    assert storage.storage_options("/local/x.tar") == {}


def test_missing_not_retried(s3_bucket, proxy):
    bucket, _ = s3_bucket
    url = f"{bucket}/faults/none.tar"
    with pytest.raises(DataError) as e:
        list(iter_samples(url, proxy.url))
    assert str(e.value) == f"shard not found: {url}"
    assert len(proxy.heads) == 1


@pytest.mark.parametrize("mode", ["slowdown", "reset"])
def test_writes_retried(s3_bucket, proxy, mode):
    """PUTs are retried as well: a single PUT (pipe_file) and the upload of a file opened for
    writing (S3File, which goes through s3fs's blocking `call_s3`)."""
    bucket, endpoint = s3_bucket
    proxy.plan(mode, range(3), method="PUT")
    storage.write_bytes_atomic(f"{bucket}/w/a.bin", b"a" * 100, proxy.url)
    assert [failed for _, failed in proxy.puts] == [True, True, True, False]
    proxy.plan(mode, range(3), method="PUT")
    with storage.open_url(f"{bucket}/w/b.bin", "wb", proxy.url) as f:
        f.write(b"b" * 100)
    assert [failed for _, failed in proxy.puts] == [True, True, True, False]
    assert storage.read_bytes(f"{bucket}/w/a.bin", endpoint) == b"a" * 100
    assert storage.read_bytes(f"{bucket}/w/b.bin", endpoint) == b"b" * 100


def test_filesystem_pickles(s3_endpoint):
    import pickle

    fs, _ = storage.filesystem("s3://b/x.tar", s3_endpoint)
    again = pickle.loads(pickle.dumps(fs))
    assert type(again) is s3.RetryingS3FileSystem and again.storage_options == fs.storage_options
    err = pickle.loads(pickle.dumps(StorageReadError("reading s3://b/x.tar failed: boom")))
    assert str(err) == "reading s3://b/x.tar failed: boom"
