"""DreamBooth image loading keeps the values of every PIL mode: 16-bit / 32-bit / float grayscale, alpha, palette,
CMYK (PIL's plain ``convert("RGB")`` clips a 16-bit PNG to white)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nara_diffusion.image.data import DreamBoothDataset, open_rgb


def _gradient16() -> np.ndarray:
    """16×16 uint16 ramp from 0 to 65535 (every value distinct, most not a multiple of 257)."""
    return np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)


def _save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def _write_png16(path: Path, values: np.ndarray, color_type: int) -> Path:
    """A 16-bit PNG written by hand (Pillow saves only grayscale at 16 bits): ``values`` ``[H, W, C]`` uint16."""
    height, width = values.shape[:2]
    rows = values.astype(">u2").reshape(height, -1).view(np.uint8)
    data = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b"")
    )
    return path


def test_a_16_bit_grayscale_png_keeps_its_gradient(tmp_path):
    ramp = _gradient16()
    path = _save(Image.fromarray(ramp), tmp_path / "gray16.png")
    assert Image.open(path).mode in ("I;16", "I")  # the file really is 16-bit grayscale
    expected = np.rint(ramp / 257.0)  # 0..65535 → 0..255
    got = np.asarray(open_rgb(path)).astype(np.float64)
    assert got.shape == (16, 16, 3) and got.max() < 256
    assert (got < 255).mean() > 0.9  # not clipped to white
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], expected)
    # the same values reach the training pixels ([-1, 1]; 16 px is the resolution, so no resize)
    folder = tmp_path / "instance"
    folder.mkdir()
    path.rename(folder / path.name)
    pixels = DreamBoothDataset(folder, 16, center_crop=True).instance[0].pixels
    np.testing.assert_allclose((pixels.numpy() + 1.0) * 127.5, np.broadcast_to(expected, (3, 16, 16)), atol=1e-4)


@pytest.mark.parametrize(
    "make,expected",
    [
        # 32-bit integer holding 16-bit data (how older Pillow opens a 16-bit PNG; 16-bit TIFFs)
        (lambda r: Image.fromarray(r.astype(np.int32)), lambda r: np.rint(r / 257.0)),
        # 32-bit integer holding 8-bit data
        (lambda r: Image.fromarray((r // 257).astype(np.int32)), lambda r: (r // 257).astype(np.float64)),
        # float in [0, 1]
        (lambda r: Image.fromarray((r / 65535.0).astype(np.float32)), lambda r: np.rint(r / 257.0)),
        # float in [0, 255]
        (lambda r: Image.fromarray((r / 257.0).astype(np.float32)), lambda r: np.rint(r / 257.0)),
    ],
    ids=["I-16bit", "I-8bit", "F-unit", "F-255"],
)
def test_integer_and_float_grayscale_tiffs_are_scaled_to_8_bits(tmp_path, make, expected):
    ramp = _gradient16()
    path = _save(make(ramp), tmp_path / "gray.tif")
    assert Image.open(path).mode in ("I", "F")
    got = np.asarray(open_rgb(path)).astype(np.float64)
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], expected(ramp))


def test_a_float_image_with_nan_is_named_in_the_error(tmp_path):
    values = np.zeros((8, 8), dtype=np.float32)
    values[3, 4] = np.nan
    path = _save(Image.fromarray(values), tmp_path / "nan.tif")
    with pytest.raises(ValueError, match=r"nan\.tif.*NaN"):
        open_rgb(path)


def test_alpha_palette_and_cmyk_images_load_as_their_colours(tmp_path):
    # RGBA: opaque pixels keep their colour, transparent ones become the white background, half ones blend
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[0] = (200, 30, 40, 255)
    rgba[1] = (0, 0, 0, 0)
    rgba[2] = (0, 0, 0, 128)
    rgba[3] = (10, 20, 30, 255)
    got = np.asarray(open_rgb(_save(Image.fromarray(rgba, mode="RGBA"), tmp_path / "rgba.png"))).astype(int)
    assert (got[0] == (200, 30, 40)).all() and (got[3] == (10, 20, 30)).all()
    assert (got[1] == 255).all()
    assert (np.abs(got[2] - 127) <= 1).all()

    # LA: the grey level on all three channels (opaque), white where transparent
    la = Image.merge("LA", [Image.new("L", (4, 2), 90), Image.fromarray(np.array([[255] * 4, [0] * 4], np.uint8))])
    got = np.asarray(open_rgb(_save(la, tmp_path / "la.png")))
    assert (got[0] == 90).all() and (got[1] == 255).all()

    # P: the palette's colours, and its transparent entry over white
    palette = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 128, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    got = np.asarray(open_rgb(_save(palette, tmp_path / "p.png")))
    assert got[0, 0].tolist() == [255, 0, 0] and got[0, 1].tolist() == [0, 128, 0] and got[1, 0].tolist() == [0, 0, 255]
    palette.info["transparency"] = 1
    got = np.asarray(open_rgb(_save(palette, tmp_path / "p_transparent.png")))
    assert got[0, 1].tolist() == [255, 255, 255] and got[0, 0].tolist() == [255, 0, 0]

    # CMYK (lossless TIFF): no ink is white, full cyan is (0, 255, 255), full black ink is black
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)])
    got = np.asarray(open_rgb(_save(cmyk, tmp_path / "cmyk.tif")))
    assert got[0].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]


def test_16_bit_colour_pngs_and_8_bit_images_are_unchanged(tmp_path):
    """Pillow itself reduces 16-bit RGB(A) PNGs to 8 bits correctly; an opaque RGBA or plain RGB image is passed
    through bit for bit."""
    ramp = _gradient16()
    colour = np.stack([ramp, 65535 - ramp, np.full_like(ramp, 200 * 257)], -1)
    path = _write_png16(tmp_path / "rgb16.png", colour, color_type=2)
    np.testing.assert_array_equal(np.asarray(open_rgb(path)), colour >> 8)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    path = _save(Image.fromarray(rgb), tmp_path / "rgb.png")
    np.testing.assert_array_equal(np.asarray(open_rgb(path)), rgb)
    opaque = np.concatenate([rgb, np.full((8, 8, 1), 255, np.uint8)], -1)
    path = _save(Image.fromarray(opaque, mode="RGBA"), tmp_path / "opaque.png")
    np.testing.assert_array_equal(np.asarray(open_rgb(path)), rgb)
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    path = _save(Image.fromarray(gray), tmp_path / "gray8.png")
    np.testing.assert_array_equal(np.asarray(open_rgb(path)), np.repeat(gray[..., None], 3, -1))
