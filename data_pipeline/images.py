"""Image bytes to model input: decode any common format and mode, resize, centre-crop."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps

from .storage import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "caption")


def decode_rgb(data: bytes, where: str) -> Image.Image:
    """Decode to RGB, honouring EXIF rotation; transparency is composited over white,
    because captioned web images with alpha (logos, emoji) are drawn on white pages."""
    try:
        img = Image.open(io.BytesIO(data))
        img = ImageOps.exif_transpose(img)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA"):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise DataError(f"cannot decode image {where}: {e}") from None


def resize_center_crop(img: Image.Image, resolution: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Scale the shorter side to `resolution`, then cut the central square.

    Returns the crop and its box (left, top, right, bottom) in the resized image, which
    later micro-conditioning needs.
    """
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    box = (left, top, left + resolution, top + resolution)
    return img.crop(box), box


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image to a 3xHxW float tensor in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_pil(x: torch.Tensor) -> Image.Image:
    """3xHxW tensor in [-1, 1] to an RGB PIL image."""
    arr = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def image_and_caption(sample: dict, resolution: int) -> tuple[torch.Tensor, str, tuple[int, int]]:
    """(3xRxR tensor, caption, original (w, h)) from a raw shard sample, or a DataError
    naming the shard and key when the image or caption is missing or unreadable."""
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if image_ext is None:
        raise DataError(f"sample {where} has no image (expected one of .{', .'.join(IMAGE_EXTS)})")
    caption_ext = next((e for e in CAPTION_EXTS if e in sample), None)
    if caption_ext is None:
        raise DataError(f"sample {where} has no caption (expected .txt)")
    img = decode_rgb(sample[image_ext], where)
    size = img.size
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
