"""Corrupt input through the loader: exactly the intact samples come out, each failure is
logged once and listed in the quarantine file, and too many failures stop the run."""
import io
import json
import logging
import os

import pytest
from PIL import Image

from data_pipeline.images import image_and_caption
from data_pipeline.loader import ShardBatches, make_loader
from data_pipeline.quarantine import Quarantine
from data_pipeline.shards import ShardWriter
from data_pipeline.storage import DataError


def png(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def decode(sample):
    image_and_caption(sample, 8)
    return {"key": sample["__key__"]}


def raw_tar(path, members):
    """A tar written member by member, to make what ShardWriter refuses to write."""
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def corrupt_set(tmp_path):
    """Shards mixing intact samples with every kind of damage; returns (urls, intact keys)."""
    root, urls, intact = tmp_path / "shards", [], []
    root.mkdir()

    def good(name):
        intact.append(name)
        return {"__key__": name, "png": png(), "txt": b"a red square"}

    with ShardWriter(str(root / "a.tar")) as w:  # corrupt JPEG, missing image, missing caption
        w.write(good("a0"))
        w.write({"__key__": "a1", "jpg": jpeg()[:40], "txt": b"cut"})
        w.write({"__key__": "a2", "txt": b"no image"})
        w.write({"__key__": "a3", "png": png()})
        w.write(good("a4"))
    # Duplicate member, unsafe member names, then an intact sample.
    raw_tar(root / "b.tar", [("b0.png", png()), ("b0.txt", b"x"), ("b0.png", png()),
                             ("../evil.png", png()), ("../evil.txt", b"x"),
                             ("/abs.png", png()), ("/abs.txt", b"x"),
                             ("b1.png", png()), ("b1.txt", b"ok")])
    intact.append("b1")
    with ShardWriter(str(root / "c.tar")) as w:  # truncated inside its third sample
        for i in range(4):
            w.write({"__key__": f"c{i}", "png": png(), "txt": b"x" * 3000})
    import tarfile

    c2_caption = [m for m in tarfile.open(root / "c.tar") if m.name == "c2.txt"][0]
    data = (root / "c.tar").read_bytes()
    (root / "c.tar").write_bytes(data[: c2_caption.offset_data + 100])
    intact += ["c0", "c1"]
    (root / "d.tar").write_bytes(os.urandom(5000))  # random bytes
    (root / "e.tar").write_bytes(b"")  # empty
    with ShardWriter(str(root / "f.tar")) as w:
        w.write(good("f0"))
    return [str(root / n) for n in ("a.tar", "b.tar", "c.tar", "d.tar", "e.tar", "f.tar")], intact


def test_loader_yields_exactly_the_intact_samples_and_quarantines_the_rest(corrupt_set, tmp_path, caplog):
    urls, intact = corrupt_set
    qfile = tmp_path / "run" / "quarantine.jsonl"
    ds = ShardBatches(urls, decode, 3, num_workers=0, shuffle=False,
                      quarantine=Quarantine(str(qfile), max_error_rate=1.0))
    keys = []
    with caplog.at_level(logging.WARNING, logger="data_pipeline.quarantine"):
        for batch in make_loader(ds):
            if batch["epoch"] > 0:
                break
            keys += [k for k, w in zip(batch["key"], batch["loss_weight"]) if w > 0]  # fill weighs 0
    assert sorted(keys) == sorted(intact)
    entries = [json.loads(line) for line in qfile.read_text().splitlines()]
    got = {(os.path.basename(e["url"]), e["key"]) for e in entries}
    assert got == {("a.tar", "a1"), ("a.tar", "a2"), ("a.tar", "a3"), ("b.tar", "b0"), ("b.tar", "../evil"),
                   ("b.tar", "/abs"), ("c.tar", None), ("d.tar", None), ("e.tar", None)}
    assert len(entries) == len(got)  # each failure once
    assert sum("quarantined" in r.message for r in caplog.records) == len(got)
    assert any("unreadable after c1" in e["error"] for e in entries)
    assert all(str(tmp_path) in os.path.abspath(e["url"]) for e in entries)


def test_failures_are_reported_once_across_a_restart(corrupt_set, tmp_path):
    urls, _ = corrupt_set
    qfile = tmp_path / "quarantine.jsonl"
    for _ in range(2):  # the second pass is a restarted run reading the same epoch again
        ds = ShardBatches(urls, decode, 3, num_workers=0, shuffle=False, quarantine=Quarantine(str(qfile), 1.0))
        for batch in make_loader(ds):
            if batch["epoch"] > 0:
                break
    assert len(qfile.read_text().splitlines()) == 9


def test_too_many_failures_stop_with_a_clear_error(corrupt_set, tmp_path):
    urls, _ = corrupt_set
    qfile = tmp_path / "quarantine.jsonl"
    ds = ShardBatches(urls, decode, 3, num_workers=0, shuffle=False,
                      quarantine=Quarantine(str(qfile), max_error_rate=0.01, min_samples=5))
    with pytest.raises(DataError, match=rf"samples failed, more than max_error_rate=0.01; the failures are listed in {qfile}"):
        for _ in make_loader(ds):
            pass


def test_without_a_quarantine_the_first_failure_is_an_error(corrupt_set):
    urls, _ = corrupt_set
    ds = ShardBatches(urls, decode, 2, num_workers=0, shuffle=False)
    with pytest.raises(DataError, match="a.tar:a1"):
        for _ in make_loader(ds):
            pass
