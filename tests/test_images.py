"""Robust image decoding (data_pipeline/images.py): every format and mode to the right RGB
content, EXIF rotation, decompression bombs, tiny and extreme-aspect images, size policy and
error messages. All images are built in memory."""
from __future__ import annotations

import io
import resource
import struct
import time
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, JpegImagePlugin

from data_pipeline.images import (DEFAULT_MAX_PIXELS, decode_rgb, image_and_caption, original_crop_box,
                                  resize_center_crop, to_tensor)
from data_pipeline.storage import DataError

URL = "s3://bucket/shards/000003.tar"


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def sample(data: bytes | None, ext: str = "png", caption: bytes | None = b"a caption", key: str = "k1") -> dict:
    s = {"__url__": URL, "__key__": key}
    if data is not None:
        s[ext] = data
    if caption is not None:
        s["txt"] = caption
    return s


def pixels(img: Image.Image) -> list:
    return [img.getpixel((x, y)) for y in range(img.height) for x in range(img.width)]


def close(got, want, tol: int) -> bool:
    return all(abs(int(g) - int(w)) <= tol for g, w in zip(got, want))


def tensor_rgb(x: torch.Tensor, yx: tuple[int, int]) -> tuple[int, int, int]:
    """The 0..255 colour of a [-1, 1] tensor at (y, x)."""
    return tuple(int(round(v)) for v in x[:, yx[0], yx[1]].add(1).mul(127.5).tolist())


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes | None) -> bytes:
    """A PNG written by hand: `rows` is the filtered scanline data (None: a tiny IDAT that
    does not hold the image the header claims)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"\x00" * 16)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def patched_png_size(data: bytes, width: int, height: int) -> bytes:
    """A real PNG whose IHDR is rewritten to claim width x height (CRC recomputed)."""
    assert data[12:16] == b"IHDR"
    body = struct.pack(">II", width, height) + data[24:29]
    return data[:8] + png_chunk(b"IHDR", body) + data[33:]


# -- modes ----------------------------------------------------------------------------------------------

def test_rgba_and_la_are_composited_over_white():
    rgba = Image.new("RGBA", (4, 1))
    for x, px in enumerate([(10, 20, 30, 0), (10, 20, 30, 255), (0, 0, 0, 128), (255, 0, 0, 64)]):
        rgba.putpixel((x, 0), px)
    img = decode_rgb(encode(rgba, "PNG"), "w")
    assert img.mode == "RGB"
    got = pixels(img)
    assert got[0] == (255, 255, 255)  # transparent black text on a white page is white, not black
    assert got[1] == (10, 20, 30)
    assert close(got[2], (127, 127, 127), 1)
    assert close(got[3], (255, 191, 191), 1)
    la = Image.new("LA", (3, 1))
    for x, px in enumerate([(0, 0), (50, 255), (0, 128)]):
        la.putpixel((x, 0), px)
    got = pixels(decode_rgb(encode(la, "PNG"), "w"))
    assert got[0] == (255, 255, 255) and got[1] == (50, 50, 50) and close(got[2], (127, 127, 127), 1)


def test_palette_with_transparency_index_and_alpha_table():
    p = Image.new("P", (3, 1))
    p.putpalette([0, 0, 0, 9, 99, 199, 0, 0, 0] + [0] * 759)
    for x in range(3):
        p.putpixel((x, 0), x)
    got = pixels(decode_rgb(encode(p, "PNG", transparency=0), "w"))  # one transparent index
    assert got == [(255, 255, 255), (9, 99, 199), (0, 0, 0)]
    got = pixels(decode_rgb(encode(p, "PNG", transparency=bytes([0, 255, 128])), "w"))  # per-entry alpha
    assert got[:2] == [(255, 255, 255), (9, 99, 199)] and close(got[2], (127, 127, 127), 1)
    no_alpha = pixels(decode_rgb(encode(p, "PNG"), "w"))
    assert no_alpha == [(0, 0, 0), (9, 99, 199), (0, 0, 0)]


def test_grey_and_rgb_with_a_transparent_colour():
    grey = Image.new("L", (2, 1), 5)
    grey.putpixel((1, 0), 77)
    assert pixels(decode_rgb(encode(grey, "PNG", transparency=5), "w")) == [(255, 255, 255), (77, 77, 77)]
    rgb = Image.new("RGB", (2, 1), (1, 2, 3))
    rgb.putpixel((1, 0), (7, 8, 9))
    assert pixels(decode_rgb(encode(rgb, "PNG", transparency=(1, 2, 3)), "w")) == [(255, 255, 255), (7, 8, 9)]


def test_grayscale_png_and_jpeg_give_three_equal_channels():
    assert pixels(decode_rgb(encode(Image.new("L", (2, 2), 77), "PNG"), "w")) == [(77, 77, 77)] * 4
    got = pixels(decode_rgb(encode(Image.new("L", (8, 8), 200), "JPEG", quality=95), "w"))
    assert all(c[0] == c[1] == c[2] and abs(c[0] - 200) <= 2 for c in got)


def test_bilevel():
    one = Image.new("1", (2, 1), 0)
    one.putpixel((1, 0), 1)
    assert pixels(decode_rgb(encode(one, "PNG"), "w")) == [(0, 0, 0), (255, 255, 255)]


def test_cmyk_jpeg_decodes_to_the_right_colours():
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red
    cmyk.paste((255, 0, 255, 0), (8, 0, 16, 8))           # pure green
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    img = decode_rgb(data, "w")
    assert img.mode == "RGB"
    assert close(img.getpixel((2, 4)), (255, 0, 0), 8)
    assert close(img.getpixel((13, 4)), (0, 255, 0), 8)
    x, _, _ = image_and_caption(sample(data, "jpg"), 8)
    assert close(tensor_rgb(x, (4, 1)), (255, 0, 0), 8) and close(tensor_rgb(x, (4, 6)), (0, 255, 0), 8)


def test_16bit_grey_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert data[24] == 16  # bit depth in IHDR
    got = pixels(decode_rgb(data, "w"))
    assert got == [(0, 0, 0), (1, 1, 1), (128, 128, 128), (255, 255, 255)]
    # big-endian 16-bit grey written by hand (filter byte 0 per row), and a 16-bit tRNS grey
    rows = b"\x00" + values.astype(">u2").tobytes()
    assert pixels(decode_rgb(raw_png(4, 1, 16, 0, rows), "w")) == got
    t = encode(Image.fromarray(values), "PNG", transparency=32768)
    assert pixels(decode_rgb(t, "w")) == [(0, 0, 0), (1, 1, 1), (255, 255, 255), (255, 255, 255)]


def test_16bit_rgb_png():
    rows = b"\x00" + np.array([[[65535, 32768, 0], [0, 0, 65535]]], dtype=">u2").tobytes()
    img = decode_rgb(raw_png(2, 1, 16, 2, rows), "w")
    assert pixels(img) == [(255, 128, 0), (0, 0, 255)]


def test_32bit_and_float_grey_images():
    i32 = Image.fromarray(np.array([[0, 32768, 65535, 70000]], dtype=np.int32))
    assert i32.mode == "I"
    x = to_tensor(i32)
    assert [tensor_rgb(x, (0, i)) for i in range(4)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255), (255, 255, 255)]
    f = Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32))
    assert f.mode == "F"
    x = to_tensor(f)
    assert [tensor_rgb(x, (0, i)) for i in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]


def test_webp_lossy_and_lossless_with_alpha():
    rgb = Image.new("RGB", (16, 16), (200, 30, 40))
    img = decode_rgb(encode(rgb, "WEBP", quality=95), "w")
    assert img.size == (16, 16) and close(img.getpixel((8, 8)), (200, 30, 40), 8)
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (5, 6, 7, 255))
    data = encode(rgba, "WEBP", lossless=True)
    assert pixels(decode_rgb(data, "w")) == [(255, 255, 255), (5, 6, 7)]
    x, caption, size = image_and_caption(sample(encode(rgb, "WEBP", quality=95), "webp"), 8)
    assert x.shape == (3, 8, 8) and size == (16, 16) and close(tensor_rgb(x, (4, 4)), (200, 30, 40), 8)


# -- EXIF orientation ---------------------------------------------------------------------------------

def exif_jpeg(orientation: int) -> bytes:
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)   # left half red
    arr[:, 20:] = (0, 0, 255)   # right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation, red_half", [(6, "top"), (8, "bottom"), (3, "right"), (1, "left")])
def test_exif_orientation_is_applied(orientation, red_half):
    data = exif_jpeg(orientation)
    img = decode_rgb(data, "w")
    assert img.size == ((20, 40) if orientation in (6, 8) else (40, 20))
    w, h = img.size
    at = {"top": (w // 2, 3), "bottom": (w // 2, h - 4), "left": (3, h // 2), "right": (w - 4, h // 2)}
    opposite = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}
    assert close(img.getpixel(at[red_half]), (255, 0, 0), 12)
    assert close(img.getpixel(at[opposite[red_half]]), (0, 0, 255), 12)
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(np.asarray(img), np.asarray(reference))
    x, _, size = image_and_caption(sample(data, "jpg"), 8)
    assert size == img.size and x.shape == (3, 8, 8)


def test_malformed_exif_is_ignored():
    data = bytearray(exif_jpeg(6))
    i = data.index(b"Exif\x00\x00") + 6
    data[i:i + 8] = b"XX\x00\x2a\xff\xff\xff\xff"  # not a TIFF byte order, absurd IFD offset
    img = decode_rgb(bytes(data), "w")
    assert img.size in ((40, 20), (20, 40))


# -- decompression bombs and the size limit ---------------------------------------------------------

def test_pil_limit_stays_finite():
    assert Image.MAX_IMAGE_PIXELS is not None and 0 < Image.MAX_IMAGE_PIXELS < 10**10
    assert DEFAULT_MAX_PIXELS >= 8000 * 8000


def test_decompression_bomb_is_rejected_fast_and_small():
    bomb = patched_png_size(encode(Image.new("RGB", (4, 4), (1, 2, 3)), "PNG"), 30000, 30000)
    assert len(bomb) < 200
    s = sample(bomb, key="bomb")
    stats = Image.core.get_stats()["new_count"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    t = time.perf_counter()
    try:
        with pytest.raises(DataError) as e:
            image_and_caption(s, 64)
        elapsed = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 50 * 2**20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 50 * 1024
    assert Image.core.get_stats()["new_count"] == stats  # PIL allocated no image memory at all
    msg = str(e.value)
    assert "\n" not in msg and f"{URL}:bomb" in msg
    assert "30000x30000" in msg and f"max_pixels={DEFAULT_MAX_PIXELS}" in msg
    with pytest.raises(DataError, match="30000x30000"):
        decode_rgb(bomb, "w")


def test_between_pil_warning_and_max_pixels_is_rejected_without_warning():
    data = patched_png_size(encode(Image.new("RGB", (4, 4)), "PNG"), 10000, 10000)  # 1e8 > PIL's 8.9e7 warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError) as e:
            image_and_caption(sample(data), 64)
    assert str(e.value) == (f"image {URL}:k1 is too large: its header claims 10000x10000 = 100000000 pixels, "
                            f"more than max_pixels={DEFAULT_MAX_PIXELS}")


def test_max_pixels_is_configurable():
    data = encode(Image.new("RGB", (20, 10), (1, 2, 3)), "PNG")
    with pytest.raises(DataError, match=r"claims 20x10 = 200 pixels, more than max_pixels=199$"):
        image_and_caption(sample(data), 8, max_pixels=199)
    x, _, size = image_and_caption(sample(data), 8, max_pixels=200)
    assert size == (20, 10) and x.shape == (3, 8, 8)


def test_8000x8000_header_is_within_the_default_limit():
    # a grey 8000x8000 header over almost no data: not "too large", it fails as truncated
    with pytest.raises(DataError) as e:
        decode_rgb(raw_png(8000, 8000, 8, 0, None), f"{URL}:big")
    assert str(e.value).startswith(f"cannot decode image {URL}:big: ")


# -- sizes: tiny, extreme aspect ratios, min_size, large JPEGs --------------------------------------

def test_1x1_is_upscaled_by_default():
    x, _, size = image_and_caption(sample(encode(Image.new("RGB", (1, 1), (9, 80, 200)), "PNG")), 32)
    assert size == (1, 1) and x.shape == (3, 32, 32) and x.dtype == torch.float32
    want = torch.tensor([9, 80, 200]).float().div(127.5).sub(1).view(3, 1, 1)
    assert torch.allclose(x, want.expand(3, 32, 32), atol=1 / 127.5)


def test_min_size_rejects_small_images():
    tiny = encode(Image.new("RGB", (1, 1)), "PNG")
    with pytest.raises(DataError) as e:
        image_and_caption(sample(tiny, key="t"), 32, min_size=2)
    assert str(e.value) == f"image {URL}:t is too small: 1x1, shorter side 1 < min_size=2"
    narrow = encode(Image.new("RGB", (10, 40)), "PNG")
    with pytest.raises(DataError, match=r"10x40, shorter side 10 < min_size=16"):
        image_and_caption(sample(narrow), 8, min_size=16)
    x, _, size = image_and_caption(sample(narrow), 8, min_size=10)
    assert size == (10, 40) and x.shape == (3, 8, 8)


def test_min_size_applies_to_the_rotated_size():
    with pytest.raises(DataError, match=r"20x40, shorter side 20 < min_size=21"):
        image_and_caption(sample(exif_jpeg(6), "jpg"), 8, min_size=21)


@pytest.mark.parametrize("w, h", [(1, 5000), (5000, 1), (3, 20000), (20000, 2)])
def test_extreme_aspect_ratios_are_fast_and_take_the_middle(w, h):
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[...] = (255, 0, 0)
    if w > h:
        arr[:, w // 3: 2 * w // 3] = (0, 200, 0)
    else:
        arr[h // 3: 2 * h // 3] = (0, 200, 0)
    data = encode(Image.fromarray(arr), "PNG")
    t = time.perf_counter()
    x, _, size = image_and_caption(sample(data), 256)
    assert time.perf_counter() - t < 1.0
    assert size == (w, h) and x.shape == (3, 256, 256)
    want = torch.tensor([0, 200, 0]).float().div(127.5).sub(1).view(3, 1, 1)
    assert torch.allclose(x, want.expand(3, 256, 256), atol=1 / 127.5)


def test_only_the_central_square_is_resampled():
    # a 1x20000 image at 512 used to be resized to 512x10240000 first; now the source box is
    # about one pixel and nothing larger than the output is ever built
    img = Image.new("RGB", (1, 20000), (4, 5, 6))
    stats = Image.core.get_stats()
    tracemalloc.start()
    try:
        crop, box = resize_center_crop(img, 512)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert crop.size == (512, 512) and box == (0, (10240000 - 512) // 2, 512, (10240000 - 512) // 2 + 512)
    assert peak < 20 * 2**20
    assert Image.core.get_stats()["allocated_blocks"] - stats["allocated_blocks"] < 64
    l, t, r, b = original_crop_box((1, 20000), 512)
    assert (l, r) == (0, 1) and abs((b - t) - 1) < 1e-6 and abs((t + b) / 2 - 10000) < 1e-3


def test_crop_first_matches_resize_then_crop():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (6, 9, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((57, 38), Image.Resampling.BICUBIC)  # smooth content
    for res in (16, 24, 40):
        w, h = img.size
        scale = res / min(w, h)
        new_w, new_h = max(res, round(w * scale)), max(res, round(h * scale))
        left, top = (new_w - res) // 2, (new_h - res) // 2
        old = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
        old = np.asarray(old.crop((left, top, left + res, top + res)), dtype=np.int16)
        crop, box = resize_center_crop(img, res)
        assert box == (left, top, left + res, top + res)
        diff = np.abs(np.asarray(crop, dtype=np.int16) - old)
        assert diff.mean() < 1.0 and diff.max() <= 8, (res, diff.mean(), diff.max())


def test_original_crop_box_is_in_original_coordinates():
    assert original_crop_box((40, 10), 10) == (15, 0, 25, 10)
    assert original_crop_box((40, 10), 8) == (15, 0, 25, 10)  # 40x10 -> 32x8, box (12, 0, 20, 8)
    assert original_crop_box((10, 40), 16) == (0, 15, 10, 25)


def test_large_jpeg_is_decoded_at_a_reduced_scale(monkeypatch):
    arr = np.zeros((512, 1024, 3), dtype=np.uint8)
    arr[:, :384] = (255, 0, 0)
    arr[:, 384:640] = (0, 0, 255)
    arr[:, 640:] = (0, 255, 0)
    data = encode(Image.fromarray(arr), "JPEG", quality=90)
    drafts = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        drafts.append(real(self, mode, size))
        return drafts[-1]
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    x, _, size = image_and_caption(sample(data, "jpg"), 32)
    assert size == (1024, 512) and x.shape == (3, 32, 32)
    assert drafts and drafts[0] is not None and drafts[0][1][2:] == (128, 64)  # decoded at 1/8 scale
    assert close(tensor_rgb(x, (16, 16)), (0, 0, 255), 16)
    # not twice the needed size: decoded at full scale
    drafts.clear()
    x, _, _ = image_and_caption(sample(data, "jpg"), 400)
    assert all(d is None or d[1][2:] == (1024, 512) for d in drafts)
    assert x.shape == (3, 400, 400) and close(tensor_rgb(x, (200, 200)), (0, 0, 255), 16)


# -- errors name url:key ------------------------------------------------------------------------------

def test_missing_image_or_caption_names_url_and_key():
    with pytest.raises(DataError) as e:
        image_and_caption(sample(None, key="k7"), 8)
    assert str(e.value) == f"sample {URL}:k7 has no image (expected one of .jpg, .jpeg, .png, .webp)"
    with pytest.raises(DataError) as e:
        image_and_caption(sample(encode(Image.new("RGB", (4, 4)), "PNG"), caption=None, key="k8"), 8)
    assert str(e.value) == f"sample {URL}:k8 has no caption (expected .txt)"


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "header-only"])
def test_corrupt_jpeg_is_a_one_line_error_naming_url_and_key(kind):
    rng = np.random.default_rng(1)
    good = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG", quality=90)
    bad = {"truncated": good[: len(good) // 2], "garbage": b"\xff\xd8\xff not a jpeg at all" * 3,
           "empty": b"", "header-only": good[:200]}[kind]
    with pytest.raises(DataError) as e:
        image_and_caption(sample(bad, "jpg", key="k9"), 8)
    msg = str(e.value)
    assert msg.startswith(f"cannot decode image {URL}:k9: ") and "\n" not in msg


def test_output_range_and_caption():
    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    arr[:4] = 255
    x, caption, size = image_and_caption(sample(encode(Image.fromarray(arr), "PNG"), caption=b" hi \xc3\xa9\n"), 8)
    assert caption == "hi \u00e9" and size == (8, 8)
    assert x.dtype == torch.float32 and x.min().item() == -1.0 and x.max().item() == 1.0
