"""The embedded default data: coloured shapes with captions that say exactly what is drawn.

Every image is a pure function of (seed, index), so the same command always writes the
same shards, and the captions are exact, so a generated image can be checked against
its prompt (`parse_caption` reads a caption back into the attributes it names).

Textures. By default every fill is flat. `textures` (the shape's fill) and
`background_textures` (the background's fill) are lists drawn from per image, so that
high-frequency detail exists for an autoencoder to keep or lose:

* ``flat``     one colour (the default; default outputs are byte-identical to before textures)
* ``stripes``  parallel stripes, 0/45/90/135 degrees, period 2.5-4 output pixels
* ``checkers`` an axis-aligned checkerboard, cells 1.5-2.5 output pixels
* ``noise``    independent per-output-pixel noise, seeded per image
* ``gradient`` a linear ramp across the shape or the image, any direction (low frequency)

A pattern alternates between the colour and a second tone of it (`second_tone`: light
colours darkened, dark ones lightened), so the colour stays the one the caption names.
Texture scales are in output pixels, not fractions of the side, because the point is detail
near the pixel scale; shapes and positions stay fractions of the side at every resolution.

Caption grammar (brackets: present only when not flat / two-tone)::

    ARTICLE COLOR [SHAPE_TEXTURE] SHAPE "at the" POSITION "on" ARTICLE [BG_TEXTURE] BG ["and" BG2] "background"

with ARTICLE "an" before a vowel, else "a", and texture words striped / checkered / noisy /
gradient, e.g. "a red striped circle at the top left on a checkered white background".
"""
from __future__ import annotations

import io
import json
import math
import re
from typing import Sequence

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

# Texture option name -> the caption word for it ("" : not mentioned).
TEXTURES = {"flat": "", "stripes": "striped", "checkers": "checkered", "noise": "noisy", "gradient": "gradient"}
DEFAULT_TEXTURES = ("flat",)

# Every categorical attribute a caption names, with its vocabulary (the classifier's heads).
LABELS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
    "background2": tuple(BACKGROUNDS),  # the right half's colour; == background when plain
    "texture": tuple(TEXTURES),
    "background_texture": tuple(TEXTURES),
}


def parse_textures(text: str | Sequence[str], option: str = "--textures") -> tuple[str, ...]:
    """A texture list from "flat,stripes" (or a sequence); repeats weight the draw.
    Unknown names are a one-line ValueError naming `option` and the valid values."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else [str(n).strip() for n in text]
    if not names or any(not n for n in names):
        raise ValueError(f"{option}: expected a comma-separated list of {', '.join(TEXTURES)}; got {text!r}")
    for n in names:
        if n not in TEXTURES:
            raise ValueError(f"{option}: unknown texture {n!r}; valid: {', '.join(TEXTURES)}")
    return tuple(names)


def _texture_params(kind: str, rng: np.random.Generator) -> dict:
    """The per-image parameters of one fill: orientation, scale, phase, noise seed."""
    if kind == "stripes":
        return {"angle_deg": int(rng.choice([0, 45, 90, 135])), "period_px": float(rng.uniform(2.5, 4.0)),
                "phase": float(rng.random())}
    if kind == "checkers":
        return {"cell_px": float(rng.uniform(1.5, 2.5)), "phase": [float(v) for v in rng.random(2)]}
    if kind == "noise":
        return {"noise_seed": int(rng.integers(2**31))}
    if kind == "gradient":
        return {"angle_deg": float(rng.uniform(0.0, 360.0))}
    return {}


def attributes(seed: int, index: int, textures: Sequence[str] = DEFAULT_TEXTURES,
               background_textures: Sequence[str] = DEFAULT_TEXTURES) -> dict:
    """The random choices behind sample `index`: shape, colour, position, background, and
    (only when a texture list holds more than "flat") the fills and their parameters.

    Texture choices come from their own random streams, so the scene (shape, colour,
    position, size...) of (seed, index) is the same whatever the texture options."""
    textures = parse_textures(textures, "textures")
    background_textures = parse_textures(background_textures, "background_textures")
    rng = np.random.default_rng([seed, index])
    bgs = list(BACKGROUNDS)
    bg = bgs[rng.integers(len(bgs))]
    # Two-tone backgrounds split the image vertically: left colour, right colour.
    bg2 = bgs[rng.integers(len(bgs))] if rng.random() < 0.25 else bg
    attrs = {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "color": list(COLORS)[rng.integers(len(COLORS))],
        "position": list(POSITIONS)[rng.integers(len(POSITIONS))],
        "background": bg,
        "background2": bg2,
        "size": float(rng.uniform(0.30, 0.40)),  # shape extent as a fraction of the side
        "jitter": [float(v) for v in rng.uniform(-0.03, 0.03, size=2)],
    }
    if set(textures) | set(background_textures) != {"flat"}:
        for key, choices, stream in (("texture", textures, 1), ("background_texture", background_textures, 2)):
            trng = np.random.default_rng([seed, index, stream])
            kind = choices[trng.integers(len(choices))]
            attrs[key] = kind
            attrs[f"{key}_params"] = _texture_params(kind, trng)
    return attrs


def labels(attrs: dict) -> dict[str, str]:
    """The categorical attributes (the keys of LABELS) of an attributes dict."""
    return {k: attrs.get(k, "flat") for k in LABELS}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(attrs: dict) -> str:
    place = "at the center" if attrs["position"] == "center" else f"at the {attrs['position']}"
    if attrs["background2"] != attrs["background"]:
        ground = f"{attrs['background']} and {attrs['background2']} background"
    else:
        ground = f"{attrs['background']} background"
    if word := TEXTURES[attrs.get("background_texture", "flat")]:
        ground = f"{word} {ground}"
    thing = attrs["shape"]
    if word := TEXTURES[attrs.get("texture", "flat")]:
        thing = f"{word} {thing}"
    return f"{_article(attrs['color'])} {attrs['color']} {thing} {place} on {_article(ground)} {ground}"


def _alternatives(names) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_TEXTURE_WORDS = {w: k for k, w in TEXTURES.items() if w}
_CAPTION = re.compile(
    rf"an? (?P<color>{_alternatives(COLORS)}) (?:(?P<texture>{_alternatives(_TEXTURE_WORDS)}) )?"
    rf"(?P<shape>{_alternatives(SHAPES)}) at the (?P<position>{_alternatives(POSITIONS)}) "
    rf"on an? (?:(?P<background_texture>{_alternatives(_TEXTURE_WORDS)}) )?"
    rf"(?P<background>{_alternatives(BACKGROUNDS)})(?: and (?P<background2>{_alternatives(BACKGROUNDS)}))? background")


def parse_caption(text: str) -> dict[str, str]:
    """A caption back into its labels (as `labels` returns them); a one-line ValueError
    quoting the caption when it does not follow the grammar above."""
    m = _CAPTION.fullmatch(" ".join(text.strip().split()).lower())
    if m is None:
        raise ValueError(f"caption {text!r} does not follow the synthetic caption grammar "
                         f"(e.g. 'a red striped circle at the top left on a white background')")
    out = m.groupdict()
    out["background2"] = out["background2"] or out["background"]
    out["texture"] = _TEXTURE_WORDS.get(out["texture"], "flat")
    out["background_texture"] = _TEXTURE_WORDS.get(out["background_texture"], "flat")
    return {k: out[k] for k in LABELS}


def second_tone(rgb: tuple[int, int, int]) -> np.ndarray:
    """The other tone of a pattern: light colours darkened, dark ones lightened, so the
    pattern has contrast on any colour (black included) and keeps its hue."""
    c = np.asarray(rgb, dtype=np.float64)
    luma = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    return c * 0.45 if luma >= 100 else c + (255.0 - c) * 0.4


def _pattern(kind: str, params: dict, resolution: int, centre_px: tuple[float, float],
             half_extent_px: float) -> np.ndarray:
    """The texture field t in [0, 1] (0: the colour, 1: its second tone) at the centres of
    the supersampled pixels, in output-pixel units. `centre_px` / `half_extent_px` frame
    the region a gradient spans."""
    side = resolution * SUPERSAMPLE
    u = (np.arange(side) + 0.5) / SUPERSAMPLE  # output-pixel coordinates
    x, y = u[None, :], u[:, None]
    if kind == "stripes":
        a = math.radians(params["angle_deg"])
        proj = x * math.cos(a) + y * math.sin(a)
        return (np.mod(proj / params["period_px"] + params["phase"], 1.0) < 0.5).astype(np.float64)
    if kind == "checkers":
        cx = np.floor(x / params["cell_px"] + params["phase"][0])
        cy = np.floor(y / params["cell_px"] + params["phase"][1])
        return np.mod(cx + cy, 2.0)
    if kind == "noise":
        grid = np.random.default_rng(params["noise_seed"]).random((resolution, resolution))
        return np.repeat(np.repeat(grid, SUPERSAMPLE, axis=0), SUPERSAMPLE, axis=1)
    if kind == "gradient":
        a = math.radians(params["angle_deg"])
        proj = (x - centre_px[0]) * math.cos(a) + (y - centre_px[1]) * math.sin(a)
        return np.clip(proj / (2 * half_extent_px) + 0.5, 0.0, 1.0)
    raise ValueError(f"unknown texture {kind!r}; valid: {', '.join(TEXTURES)}")


def _textured(base: np.ndarray, t: np.ndarray, tone2: np.ndarray) -> Image.Image:
    """base (H, W, 3) or (3,) colours mixed toward `tone2` by the field t (H, W)."""
    rgb = base + t[..., None] * (tone2 - base)
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")


def _outline(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.9
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    else:  # diamond
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def draw(attrs: dict, resolution: int) -> Image.Image:
    side = resolution * SUPERSAMPLE
    bg_kind = attrs.get("background_texture", "flat")
    if bg_kind == "flat":
        img = Image.new("RGB", (side, side), BACKGROUNDS[attrs["background"]])
        if attrs["background2"] != attrs["background"]:
            ImageDraw.Draw(img).rectangle([side // 2, 0, side, side], fill=BACKGROUNDS[attrs["background2"]])
    else:
        right = (np.arange(side) >= side // 2)[None, :, None]
        left_c, right_c = (BACKGROUNDS[attrs[k]] for k in ("background", "background2"))
        base = np.where(right, np.asarray(right_c, np.float64), np.asarray(left_c, np.float64))
        tone2 = np.where(right, second_tone(right_c), second_tone(left_c))
        t = _pattern(bg_kind, attrs["background_texture_params"], resolution, (resolution / 2, resolution / 2),
                     resolution / 2)
        img = _textured(np.broadcast_to(base, (side, side, 3)), t, np.broadcast_to(tone2, (side, side, 3)))
    fx, fy = POSITIONS[attrs["position"]]
    cx, cy = (fx + attrs["jitter"][0]) * side, (fy + attrs["jitter"][1]) * side
    r = attrs["size"] * side / 2
    fill = COLORS[attrs["color"]]
    kind = attrs.get("texture", "flat")
    if kind == "flat":
        _outline(ImageDraw.Draw(img), attrs["shape"], cx, cy, r, fill)
    else:
        mask = Image.new("L", (side, side), 0)
        _outline(ImageDraw.Draw(mask), attrs["shape"], cx, cy, r, 255)
        t = _pattern(kind, attrs["texture_params"], resolution, (cx / SUPERSAMPLE, cy / SUPERSAMPLE), r / SUPERSAMPLE)
        img.paste(_textured(np.asarray(fill, np.float64), t, second_tone(fill)), mask=mask)
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS)


def sample(seed: int, index: int, resolution: int, textures: Sequence[str] = DEFAULT_TEXTURES,
           background_textures: Sequence[str] = DEFAULT_TEXTURES) -> dict:
    """One WebDataset sample: `png`, `txt` caption and `json` attributes, as bytes."""
    attrs = attributes(seed, index, textures, background_textures)
    buf = io.BytesIO()
    draw(attrs, resolution).save(buf, format="PNG")
    return {
        "__key__": f"{index:08d}",
        "png": buf.getvalue(),
        "txt": caption(attrs).encode(),
        "json": json.dumps(attrs, sort_keys=True).encode(),
    }
