"""jobs.storage.images: every odd file a data lake holds -> [H, W, 3] uint8 RGB, or a clear error."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, features

from jobs.storage.images import ImageDecodeError, decode_image, decode_mask

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG (grayscale [H, W] or RGB [H, W, 3]) written by hand: PIL cannot write 16-bit RGB."""
    height, width = array.shape[:2]
    colour_type = 2 if array.ndim == 3 else 0
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def header_only_png(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries almost no pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def random_jpeg(height=64, width=64) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


def assert_rgb(pixels: np.ndarray, height: int, width: int) -> None:
    assert pixels.dtype == np.uint8
    assert pixels.shape == (height, width, 3)
    assert pixels.flags.c_contiguous


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "data, phrase",
    [
        (random_jpeg()[: len(random_jpeg()) // 2], "truncated"),
        (b"", "empty"),
        (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "not a decodable image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 20, ""),  # a JPEG signature and nothing else
    ],
    ids=["truncated_jpeg", "zero_bytes", "html_named_jpg", "jpeg_signature_only"],
)
def test_undecodable_bytes_raise_a_named_error(data, phrase):
    with pytest.raises(ImageDecodeError) as error:
        decode_image(data, "s3://bucket/photo.jpg")
    message = str(error.value)
    assert message.startswith("s3://bucket/photo.jpg:")
    assert phrase in message
    assert "\n" not in message


def test_pixel_limit_is_checked_before_decoding():
    data = encode(Image.new("RGB", (20, 10), RED), "PNG")
    with pytest.raises(ImageDecodeError) as error:
        decode_image(data, "big.png", max_pixels=100)
    message = str(error.value)
    assert "200" in message and "100" in message and "--max-pixels" in message
    assert decode_image(data, "big.png", max_pixels=200).shape == (10, 20, 3)  # the limit is inclusive


def test_pixel_limit_header_only_bomb():
    """A header claiming 50k x 50k is refused from the header alone, whatever the payload."""
    with pytest.raises(ImageDecodeError):
        decode_image(header_only_png(50_000, 50_000), "bomb.png")


def test_max_pixels_governs_instead_of_pils_own_limit():
    # 10000 x 9500 = 95M px < the default 100M limit: not a bomb by our limit, so the error (the
    # payload is truncated) must be about the data, not a decompression bomb.
    with pytest.raises(ImageDecodeError) as error:
        decode_image(header_only_png(10_000, 9_500), "large.png", max_pixels=100_000_000)
    assert "DecompressionBomb" not in str(error.value), str(error.value)


# ---------------------------------------------------------------------------- colour handling


def test_16_bit_grayscale_png_is_shifted_to_8_bits():
    values = np.array([[0, 255, 256, 4660], [30000, 65535, 511, 1]], np.uint16)
    pixels = decode_image(png16(values), "gray16.png")
    assert_rgb(pixels, 2, 4)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], (values >> 8).astype(np.uint8))


def test_16_bit_grayscale_png_written_by_pil():
    values = np.array([[0, 300], [40000, 65535]], np.uint16)
    pixels = decode_image(encode(Image.fromarray(values), "PNG"), "gray16.png")
    np.testing.assert_array_equal(pixels[..., 0], (values >> 8).astype(np.uint8))


def test_dark_16_bit_png_is_still_shifted():
    """All values below 256 in a 16-bit file are dark pixels, not 8-bit ones."""
    values = np.array([[0, 100], [200, 255]], np.uint16)
    np.testing.assert_array_equal(decode_image(png16(values), "dark16.png"), np.zeros((2, 2, 3), np.uint8))


def test_16_bit_rgb_png_is_shifted_to_8_bits():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    pixels = decode_image(png16(values), "rgb16.png")
    assert_rgb(pixels, 5, 7)
    np.testing.assert_array_equal(pixels, (values >> 8).astype(np.uint8))


def test_rgba_drops_alpha_and_keeps_colour():
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 3] = 200, 10, 0  # fully transparent, colour still stored
    pixels = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), "rgba.png")
    assert_rgb(pixels, 3, 4)
    assert pixels[0, 0].tolist() == [200, 10, 0]


def test_grayscale_and_gray_alpha():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    pixels = decode_image(encode(Image.fromarray(gray, "L"), "PNG"), "gray.png")
    assert_rgb(pixels, 3, 4)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], gray)
    pixels = decode_image(encode(Image.new("LA", (3, 2), (77, 0)), "PNG"), "la.png")
    assert_rgb(pixels, 2, 3)
    assert pixels[0, 0].tolist() == [77, 77, 77]


def test_palette_png():
    palette = Image.new("P", (6, 5), 0)
    palette.putpalette([0, 0, 0, 128, 0, 0] + [0] * (256 * 3 - 6))
    palette.paste(1, (1, 1, 4, 3))
    pixels = decode_image(encode(palette, "PNG"), "palette.png")
    assert_rgb(pixels, 5, 6)
    assert pixels[2, 2].tolist() == [128, 0, 0]
    assert pixels[0, 0].tolist() == [0, 0, 0]


def test_one_bit_png():
    pixels = decode_image(encode(Image.new("1", (3, 3), 1), "PNG"), "bw.png")
    assert_rgb(pixels, 3, 3)
    assert pixels.min() == 255


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (10, 8), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red in CMYK
    pixels = decode_image(data, "cmyk.jpg")
    assert_rgb(pixels, 8, 10)
    red, green, blue = pixels[4, 5].astype(int)
    assert red > 230 and green < 25 and blue < 25


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 10, 10))  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    pixels = decode_image(encode(stored, "JPEG", exif=exif, quality=95), "rotated.jpg")
    assert_rgb(pixels, 40, 20)  # width and height swapped
    assert pixels[3, 16, 0] > 200 and pixels[3, 16, 2] < 60  # the marker is now top-right
    assert pixels[3, 3, 2] > 200 and pixels[3, 3, 0] < 60


def test_exif_orientation_applies_to_masks_too():
    stored = np.zeros((20, 40), np.uint8)
    stored[0:10, 0:10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    mask = decode_mask(encode(Image.fromarray(stored), "PNG", exif=exif), "rotated_mask.png")
    assert mask.shape == (40, 20)
    assert mask[0:10, 10:20].all() and not mask[:, 0:10].any()


@pytest.mark.parametrize("size", [(1, 1), (8, 8), (1, 300), (300, 1)])
def test_tiny_and_thin_images(size):
    width, height = size
    pixels = decode_image(encode(Image.new("RGB", size, GREEN), "PNG"), "small.png")
    assert_rgb(pixels, height, width)
    assert pixels[0, 0].tolist() == list(GREEN)


def test_tiny_jpeg():
    assert_rgb(decode_image(encode(Image.new("RGB", (1, 1), RED), "JPEG"), "one.jpg"), 1, 1)


def _two_frames(fmt: str) -> bytes:
    first, second = Image.new("RGB", (5, 4), RED), Image.new("RGB", (5, 4), GREEN)
    return encode(first, fmt, save_all=True, append_images=[second])


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_multi_frame_files_give_their_first_frame(fmt):
    data = _two_frames(fmt)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2  # really two frames
    pixels = decode_image(data, f"anim.{fmt.lower()}")
    assert_rgb(pixels, 4, 5)
    assert pixels[0, 0].tolist() == list(RED)


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp_lossless_and_lossy():
    pixels = decode_image(encode(Image.new("RGB", (9, 7), BLUE), "WEBP", lossless=True), "x.webp")
    assert_rgb(pixels, 7, 9)
    assert pixels[3, 3].tolist() == list(BLUE)
    assert_rgb(decode_image(encode(Image.new("RGB", (9, 7), BLUE), "WEBP", quality=80), "y.webp"), 7, 9)


def test_bmp():
    pixels = decode_image(encode(Image.new("RGB", (3, 2), (1, 2, 3)), "BMP"), "x.bmp")
    assert pixels[1, 2].tolist() == [1, 2, 3]


# ---------------------------------------------------------------------------- masks


@pytest.fixture(scope="module")
def object_region() -> np.ndarray:
    region = np.zeros((30, 40), bool)
    region[5:20, 8:33] = True
    region[25, 0] = True  # a lone pixel in a corner
    return region


def _palette_mask(region: np.ndarray, background=(0, 0, 0)) -> bytes:
    image = Image.fromarray(region.astype(np.uint8), "P")
    image.putpalette(list(background) + [128, 0, 0] + [0] * (256 * 3 - 6))
    return encode(image, "PNG")


def mask_variants(region: np.ndarray) -> dict[str, bytes]:
    as_u8 = region.astype(np.uint8)
    rgb = np.zeros(region.shape + (3,), np.uint8)
    rgb[region] = (128, 0, 0)
    rgba = np.dstack([rgb, np.full(region.shape, 255, np.uint8)])
    return {
        "palette_perseg": _palette_mask(region),
        "gray_0_255": encode(Image.fromarray(as_u8 * 255, "L"), "PNG"),
        "gray_0_1": encode(Image.fromarray(as_u8, "L"), "PNG"),
        "rgb": encode(Image.fromarray(rgb, "RGB"), "PNG"),
        "rgb_white": encode(Image.fromarray(np.repeat(as_u8[..., None] * 255, 3, axis=2), "RGB"), "PNG"),
        "rgba_opaque": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "one_bit": encode(Image.fromarray(region), "PNG"),
        "gray_16_bit": png16(region.astype(np.uint16) * 65535),
    }


@pytest.mark.parametrize("variant", sorted(mask_variants(np.zeros((1, 1), bool))))
def test_decode_mask_reads_every_encoding_the_same(variant, object_region):
    mask = decode_mask(mask_variants(object_region)[variant], f"{variant}.png")
    assert mask.dtype == bool
    assert mask.shape == object_region.shape
    np.testing.assert_array_equal(mask, object_region)


def test_decode_mask_of_the_sample(perseg_sample):
    data = (perseg_sample / "Annotations" / "cat" / "00.png").read_bytes()
    mask = decode_mask(data, "cat/00.png")
    indices = np.asarray(Image.open(io.BytesIO(data)))
    np.testing.assert_array_equal(mask, indices != 0)
    assert 0 < mask.sum() < mask.size


def test_palette_mask_uses_indices_not_colours(object_region):
    mask = decode_mask(_palette_mask(object_region, background=(255, 255, 255)), "white_bg.png")
    np.testing.assert_array_equal(mask, object_region)


def test_decode_mask_errors_name_the_file():
    with pytest.raises(ImageDecodeError, match="^masks/m.png:"):
        decode_mask(b"not a png", "masks/m.png")
