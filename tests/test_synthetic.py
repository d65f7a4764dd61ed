"""data_pipeline/synthetic.py and launch/make_synthetic.py: deterministic shards whose captions
say exactly what is drawn."""
from __future__ import annotations

import collections
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_pipeline import synthetic
from data_pipeline.shards import iter_samples
from data_pipeline.storage import expand_shards
from conftest import PY, run_cmd


def make(out, seed: int, num: int = 40, per_shard: int = 16, resolution: int = 32):
    proc = run_cmd([PY, "launch/make_synthetic.py", "--out", str(out), "--num", str(num),
                    "--per-shard", str(per_shard), "--resolution", str(resolution), "--seed", str(seed)],
                   timeout=120)
    assert f"wrote {num} images in {-(-num // per_shard)} shards to {out}" in proc.stdout
    return proc


def shard_files(out) -> dict[str, bytes]:
    return {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))}


def pixels(png: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(png))
    assert img.mode == "RGB"
    return np.asarray(img, dtype=np.int16)


@pytest.fixture(scope="module")
def seed3(tmp_path_factory):
    out = tmp_path_factory.mktemp("seed3")
    make(out, seed=3)
    return str(out)


def test_same_seed_gives_byte_identical_shards(seed3, tmp_path):
    make(tmp_path, seed=3)
    first, second = shard_files(seed3), shard_files(tmp_path)
    assert list(first) == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"]
    assert list(second) == list(first)
    for name in first:
        assert first[name] == second[name], name


def test_shards_hold_what_the_module_draws(seed3):
    samples = [s for u in expand_shards(seed3) for s in iter_samples(u)]
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(40)]
    for i, s in enumerate(samples):
        want = synthetic.sample(3, i, 32)
        assert {k: v for k, v in s.items() if k != "__url__"} == want
        assert json.loads(s["json"]) == synthetic.attributes(3, i)
        assert s["txt"].decode() == synthetic.caption(synthetic.attributes(3, i))
        assert Image.open(io.BytesIO(s["png"])).size == (32, 32)


def test_different_seed_gives_different_images(seed3, tmp_path):
    make(tmp_path, seed=4)
    a = [s for u in expand_shards(seed3) for s in iter_samples(u)]
    b = [s for u in expand_shards(str(tmp_path)) for s in iter_samples(u)]
    assert [s["__key__"] for s in a] == [s["__key__"] for s in b]
    assert all(x["png"] != y["png"] for x, y in zip(a, b))
    assert sum(x["txt"] != y["txt"] for x, y in zip(a, b)) >= 30
    assert shard_files(seed3)["shapes-000000.tar"] != shard_files(tmp_path)["shapes-000000.tar"]


def test_bad_arguments_are_refused(tmp_path):
    proc = run_cmd([PY, "launch/make_synthetic.py", "--out", str(tmp_path / "x"), "--num", "0"],
                   check=False, timeout=120)
    assert proc.returncode != 0
    assert "--num and --per-shard must be positive" in proc.stderr
    assert not (tmp_path / "x").exists()


# -- the caption matches the drawing --------------------------------------------------------------

def far_corners(position: str, res: int) -> list[tuple[int, int]]:
    """Corner pixels (x, y) the shape cannot reach: all four for the centre, else the three
    corners other than the one nearest to the shape."""
    corners = [(0, 0), (res - 1, 0), (0, res - 1), (res - 1, res - 1)]
    if position == "center":
        return corners
    fx, fy = synthetic.POSITIONS[position]
    near = (0 if fx < 0.5 else res - 1, 0 if fy < 0.5 else res - 1)
    return [c for c in corners if c != near]


@pytest.mark.parametrize("seed", [0, 1])
def test_pixels_match_the_caption(seed):
    res = 64
    seen = collections.Counter()
    for index in range(150):
        attrs = synthetic.attributes(seed, index)
        s = synthetic.sample(seed, index, res)
        assert s["txt"].decode() == synthetic.caption(attrs)
        px = pixels(s["png"])
        assert px.shape == (res, res, 3)
        fx, fy = synthetic.POSITIONS[attrs["position"]]
        cx = int((fx + attrs["jitter"][0]) * res)
        cy = int((fy + attrs["jitter"][1]) * res)
        centre = px[cy, cx]
        want = np.array(synthetic.COLORS[attrs["color"]])
        assert np.abs(centre - want).max() <= 6, (index, attrs, centre.tolist())
        for x, y in far_corners(attrs["position"], res):
            bg = attrs["background"] if x < res // 2 else attrs["background2"]
            got = px[y, x]
            assert np.abs(got - np.array(synthetic.BACKGROUNDS[bg])).max() <= 2, (index, attrs, (x, y), got.tolist())
        seen["two-tone" if attrs["background2"] != attrs["background"] else "plain"] += 1
        seen[attrs["shape"]] += 1
        seen[attrs["color"]] += 1
        seen[attrs["position"]] += 1
    # the checks above covered every kind of drawing
    for name in (*synthetic.SHAPES, *synthetic.COLORS, *synthetic.POSITIONS, "two-tone", "plain"):
        assert seen[name] > 0, name


def test_caption_words():
    base = {"shape": "circle", "position": "top left", "background": "white", "background2": "white"}
    assert synthetic.caption({**base, "color": "orange"}) == "an orange circle at the top left on a white background"
    assert synthetic.caption({**base, "color": "red"}) == "a red circle at the top left on a white background"
    assert synthetic.caption({**base, "color": "yellow", "shape": "diamond", "position": "center",
                              "background": "light blue", "background2": "black"}) == \
        "a yellow diamond at the center on a light blue and black background"
    assert synthetic.caption({**base, "color": "purple", "shape": "triangle", "position": "bottom right",
                              "background": "gray", "background2": "gray"}) == \
        "a purple triangle at the bottom right on a gray background"


def test_attributes_are_a_pure_function_of_seed_and_index():
    assert synthetic.attributes(7, 12) == synthetic.attributes(7, 12)
    assert synthetic.sample(7, 12, 16) == synthetic.sample(7, 12, 16)
    assert synthetic.attributes(7, 12) != synthetic.attributes(7, 13)
    assert synthetic.attributes(7, 12) != synthetic.attributes(8, 12)
    a = synthetic.attributes(7, 12)
    assert 0.30 <= a["size"] <= 0.40 and all(-0.03 <= j <= 0.03 for j in a["jitter"])
