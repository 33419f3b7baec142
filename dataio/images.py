"""Decode any image file into the RGB array a backbone expects, or say exactly why it cannot.

Real collections hold grayscale, CMYK, palette and alpha images, 16-bit scans, rotated phone photos,
truncated downloads and the odd 1 × 1 pixel or 10000 × 8000 poster. Everything that can be turned
into an RGB picture is converted (and the conversion noted); the rest raises `BadImage` with the
reason, so that the extraction job can record it and go on.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Above this many pixels an image is refused before its pixels are decoded: a 30000 × 30000 PNG
# needs 2.7 GB as RGB. 10000 × 8000 photos (80 MP) still pass; JPEGs are decoded at reduced scale.
DEFAULT_MAX_PIXELS = 120_000_000

_EXIF_ORIENTATION = 0x0112
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "lanczos": Image.Resampling.LANCZOS}


class BadImage(ValueError):
    """An image that cannot be turned into RGB pixels; `reason` says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


@dataclass
class Decoded:
    pixels: np.ndarray  # (size, size, 3) uint8, the resized RGB image
    width: int  # original size, before any resizing (after EXIF rotation)
    height: int
    note: str  # "" when the file was plain RGB; otherwise what was converted, e.g. "CMYK -> RGB"


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite over white: transparent areas of logos and cut-outs are usually meant as paper."""
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _wide_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer or float grayscale: stretch its own range to 0..255 (a plain
    convert("L") clips everything above 255, which turns most 16-bit scans white)."""
    arr = np.asarray(img, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    scaled = np.zeros_like(arr) if hi <= lo else (np.nan_to_num(arr, nan=lo) - lo) / (hi - lo) * 255.0
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L").convert("RGB")


def to_rgb(img: Image.Image) -> tuple[Image.Image, str]:
    """Any PIL mode -> RGB; returns the image and a note of what was converted ("" if nothing)."""
    mode = img.mode
    if mode == "RGB":
        return img, ""
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        return _flatten_alpha(img), f"{mode} with alpha -> RGB over white"
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _wide_to_8bit(img), f"{mode} -> RGB (range stretched)"
    return img.convert("RGB"), f"{mode} -> RGB"


def decode_image(data: bytes | str | Path | Image.Image, *, size: int, resample: str = "bicubic",
                 max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Decoded:
    """Decode `data` (file bytes, a path, or an already opened PIL image) and resize it to
    `size` × `size` RGB (no crop: the whole picture is kept, so a backbone's grid cells tile the
    original image exactly).

    Raises `BadImage` for unreadable, truncated, empty or over-large images.
    """
    source = name or (str(data) if isinstance(data, (str, Path)) else f"<{type(data).__name__}>")
    opened: Image.Image | None = None  # closed at the end if we opened it
    try:
        if isinstance(data, Image.Image):
            img = data
        else:
            with warnings.catch_warnings():
                # Our own max_pixels check below replaces PIL's bomb warning; its hard error at
                # 2 × Image.MAX_IMAGE_PIXELS still fires at open and is reported like any other.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = opened = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        width, height = img.size
        if width < 1 or height < 1:
            raise BadImage(source, f"empty image ({width}x{height})")
        if width * height > max_pixels:
            raise BadImage(source, f"too large: {width}x{height} = {width * height} pixels "
                                   f"> max_pixels {max_pixels}")
        if img.format == "JPEG":
            # Decode at the smallest DCT scale that is still >= 2x the target: huge photos
            # decode in a fraction of the time and memory, with no visible loss after resizing.
            img.draft(img.mode, (2 * size, 2 * size))
        if img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # stored rotated by 90 degrees
            width, height = height, width
        img.load()  # the actual decode: truncated / corrupt data fails here
        img = ImageOps.exif_transpose(img)
        rgb, note = to_rgb(img)
        if min(width, height) < 8:
            note = "; ".join(filter(None, [note, f"tiny {width}x{height} upscaled"]))
        pixels = np.asarray(rgb.resize((size, size), _RESAMPLE[resample]), dtype=np.uint8)
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own guard, before our size check
        raise BadImage(source, f"too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise BadImage(source, f"unreadable: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL's corrupt-data errors
        raise BadImage(source, f"corrupt: {type(exc).__name__}: {exc}") from exc
    finally:
        if opened is not None:
            opened.close()
    return Decoded(pixels=pixels, width=width, height=height, note=note)
