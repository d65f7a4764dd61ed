"""Bad samples are set aside, not silently dropped: logged once, listed in a file, and
counted, so that a data set that is mostly broken stops the run instead of training on
what little is left."""
from __future__ import annotations

import json
import logging
import os

from .storage import DataError

log = logging.getLogger(__name__)


class Quarantine:
    """Appends `{"url", "key", "error"}` lines to `path` (one file per run; workers append
    whole lines, which O_APPEND keeps intact), and raises once failures exceed
    `max_error_rate` of the samples seen (counted from `min_samples` on, so that the
    first bad sample of a run is not already 100%)."""

    def __init__(self, path: str, max_error_rate: float = 0.01, min_samples: int = 1000):
        self.path, self.max_error_rate, self.min_samples = path, max_error_rate, min_samples
        self.failed = self.seen = 0
        self._known: set | None = None

    def ok(self, n: int = 1) -> None:
        self.seen += n

    def __call__(self, url: str, key: str | None, message: str) -> None:
        if self._known is None:  # entries from before a restart: report each failure once
            self._known = set()
            if os.path.exists(self.path):
                with open(self.path) as f:
                    self._known = {(e["url"], e["key"]) for e in map(json.loads, filter(str.strip, f))}
        self.failed += 1
        self.seen += 1
        if (url, key) not in self._known:
            self._known.add((url, key))
            log.warning("quarantined %s:%s: %s", url, key, message)
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"url": url, "key": key, "error": message}) + "\n")
        if self.failed > self.max_error_rate * max(self.seen, self.min_samples):
            raise DataError(f"{self.failed} of {self.seen} samples failed, more than max_error_rate="
                            f"{self.max_error_rate}; the failures are listed in {self.path}")
