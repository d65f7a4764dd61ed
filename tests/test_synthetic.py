"""data_pipeline/synthetic.py and launch/make_synthetic.py: deterministic shards whose captions
say exactly what is drawn."""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import runpy
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipeline import synthetic
from data_pipeline.shards import iter_samples
from data_pipeline.storage import expand_shards
from conftest import PY, ROOT, run_cmd


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


# -- textures -------------------------------------------------------------------------------------

ALL = tuple(synthetic.TEXTURES)


def pixel_digest(seed: int, resolution: int, num: int) -> str:
    """sha256 over the decoded pixels, caption and json of samples 0..num-1 (not the PNG
    bytes, which a zlib or Pillow upgrade may change without changing the image)."""
    h = hashlib.sha256()
    for i in range(num):
        s = synthetic.sample(seed, i, resolution)
        h.update(pixels(s["png"]).astype(np.uint8).tobytes())
        h.update(s["txt"])
        h.update(s["json"])
    return h.hexdigest()


def test_default_output_is_what_it_was_before_textures():
    # Computed with the generator as it was before texture options existed.
    assert pixel_digest(0, 16, 50) == "a090efb7b2379e07484091835dd84f9f198d5b6996c6863aba165f8a10f8707d"
    assert pixel_digest(3, 32, 40) == "e6a250188929643811cd47af9d601b5125cf4cbc93af770639e60e37bcec4310"
    px = pixels(synthetic.sample(5, 7, 16)["png"])
    assert [px[0, 0].tolist(), px[8, 8].tolist(), px[15, 3].tolist(), int(px.sum())] == \
        [[0, 0, 0], [0, 0, 0], [0, 0, 0], 7662]
    assert synthetic.caption(synthetic.attributes(5, 7)) == "an orange triangle at the bottom right on a black background"
    # an all-flat list is the default: no texture keys, same bytes
    assert synthetic.sample(5, 7, 16, ("flat", "flat"), ("flat",)) == synthetic.sample(5, 7, 16)
    assert "texture" not in synthetic.attributes(5, 7)


def test_textures_are_deterministic_and_keep_the_scene():
    for index in range(20):
        a = synthetic.attributes(7, index, ALL, ALL)
        assert a == synthetic.attributes(7, index, ALL, ALL)
        assert synthetic.sample(7, index, 16, ALL, ALL) == synthetic.sample(7, index, 16, ALL, ALL)
        # textures come from their own random stream: the scene is the default one
        plain = synthetic.attributes(7, index)
        assert {k: a[k] for k in plain} == plain
        assert set(a) - set(plain) == {"texture", "texture_params", "background_texture", "background_texture_params"}
    noisy = [synthetic.sample(7, i, 16, ("noise",), ("noise",))["png"] for i in range(2)]
    assert noisy[0] != noisy[1]
    assert synthetic.sample(8, 0, 16, ("noise",))["png"] != synthetic.sample(7, 0, 16, ("noise",))["png"]
    # every texture is drawn from the list, on the shape and on the background
    seen = collections.Counter()
    for i in range(100):
        a = synthetic.attributes(0, i, ALL, ("stripes", "gradient"))
        seen[a["texture"]] += 1
        assert a["background_texture"] in ("stripes", "gradient")
    assert set(seen) == set(ALL)


@pytest.mark.parametrize("res", [16, 32, 64])
def test_textured_captions_parse_back_to_the_attributes(res):
    for index in range(60):
        a = synthetic.attributes(1, index, ALL, ALL)
        s = synthetic.sample(1, index, res, ALL, ALL)
        assert pixels(s["png"]).shape == (res, res, 3)
        assert json.loads(s["json"]) == a
        assert synthetic.parse_caption(s["txt"].decode()) == synthetic.labels(a)
    for index in range(30):  # captions without texture words read as flat
        a = synthetic.attributes(1, index)
        assert synthetic.parse_caption(synthetic.caption(a)) == {**synthetic.labels(a), "texture": "flat",
                                                                 "background_texture": "flat"}


def test_textured_caption_words():
    base = {"shape": "circle", "color": "red", "position": "top left", "background": "white",
            "background2": "white"}
    assert synthetic.caption({**base, "texture": "stripes"}) == "a red striped circle at the top left on a white background"
    assert synthetic.caption({**base, "color": "orange", "texture": "checkers", "background_texture": "noise",
                              "background2": "black", "position": "center"}) == \
        "an orange checkered circle at the center on a noisy white and black background"
    assert synthetic.caption({**base, "texture": "flat", "background_texture": "gradient"}) == \
        "a red circle at the top left on a gradient white background"
    assert synthetic.parse_caption("A  yellow noisy diamond at the bottom right on a checkered light blue background") == {
        "shape": "diamond", "color": "yellow", "position": "bottom right", "background": "light blue",
        "background2": "light blue", "texture": "noise", "background_texture": "checkers"}
    for bad in ("a red circle", "a pink circle at the top left on a white background",
                "a red wooden circle at the top left on a white background"):
        with pytest.raises(ValueError, match="does not follow the synthetic caption grammar"):
            synthetic.parse_caption(bad)


def test_unknown_texture_is_refused_naming_the_option():
    with pytest.raises(ValueError, match=r"--textures: unknown texture 'wood'; valid: flat, stripes, checkers, noise, gradient"):
        synthetic.parse_textures("flat,wood")
    with pytest.raises(ValueError, match="--background-textures: expected a comma-separated list"):
        synthetic.parse_textures("flat,,noise", "--background-textures")
    with pytest.raises(ValueError, match="background_textures: unknown texture 'Stripes'"):
        synthetic.attributes(0, 0, ALL, ("Stripes",))


def hf_energy(img: Image.Image) -> float:
    """Mean-square power of the grey image above half Nyquist (radial frequency > 0.25 cycles/px)."""
    g = np.asarray(img, dtype=np.float64).mean(2)
    power = np.abs(np.fft.fft2(g - g.mean())) ** 2 / g.size ** 2
    f = np.fft.fftfreq(g.shape[0])
    return float(power[np.hypot(f[None, :], f[:, None]) > 0.25].sum())


def mean_laplacian(img: Image.Image) -> float:
    px = np.asarray(img, dtype=np.float64)
    lap = 4 * px[1:-1, 1:-1] - px[:-2, 1:-1] - px[2:, 1:-1] - px[1:-1, :-2] - px[1:-1, 2:]
    return float(np.abs(lap).mean())


def interior_laplacian(attrs: dict, res: int) -> float:
    """Mean |Laplacian| in the 3x3 pixels at the shape's centre: zero for a flat fill."""
    px = np.asarray(synthetic.draw(attrs, res), dtype=np.float64)
    fx, fy = synthetic.POSITIONS[attrs["position"]]
    cx, cy = int((fx + attrs["jitter"][0]) * res), int((fy + attrs["jitter"][1]) * res)
    win = px[cy - 2:cy + 3, cx - 2:cx + 3]
    lap = 4 * win[1:-1, 1:-1] - win[:-2, 1:-1] - win[2:, 1:-1] - win[1:-1, :-2] - win[1:-1, 2:]
    return float(np.abs(lap).mean())


@pytest.mark.parametrize("res", [16, 32])
def test_background_textures_carry_high_frequency_energy(res):
    energy = {k: np.mean([hf_energy(synthetic.draw(synthetic.attributes(2, i, background_textures=(k,)), res))
                          for i in range(40)]) for k in ALL}
    for k in ("stripes", "checkers", "noise"):
        assert energy[k] > 2 * energy["flat"], (k, energy)
    # A ramp is low-frequency (the FFT would see the wrap-around step at the image border,
    # so the Laplacian judges it): no more detail than the flat image.
    lap = {k: np.mean([mean_laplacian(synthetic.draw(synthetic.attributes(2, i, background_textures=(k,)), res))
                       for i in range(40)]) for k in ("flat", "gradient", "stripes")}
    assert lap["gradient"] < 1.2 * lap["flat"] and lap["stripes"] > 3 * lap["flat"], lap


def test_shape_textures_carry_high_frequency_energy():
    res = 64  # shapes at least 19 px across: the 5x5 window at the centre stays inside
    detail = {k: [interior_laplacian(synthetic.attributes(2, i, textures=(k,)), res) for i in range(40)] for k in ALL}
    assert max(detail["flat"]) < 1.0, detail["flat"]
    for k in ("stripes", "checkers", "noise"):
        assert np.mean(detail[k]) > 20, (k, np.mean(detail[k]))
        assert min(detail[k]) > 10, (k, detail[k])
    assert np.mean(detail["gradient"]) < 5, np.mean(detail["gradient"])


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """launch/make_synthetic.py in this process (a subprocess spends seconds importing)."""
    monkeypatch.setattr(sys, "argv", ["make_synthetic.py", *args])
    try:
        runpy.run_path(os.path.join(ROOT, "launch", "make_synthetic.py"), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_writes_textured_shards(tmp_path, monkeypatch, capsys):
    code, out, _ = run_cli(["--out", str(tmp_path / "t"), "--num", "6", "--per-shard", "6", "--resolution", "16",
                            "--seed", "2", "--textures", "stripes,noise", "--background-textures", "checkers"],
                           monkeypatch, capsys)
    assert code == 0 and "wrote 6 images in 1 shards" in out
    got = [s for u in expand_shards(str(tmp_path / "t")) for s in iter_samples(u)]
    for i, s in enumerate(got):
        assert {k: v for k, v in s.items() if k != "__url__"} == \
            synthetic.sample(2, i, 16, ("stripes", "noise"), ("checkers",))
        assert "checkered" in s["txt"].decode()
    code, _, err = run_cli(["--out", str(tmp_path / "x"), "--num", "4", "--textures", "flat,wood"], monkeypatch, capsys)
    assert code != 0
    assert "--textures: unknown texture 'wood'; valid: flat, stripes, checkers, noise, gradient" in err
    assert not (tmp_path / "x").exists()
