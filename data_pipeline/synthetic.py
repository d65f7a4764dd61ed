"""The embedded default data: coloured shapes with captions that say exactly what is drawn.

Every image is a pure function of (seed, index), so the same command always writes the
same shards, and the captions are exact, so a generated image can be checked against
its prompt.
"""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
    "yellow": (240, 210, 20), "purple": (140, 40, 180), "orange": (245, 130, 20),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "light blue": (150, 190, 240)}
# Position name -> centre as a fraction of the image side.
POSITIONS = {
    "top left": (0.27, 0.27), "top right": (0.73, 0.27), "center": (0.5, 0.5),
    "bottom left": (0.27, 0.73), "bottom right": (0.73, 0.73),
}
SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges without extra code


def attributes(seed: int, index: int) -> dict:
    """The random choices behind sample `index`: shape, colour, position, background."""
    rng = np.random.default_rng([seed, index])
    bgs = list(BACKGROUNDS)
    bg = bgs[rng.integers(len(bgs))]
    # Two-tone backgrounds split the image vertically: left colour, right colour.
    bg2 = bgs[rng.integers(len(bgs))] if rng.random() < 0.25 else bg
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "color": list(COLORS)[rng.integers(len(COLORS))],
        "position": list(POSITIONS)[rng.integers(len(POSITIONS))],
        "background": bg,
        "background2": bg2,
        "size": float(rng.uniform(0.30, 0.40)),  # shape extent as a fraction of the side
        "jitter": [float(v) for v in rng.uniform(-0.03, 0.03, size=2)],
    }


def caption(attrs: dict) -> str:
    place = "at the center" if attrs["position"] == "center" else f"at the {attrs['position']}"
    if attrs["background2"] != attrs["background"]:
        ground = f"on a {attrs['background']} and {attrs['background2']} background"
    else:
        ground = f"on a {attrs['background']} background"
    article = "an" if attrs["color"][0] in "aeiou" else "a"
    return f"{article} {attrs['color']} {attrs['shape']} {place} {ground}"


def draw(attrs: dict, resolution: int) -> Image.Image:
    side = resolution * SUPERSAMPLE
    img = Image.new("RGB", (side, side), BACKGROUNDS[attrs["background"]])
    d = ImageDraw.Draw(img)
    if attrs["background2"] != attrs["background"]:
        d.rectangle([side // 2, 0, side, side], fill=BACKGROUNDS[attrs["background2"]])
    fx, fy = POSITIONS[attrs["position"]]
    cx, cy = (fx + attrs["jitter"][0]) * side, (fy + attrs["jitter"][1]) * side
    r = attrs["size"] * side / 2
    fill = COLORS[attrs["color"]]
    if attrs["shape"] == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif attrs["shape"] == "square":
        s = r * 0.9
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif attrs["shape"] == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    else:  # diamond
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS)


def sample(seed: int, index: int, resolution: int) -> dict:
    """One WebDataset sample: `png`, `txt` caption and `json` attributes, as bytes."""
    attrs = attributes(seed, index)
    buf = io.BytesIO()
    draw(attrs, resolution).save(buf, format="PNG")
    return {
        "__key__": f"{index:08d}",
        "png": buf.getvalue(),
        "txt": caption(attrs).encode(),
        "json": json.dumps(attrs, sort_keys=True).encode(),
    }
