"""The cache job's refusals that protect data already on disk: an output that would land on
its own input, and a rerun into a cache made with other settings."""
from __future__ import annotations

import json
import os
import posixpath

from braceexpand import braceexpand

from data_pipeline import storage

_WILDCARDS = "*?["


def _location(url: str, endpoint_url: str | None) -> tuple[str, str, str]:
    """(store, endpoint, path) normalised so that two spellings of one place compare equal:
    local paths absolute with symlinks resolved (file:// or not); s3/s3a the same store, on
    the endpoint the URL resolves to (the config's, else the environment's)."""
    if storage.is_local(url):
        path = url[len("file://"):] if url.startswith("file://") else url
        return "local", "", os.path.realpath(path)
    proto, rest = url.split("://", 1)
    endpoint = ""
    if proto in ("s3", "s3a", "s3n"):
        proto = "s3"
        endpoint = _canonical_endpoint(endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                                       or os.environ.get("AWS_ENDPOINT_URL") or "")
    return proto, endpoint, posixpath.normpath("/" + rest)


def _canonical_endpoint(endpoint: str) -> str:
    """An endpoint URL as scheme://address:port, the host resolved, so that two spellings of one
    server (127.0.0.1 and localhost, a name and its address) are one store (#27)."""
    import socket
    from urllib.parse import urlsplit

    if not endpoint:
        return ""
    parts = urlsplit(endpoint if "://" in endpoint else "http://" + endpoint)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return endpoint.rstrip("/")
    host = (parts.hostname or "").lower()
    try:
        host = sorted({info[4][0] for info in socket.getaddrinfo(host, port)})[0]
    except (OSError, UnicodeError, IndexError):
        pass
    return f"{parts.scheme}://{host}:{port}"


def output_is_an_input(inputs: list[str], names: list[str], data_endpoint_url: str | None, out_url: str,
                       out_endpoint_url: str | None) -> str | None:
    """The first input shard that an output shard (out_url/its name) would be, where the spelling alone
    did not tell (output_over_input): an input that is a link into out_url, an input whose name does not
    end in .tar, an object store spelt through two endpoints. None when none is."""
    for url, name in zip(inputs, names):
        if _location(url, data_endpoint_url) == _location(storage.join(out_url, name), out_endpoint_url):
            return url
    return None


def _input_folders(spec: str | list[str]) -> set[str]:
    """The folders an input spec reads from (as expand_shards splits and expands it): a
    directory itself (it is searched recursively), a shard's folder, a glob's fixed part."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    folders = set()
    for item in (s.strip() for entry in specs for s in entry.split(",") if s.strip()):
        for url in braceexpand(item):
            prefix, rest = url.split("://", 1) if "://" in url else ("", url)
            prefix = prefix + "://" if prefix else ""
            cut = min([rest.index(c) for c in _WILDCARDS if c in rest], default=-1)
            if cut >= 0 or rest.endswith(".tar"):  # a glob's fixed part, or a shard: their folder
                part = rest[:cut] if cut >= 0 else rest
                folder = part.rsplit("/", 1)[0] if "/" in part else ""
                folder = folder or ("/" if part.startswith("/") else "" if prefix else ".")
            else:  # a directory (searched recursively)
                folder = rest.rstrip("/") or ("/" if rest else "")
            folders.add(prefix + folder)
    return folders


def output_over_input(out_url: str, out_endpoint_url: str | None, data_urls: str | list[str],
                      data_endpoint_url: str | None) -> str | None:
    """The input folder that `out_url` is, or is inside of; None when they are apart.

    Output shards take the input shards' names, so an output in the input folder overwrites
    the input; one inside it (a directory input is searched recursively) is read back as
    input by the next run. Works on the spelling alone, so that --dry-run refuses it too.
    """
    if not out_url or not data_urls:
        return None
    out = _location(out_url, out_endpoint_url)
    for folder in sorted(_input_folders(data_urls)):
        store, endpoint, path = _location(folder, data_endpoint_url)
        if (store, endpoint) == out[:2] and (out[2] == path or out[2].startswith(path.rstrip("/") + "/")):
            return folder
    return None


def settings_mismatch(entry: dict, settings: dict, sidecar: str) -> str | None:
    """One line naming the first setting in which a finished shard's record differs from this
    job's, or None when it matches. A record without settings is from before they were kept."""
    shard = sidecar[:-len(".json")]
    recorded = entry.get("settings")
    if recorded is None:
        return (f"the finished shard {shard} records no settings (made by an older version): it cannot be "
                "reused safely; write the cache to a new out_url")
    for key, value in settings.items():
        if recorded.get(key) != value:
            return (f"the finished shard {shard} was made with {key}={recorded.get(key)!r}, this job has "
                    f"{key}={value!r}: a rerun into an existing cache must use its settings; write to a new "
                    "out_url (or delete the old cache)")
    return None


def other_slices_mismatch(out_url: str, out_endpoint_url: str | None, names: list[str], mine: set[str],
                          settings: dict) -> str | None:
    """A finished shard of another slice of this job made with other settings, found before this slice
    writes anything (#27: it used to write its shards, then refuse when writing the manifest). One
    listing and one sidecar read: the shards of one cache share their settings."""
    try:
        sidecars = storage.expand_shards(out_url, out_endpoint_url, suffix=".tar.json")
    except storage.DataError:  # none yet
        return None
    wanted = set(names) - mine
    for url in sidecars:
        if os.path.basename(url.split("://")[-1])[:-len(".json")] in wanted:
            return settings_mismatch(json.loads(storage.read_bytes(url, out_endpoint_url)), settings, url)
    return None


def place_of(spec: str) -> str:
    """A local folder as its real path, anything else (hub id, preset) as written."""
    return os.path.realpath(spec) if os.path.exists(spec) else spec.rstrip("/")
