"""Image decoding for the extraction job: odd modes are converted, broken files give a reason."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataio.images import BadImage, decode_image, to_rgb

SIZE = 32


def _noise(h: int, w: int, c: int | None = 3, seed: int = 0) -> np.ndarray:
    shape = (h, w) if c is None else (h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def bomb_png(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height pixels (its data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_rgb_jpeg_is_resized_whole(tmp_path):
    img = np.zeros((40, 80, 3), dtype=np.uint8)
    img[:, 40:] = 255  # right half white
    Image.fromarray(img).save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png", size=SIZE)
    assert out.pixels.shape == (SIZE, SIZE, 3) and out.pixels.dtype == np.uint8
    assert (out.width, out.height, out.note) == (80, 40, "")
    # No crop: the left half of the output is dark and the right half bright.
    assert out.pixels[:, : SIZE // 2 - 2].max() < 10 and out.pixels[:, SIZE // 2 + 2:].min() > 245


@pytest.mark.parametrize("mode,ext,note", [
    ("L", "jpg", "L -> RGB"),
    ("CMYK", "jpg", "CMYK -> RGB"),
    ("RGBA", "png", "RGBA with alpha -> RGB over white"),
    ("LA", "png", "LA with alpha -> RGB over white"),
    ("P", "gif", "P -> RGB"),
    ("I;16", "png", "I;16 -> RGB (range stretched)"),
])
def test_odd_modes_are_converted(tmp_path, mode, ext, note):
    if mode == "I;16":
        img = Image.fromarray(_noise(20, 30, None).astype(np.uint16) * 200)  # 16-bit grayscale
    else:
        img = Image.fromarray(_noise(20, 30)).convert(mode)
    path = tmp_path / f"x.{ext}"
    img.save(path)
    out = decode_image(str(path), size=SIZE)
    assert out.pixels.shape == (SIZE, SIZE, 3) and out.note == note
    assert (out.width, out.height) == (30, 20)


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)  # fully transparent black
    rgba[:, 5:] = (255, 0, 0, 255)  # opaque red right half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png", size=10, resample="bilinear")
    assert (out.pixels[:, :4] == 255).all()  # transparent -> white, not black
    assert (out.pixels[:, 6:] == (255, 0, 0)).all()


def test_sixteen_bit_range_is_stretched_not_clipped():
    arr = np.array([[1000, 2000], [3000, 4000]], dtype=np.uint16)
    rgb, _ = to_rgb(Image.fromarray(arr))
    values = np.asarray(rgb)[..., 0]
    assert values.min() == 0 and values.max() == 255  # convert("L") would give all 255


def test_tiny_image_is_upscaled_and_noted(tmp_path):
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "t.png")
    out = decode_image(tmp_path / "t.png", size=SIZE)
    assert (out.pixels == (10, 20, 30)).all() and out.note == "tiny 1x1 upscaled"


def test_huge_jpeg_is_decoded_at_reduced_scale(tmp_path):
    Image.new("RGB", (10000, 8000), (200, 100, 50)).save(tmp_path / "huge.jpg", quality=30)
    out = decode_image(tmp_path / "huge.jpg", size=SIZE)
    assert (out.width, out.height) == (10000, 8000)
    assert np.abs(out.pixels.astype(int) - (200, 100, 50)).max() < 6


def test_oversized_image_is_refused_before_decoding(tmp_path):
    bomb_png(tmp_path / "bomb.png", 30000, 30000)  # 900 MP, 2.7 GB if decoded
    with pytest.raises(BadImage, match="too large: .*900000000 pixels") as err:
        decode_image(tmp_path / "bomb.png", size=SIZE)
    assert err.value.source.endswith("bomb.png")
    bomb_png(tmp_path / "poster.png", 12000, 12000)  # 144 MP: under PIL's guard, over ours
    with pytest.raises(BadImage, match="too large: 12000x12000 = 144000000 pixels > max_pixels"):
        decode_image(tmp_path / "poster.png", size=SIZE)
    bomb_png(tmp_path / "big.png", 200, 100)
    with pytest.raises(BadImage, match="max_pixels 10000"):
        decode_image(tmp_path / "big.png", size=SIZE, max_pixels=10_000)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.fromarray(_noise(20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 90 degrees rotated: displayed 20 wide, 40 high
    img.save(tmp_path / "r.jpg", exif=exif)
    out = decode_image(tmp_path / "r.jpg", size=SIZE)
    assert (out.width, out.height) == (20, 40)


@pytest.mark.parametrize("content,reason", [
    (b"this is not an image", "unreadable"),
    (b"", "unreadable"),
    ("truncated", "corrupt"),
])
def test_broken_files_raise_bad_image_with_reason(tmp_path, content, reason):
    path = tmp_path / "broken.jpg"
    if content == "truncated":
        Image.fromarray(_noise(64, 64)).save(path, quality=90)
        content = path.read_bytes()[:400]
    path.write_bytes(content)
    with pytest.raises(BadImage) as err:
        decode_image(str(path), size=SIZE)
    assert err.value.reason.startswith(reason) and str(path) in str(err.value)


def test_missing_file_and_bytes_and_pil_input(tmp_path):
    with pytest.raises(BadImage, match="nope.jpg"):
        decode_image(tmp_path / "nope.jpg", size=SIZE)
    Image.fromarray(_noise(8, 8)).save(tmp_path / "b.png")
    from_bytes = decode_image((tmp_path / "b.png").read_bytes(), size=SIZE)
    from_pil = decode_image(Image.open(tmp_path / "b.png"), size=SIZE)
    assert np.array_equal(from_bytes.pixels, from_pil.pixels)
