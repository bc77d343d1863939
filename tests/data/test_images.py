"""Untrusted image bytes: every accepted layout converts to RGB, every bad kind is refused
with its own 4xx message."""

import io
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import ImageError, ImageLimits, decode_image, media_type
from tests.factories import displayed, rotated_jpeg

RGB = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,ctype", [("PNG", "image/png"), ("BMP", "image/bmp"), ("TIFF", "image/tiff"),
                                       ("WEBP", "image/webp")])
def test_lossless_formats_round_trip(fmt, ctype):
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(encode(Image.fromarray(RGB), fmt, **kw), ctype)
    np.testing.assert_array_equal(out, RGB)


def test_jpeg_and_generic_content_types():
    xs, ys = np.meshgrid(np.arange(23) * 10, np.arange(17) * 14)
    smooth = np.stack([xs, ys, np.full_like(xs, 90)], axis=-1).astype(np.uint8)
    data = encode(Image.fromarray(smooth), "JPEG", quality=95)
    for ctype in ("image/jpeg", "image/jpg", "application/octet-stream", None, "IMAGE/JPEG; q=1"):
        out = decode_image(data, ctype)
        assert out.shape == (17, 23, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - smooth).mean() < 6


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1"])
def test_channel_layouts_become_rgb(mode):
    image = Image.fromarray(RGB).convert(mode)
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    out = decode_image(encode(image, fmt), None)
    assert out.shape == (17, 23, 3) and out.dtype == np.uint8
    if mode in ("L", "LA"):
        assert (out[..., 0] == out[..., 1]).all()


def test_sixteen_bit_grey_and_rgb_are_scaled_not_clipped():
    grey = np.full((5, 6), 65535, np.uint16)
    grey[0, 0] = 0
    ok, png = cv2.imencode(".png", grey)
    out = decode_image(png.tobytes(), "image/png")
    assert out[1, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]
    rgb16 = np.zeros((5, 6, 3), np.uint16)
    rgb16[..., 2] = 65535                       # BGR order: red
    rgb16[..., 1] = 32768
    ok, png = cv2.imencode(".png", rgb16)
    out = decode_image(png.tobytes(), "image/png")
    assert out[0, 0].tolist() == [255, 128, 0]


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with a tiny (wrong) body."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (len(body).to_bytes(4, "big") + kind + body
                + zlib.crc32(kind + body).to_bytes(4, "big"))
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
            + chunk(b"IEND", b""))


PNG = encode(Image.fromarray(RGB), "PNG")
GIF = encode(Image.fromarray(RGB).convert("P"), "GIF")


@pytest.mark.parametrize("data,ctype,status,words", [
    (b"", "image/png", 400, "empty body"),
    (PNG, "text/plain", 415, "content type 'text/plain'"),
    (PNG, "application/json", 415, "not an accepted image type"),
    (b"hello, not an image", "image/png", 415, "not an image"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml", 415, "content type"),
    (GIF, "image/gif", 415, "content type 'image/gif'"),
    (GIF, None, 415, "format GIF"),
    (PNG[: len(PNG) // 2], "image/png", 400, "corrupt or truncated"),
    (bomb_png(50_000, 50_000), "image/png", 413, "pixels"),
    (bomb_png(9_000, 9_000), "image/png", 413, "larger than the limit"),
    (PNG[:8], "image/png", 415, "not an image"),
])
def test_bad_input_is_refused_with_a_clear_4xx(data, ctype, status, words):
    with pytest.raises(ImageError, match=words) as info:
        decode_image(data, ctype, ImageLimits(max_pixels=1_000_000))
    assert info.value.status == status


def test_body_over_the_size_limit():
    with pytest.raises(ImageError, match="larger than the limit") as info:
        decode_image(PNG, "image/png", ImageLimits(max_bytes=100))
    assert info.value.status == 413


def smooth_picture(h: int, w: int) -> np.ndarray:
    """Gradients plus one dark corner (top left): JPEG keeps it, and a turn moves it."""
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    image = np.stack([xs * 200 // w + 30, ys * 200 // h + 30, np.full_like(xs, 120)], axis=-1)
    image = image.astype(np.uint8)
    image[: h // 4, : w // 4] = 0
    return image


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_turns_a_phone_photo_upright(orientation):
    stored = smooth_picture(24, 40)                      # stored landscape, shown portrait
    out = decode_image(rotated_jpeg(stored, orientation), "image/jpeg")
    upright = displayed(stored, orientation)
    assert out.shape == upright.shape == (40, 24, 3)
    assert np.abs(out.astype(int) - upright).mean() < 4


def test_media_type():
    assert media_type("Image/PNG; charset=binary") == "image/png" and media_type(None) == ""
