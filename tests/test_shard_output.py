"""launch/make_shards.py and launch/make_synthetic.py write only into an empty folder (or
replace their own earlier shards with --overwrite), and refuse numbers that cannot work."""
from __future__ import annotations

import os
import runpy
import sys

import pytest
from PIL import Image

from conftest import ROOT
from data_pipeline.shards import iter_samples
from data_pipeline.storage import expand_shards


def run_script(name: str, args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """A launch script in this process (a subprocess spends seconds importing)."""
    monkeypatch.setattr(sys, "argv", [name, *args])
    try:
        runpy.run_path(os.path.join(ROOT, "launch", name), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def photos(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(5):
        Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(src / f"p{i}.png")
        (src / f"p{i}.txt").write_text(f"photo {i}")
    return src


def keys(folder) -> list[str]:
    return [s["__key__"] for u in expand_shards(str(folder)) for s in iter_samples(u)]


def test_make_shards_into_a_non_empty_folder_is_refused(photos, tmp_path, monkeypatch, capsys):
    """Before: a second run with another --per-shard left the first run's extra shards behind,
    so samples were read twice."""
    out = tmp_path / "out"
    code, _, _ = run_script("make_shards.py", ["--images", str(photos), "--out", str(out), "--per-shard", "1"],
                            monkeypatch, capsys)
    assert code == 0 and len(os.listdir(out)) == 5
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    code, _, err = run_script("make_shards.py", ["--images", str(photos), "--out", str(out), "--per-shard", "2"],
                              monkeypatch, capsys)
    assert code != 0
    assert err.strip().startswith(f"error: --out {out} is not empty (5 entries, e.g. data-000000.tar)")
    assert len(err.strip().splitlines()) == 1
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before  # untouched
    assert keys(out) == [f"{i:09d}" for i in range(5)]


def test_make_shards_overwrite_replaces_the_earlier_shards(photos, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    run_script("make_shards.py", ["--images", str(photos), "--out", str(out), "--per-shard", "1"], monkeypatch, capsys)
    (out / ".data-000009.tar.partial").write_bytes(b"left by a killed run")
    code, stdout, _ = run_script("make_shards.py", ["--images", str(photos), "--out", str(out), "--per-shard", "2",
                                                    "--overwrite"], monkeypatch, capsys)
    assert code == 0 and "wrote 5 samples in 3 shards" in stdout
    assert sorted(os.listdir(out)) == ["data-000000.tar", "data-000001.tar", "data-000002.tar"]
    assert keys(out) == [f"{i:09d}" for i in range(5)]  # each sample once


def test_overwrite_deletes_nothing_it_did_not_write(photos, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "other-000000.tar").write_bytes(b"")
    code, _, err = run_script("make_shards.py", ["--images", str(photos), "--out", str(out), "--overwrite"],
                              monkeypatch, capsys)
    assert code != 0 and "--overwrite deletes only earlier data-NNNNNN.tar shards" in err
    assert sorted(os.listdir(out)) == ["notes.txt", "other-000000.tar"]


@pytest.mark.parametrize("args, message", [
    (["--per-shard", "-3"], "--per-shard must be a positive number of samples (or 0: picked), got -3"),
    (["--prefix", "../up"], "--prefix '../up' must be a plain name"),
    (["--prefix", ""], "--prefix '' must be a plain name"),
])
def test_make_shards_refuses_numbers_and_names_that_cannot_work(args, message, photos, tmp_path, monkeypatch,
                                                                capsys):
    """Before: a negative --per-shard silently wrote every sample into one shard (0 now picks a size)."""
    out = tmp_path / "out"
    code, _, err = run_script("make_shards.py", ["--images", str(photos), "--out", str(out), *args],
                              monkeypatch, capsys)
    assert code != 0 and message in err
    assert not out.exists()


def test_make_synthetic_into_a_non_empty_folder_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "shapes"
    base = ["--out", str(out), "--num", "6", "--resolution", "8"]
    assert run_script("make_synthetic.py", base + ["--per-shard", "2"], monkeypatch, capsys)[0] == 0
    code, _, err = run_script("make_synthetic.py", base + ["--per-shard", "3"], monkeypatch, capsys)
    assert code != 0 and f"error: --out {out} is not empty (3 entries" in err
    assert len(os.listdir(out)) == 3
    code, _, _ = run_script("make_synthetic.py", base + ["--per-shard", "3", "--overwrite"], monkeypatch, capsys)
    assert code == 0 and sorted(os.listdir(out)) == ["shapes-000000.tar", "shapes-000001.tar"]
    assert keys(out) == [f"{i:08d}" for i in range(6)]


def test_make_shards_into_a_non_empty_s3_prefix_is_refused(photos, s3_bucket, monkeypatch, capsys):
    import s3fs

    bucket, endpoint = s3_bucket
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    out = f"{bucket}/photos"
    base = ["--images", str(photos), "--out", out, "--endpoint-url", endpoint]
    assert run_script("make_shards.py", base + ["--per-shard", "1"], monkeypatch, capsys)[0] == 0
    code, _, err = run_script("make_shards.py", base + ["--per-shard", "2"], monkeypatch, capsys)
    assert code != 0 and f"error: --out {out} is not empty (5 entries" in err
    code, _, _ = run_script("make_shards.py", base + ["--per-shard", "2", "--overwrite"], monkeypatch, capsys)
    assert code == 0
    fs.invalidate_cache()
    assert sorted(os.path.basename(p) for p in fs.ls(out[5:])) == ["data-000000.tar", "data-000001.tar",
                                                                    "data-000002.tar"]
