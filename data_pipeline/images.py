"""Image bytes to model input: decode any common format and mode, resize, centre-crop.

Decoding is defensive because web-scale shards hold whatever was scraped:

* only an allow-list of formats is opened (JPEG, PNG, WebP unless the config opts into
  more), whatever the member's extension says: PIL's EPS plugin runs Ghostscript on the
  file's PostScript, and JPEG 2000 decodes ~20x slower per pixel than JPEG; a member in any
  other format is a one-line DataError naming the format it is, and so is any exception a
  decoder raises (a hostile file must never escape as an uncaught error that ends a job);
* the pixel count an image's header claims is checked before any pixel is decoded, so a
  small file that claims 30000x30000 (a decompression bomb) is rejected at once and
  without memory; PIL's own `Image.MAX_IMAGE_PIXELS` guard stays in force as well;
* every mode becomes RGB with the right content: alpha (RGBA, LA, PA, palettes and
  grey/RGB images with a tRNS colour) is composited over white, CMYK and bilevel go
  through PIL, and 16/32-bit grey is scaled (not clipped) to 8 bits;
* the EXIF orientation is applied, and the reported original size is the rotated one;
* the central square is cut in the original image and only that square is resized, so
  extreme aspect ratios (1x20000) never build a huge intermediate; large JPEGs are
  decoded at a reduced DCT scale when that still leaves enough pixels.
"""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from PIL import Image

from .storage import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "caption")

# Largest pixel count an image header may claim: 8000x8000 photos pass, bombs do not.
DEFAULT_MAX_PIXELS = 64_000_000

# Formats opened by default: what web image shards hold. Anything else is refused unless a
# config opts into it (data.image_formats), because Image.open otherwise tries every plugin
# PIL has, whatever the file name says: EPS runs Ghostscript on the file's PostScript, and
# JPEG 2000 / TIFF / PSD are slow or rarely-exercised decoders.
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP")


def check_formats(formats) -> tuple[str, ...]:
    """`formats` upper-cased and checked against the formats this PIL can open; a
    ValueError naming the unknown one otherwise."""
    Image.init()
    if isinstance(formats, str) or not formats:
        raise ValueError(f"image formats must be a non-empty list of PIL format names, got {formats!r}")
    out = tuple(str(f).upper() for f in formats)
    for f in out:
        if f not in Image.OPEN:
            raise ValueError(f"unknown image format {f!r}: PIL opens {', '.join(sorted(Image.OPEN))}")
    return out


def _sniff(data: bytes) -> str | None:
    """The format whose signature `data` starts with, from the plugins' `accept` tests
    (prefix checks only: nothing is parsed), to name a refused format in the error."""
    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        try:
            ok = accept(prefix) if accept is not None else False
            if ok and not isinstance(ok, str):
                return fmt
        except Exception:  # noqa: BLE001 - only for wording an error message
            continue
    return None

# EXIF orientation -> the transposition that undoes it (as ImageOps.exif_transpose does).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _header_size(data: bytes, formats: tuple[str, ...]) -> tuple[int, int] | None:
    """The size an image's header claims, read the way `Image.open` reads it but without
    PIL's decompression-bomb check (used only to word the error for a rejected bomb)."""
    prefix = data[:16]
    for fmt in formats:
        factory, accept = Image.OPEN[fmt]
        try:
            ok = accept(prefix) if accept else True
            if ok and not isinstance(ok, str):
                return tuple(factory(io.BytesIO(data), "").size)
        except Exception:  # noqa: BLE001 - this is only for wording an error message
            continue
    return None


def _too_large(where: str, size: tuple[int, int], limit: int, what: str) -> DataError:
    w, h = size
    return DataError(f"image {where} is too large: its header claims {w}x{h} = {w * h} pixels, "
                     f"more than {what}={limit}")


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels as stored
        return 1
    return value if value in _ORIENTATION else 1


def _refused(data: bytes, where: str, formats: tuple[str, ...]) -> DataError:
    found = _sniff(data)
    allowed = ", ".join(formats)
    if found is None:
        return DataError(f"cannot decode image {where}: not an image in a format PIL knows (allowed: {allowed})")
    if found in formats:
        return DataError(f"cannot decode image {where}: a damaged {found} (PIL cannot read its header)")
    return DataError(f"image {where} is {found}, not an allowed format ({allowed}); "
                     "data.image_formats opts into others")


def _open(data: bytes, where: str, max_pixels: int, min_size: int = 0, resolution: int | None = None,
          formats: tuple[str, ...] = DEFAULT_FORMATS, convert=None) -> tuple[Image.Image, tuple[int, int]]:
    """Open lazily (only `formats`), check the claimed size, pick a JPEG draft scale, decode,
    apply the EXIF orientation and convert to RGB. Returns (RGB image, original (w, h) after
    rotation). Every failure, whatever a decoder raised, is a one-line DataError."""
    formats = tuple(formats)
    try:
        with warnings.catch_warnings():  # PIL warns between its two limits; we judge by max_pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
    except Image.UnidentifiedImageError:
        raise _refused(data, where, formats) from None
    except Image.DecompressionBombError as e:
        claimed = _header_size(data, formats)
        if claimed is None:
            raise DataError(f"image {where} is too large: {_one_line(e)}") from None
        if claimed[0] * claimed[1] > max_pixels:
            raise _too_large(where, claimed, max_pixels, "max_pixels") from None
        raise _too_large(where, claimed, 2 * Image.MAX_IMAGE_PIXELS, "twice PIL's Image.MAX_IMAGE_PIXELS") from None
    except Exception as e:  # noqa: BLE001 - whatever a plugin raises on hostile bytes is this sample's fault
        raise DataError(f"cannot decode image {where}: {_one_line(e)}") from None

    w, h = img.size
    if w * h > max_pixels:
        raise _too_large(where, (w, h), max_pixels, "max_pixels")
    if w < 1 or h < 1:
        raise DataError(f"cannot decode image {where}: its header claims an empty {w}x{h} image")
    orientation = _orientation(img)
    size = (h, w) if orientation >= 5 else (w, h)
    if min(w, h) < min_size:
        raise DataError(f"image {where} is too small: {size[0]}x{size[1]}, shorter side {min(w, h)} "
                        f"< min_size={min_size}")
    try:
        if resolution is not None and img.format == "JPEG":
            # Decode at 1/2, 1/4 or 1/8 scale when the shorter side still reaches `resolution`.
            short = min(w, h)
            img.draft(None, (math.ceil(w * resolution / short), math.ceil(h * resolution / short)))
        img.load()
        if orientation != 1:
            img = img.transpose(_ORIENTATION[orientation])
        return (convert or _to_rgb)(img), size
    except Exception as e:  # noqa: BLE001 - as above; MemoryError too: one image's demand, not the job's
        raise DataError(f"cannot decode image {where}: {_one_line(e)}") from None


def _over_white(img: Image.Image) -> Image.Image:
    img = img.convert("RGBA")
    background = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, img).convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited over white, because captioned web
    images with alpha (logos, emoji) are drawn on white pages."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit grey (32-bit "I" holds the same range): scale 0..65535 to 0..255, rounding;
        # PIL's own conversion would clip everything above 255 to white.
        arr = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
        grey = ((arr + 128) // 257).astype(np.uint8)
        t = img.info.get("transparency")
        if isinstance(t, int):  # a tRNS grey level, given in 16 bits
            alpha = np.where(arr == t, 0, 255).astype(np.uint8)
            return _over_white(Image.fromarray(np.stack([grey, alpha], axis=-1), "LA"))
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        return img.convert("L").convert("RGB")
    if img.has_transparency_data:  # RGBA, LA, PA, RGBa, La, P/L/RGB with tRNS, RGBA palettes
        return _over_white(img)
    return img.convert("RGB")  # L, 1, P, CMYK (Adobe-inverted JPEGs are read right), YCbCr, LAB, RGBX...


def decode_rgb(data: bytes, where: str, max_pixels: int = DEFAULT_MAX_PIXELS,
               formats: tuple[str, ...] = DEFAULT_FORMATS) -> Image.Image:
    """Decode image bytes (one of `formats`) to RGB, honouring EXIF rotation and compositing
    transparency over white. A header claiming more than `max_pixels` pixels is rejected
    before decoding; any failure is a one-line DataError naming `where`."""
    return _open(data, where, max_pixels, formats=formats)[0]


def _size(resolution) -> tuple[int, int]:
    """A target (w, h) from a square side or a (w, h) pair (aspect-ratio buckets)."""
    return (resolution, resolution) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))


def _crop_box(size: tuple[int, int], resolution) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """(resized size, box) of the resize-then-centre-crop: scaled just enough to cover the
    target (the shorter side to `resolution` for a square), the central target cut out."""
    (w, h), (tw, th) = size, _size(resolution)
    scale = max(tw / w, th / h)
    new_w, new_h = max(tw, round(w * scale)), max(th, round(h * scale))
    left, top = (new_w - tw) // 2, (new_h - th) // 2
    return (new_w, new_h), (left, top, left + tw, top + th)


def resize_center_crop(img: Image.Image, resolution) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Scale to cover `resolution` (a square side or a (w, h) bucket), then cut the centre.

    Returns the crop and its box (left, top, right, bottom) in the resized image, which
    later micro-conditioning needs. Only the crop is resampled: its box is mapped back to
    the original image and resized from there (PIL's `resize(box=...)`, which still reads
    the pixels around the box for the filter), so a 1x20000 image costs no more than a
    square one.
    """
    w, h = img.size
    (new_w, new_h), box = _crop_box((w, h), resolution)
    if (new_w, new_h) == (w, h):
        return img.crop(box), box
    sx, sy = w / new_w, h / new_h
    source = (box[0] * sx, box[1] * sy, min(w, box[2] * sx), min(h, box[3] * sy))
    out = img.resize(_size(resolution), Image.Resampling.BICUBIC, box=source, reducing_gap=3.0)
    return out, box


def original_crop_box(size: tuple[int, int], resolution) -> tuple[float, float, float, float]:
    """The box `resize_center_crop` cuts, in the coordinates of an image of `size` (w, h)."""
    (new_w, new_h), box = _crop_box(size, resolution)
    sx, sy = size[0] / new_w, size[1] / new_h
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def crop_top_left(size: tuple[int, int], resolution) -> tuple[int, int]:
    """(top, left) pixels cut from the resized image (w, h) = `size` scaled to cover `resolution`:
    SDXL's crop conditioning c_crop (Podell et al. 2023, sec. 2.2)."""
    _, box = _crop_box(size, resolution)
    return box[1], box[0]


def header_size(data: bytes, formats: tuple[str, ...] = DEFAULT_FORMATS) -> tuple[int, int] | None:
    """(w, h) after EXIF rotation from the header alone, or None if it cannot be read or is
    not one of `formats`. Cheap enough to run on every sample, also on samples a resume skips over."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=tuple(formats))
        w, h = img.size
        return (h, w) if _orientation(img) >= 5 else (w, h)
    except Exception:  # noqa: BLE001 - unreadable: the decode will quarantine it
        return None


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image to a 3xHxW float tensor in [-1, 1]."""
    if img.mode != "RGB":
        img = _to_rgb(img)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_pil(x: torch.Tensor) -> Image.Image:
    """3xHxW tensor in [-1, 1] to an RGB PIL image."""
    arr = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def image_and_caption(sample: dict, resolution, *, min_size: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                      formats: tuple[str, ...] = DEFAULT_FORMATS) -> tuple[torch.Tensor, str, tuple[int, int]]:
    """(3xHxW tensor in [-1, 1], caption, original (w, h) after EXIF rotation) from a raw
    shard sample, or a one-line DataError naming the shard and key when the image or caption
    is missing or unreadable, the image is not one of `formats`, its header claims more than
    `max_pixels` pixels, or its shorter side is below `min_size` (smaller images are upscaled)."""
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if image_ext is None:
        raise DataError(f"sample {where} has no image (expected one of .{', .'.join(IMAGE_EXTS)})")
    caption_ext = next((e for e in CAPTION_EXTS if e in sample), None)
    if caption_ext is None:
        raise DataError(f"sample {where} has no caption (expected .txt)")
    img, size = _open(sample[image_ext], where, max_pixels, min_size, max(_size(resolution)), formats)
    crop, _ = resize_center_crop(img, resolution)
    caption = sample[caption_ext].decode("utf-8", errors="replace").strip()
    return to_tensor(crop), caption, size


def grid(images: list[Image.Image], cols: int) -> Image.Image:
    """Tile equally sized images into one picture."""
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out


MASK_MEMBER = "mask.png"  # a loss mask beside an image in a shard (make_shards: NAME.mask.png beside NAME.jpg)
MASK_MODES = ("none", "alpha", "file", "auto")


def _alpha(img: Image.Image) -> Image.Image | None:
    return img.convert("RGBA").getchannel("A") if img.has_transparency_data else None


def loss_mask(sample: dict, resolution, size: tuple[int, int], mode: str, factor: int,
              max_pixels: int = DEFAULT_MAX_PIXELS, formats: tuple[str, ...] = DEFAULT_FORMATS) -> torch.Tensor:
    """[h, w] weights in [0, 1] on the latent grid (the crop of `resolution` / `factor`): where a sample's
    loss counts. `mode`: file (the sample's mask.png member: white counts, black does not; resized to the
    image's `size` if it differs), alpha (the image's transparency: opaque counts), auto (file, else alpha).
    Cropped as the image is (resize to cover, centre crop), then averaged over each latent cell. A sample
    without one weighs 1 everywhere; a damaged mask is a DataError naming it."""
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    mask = None
    if mode in ("file", "auto") and MASK_MEMBER in sample:
        mask, _ = _open(sample[MASK_MEMBER], f"{where} (its {MASK_MEMBER})", max_pixels, formats=("PNG",),
                        convert=lambda im: im.convert("L"))
        if mask.size != tuple(size):
            mask = mask.resize(tuple(size), Image.Resampling.BILINEAR)
    if mask is None and mode in ("alpha", "auto"):
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is not None:
            mask, _ = _open(sample[ext], where, max_pixels, formats=formats, convert=_alpha)
    tw, th = _size(resolution)
    if mask is None:
        return torch.ones(th // factor, tw // factor)
    crop, _ = resize_center_crop(mask, resolution)
    x = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0)
    return torch.nn.functional.avg_pool2d(x[None, None], factor)[0, 0]

