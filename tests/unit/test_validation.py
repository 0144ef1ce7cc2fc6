"""Image validation: the content decides; the file name plays no part."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
from PIL import Image

from captionstream.errors import ImageRejected, ImageTooLarge, UnsupportedImage
from captionstream.ingest.validation import ImageLimits, inspect_image, validate_image

LIMITS = ImageLimits()


def encode(fmt: str, size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buf, fmt)
    return buf.getvalue()


def noisy_png(size: tuple[int, int] = (128, 128)) -> bytes:
    """A PNG whose pixel data does not compress, so the IDAT chunk is most of the file."""
    buf = io.BytesIO()
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "filename", "content_type", "extension"),
    [
        ("PNG", "cat.png", "image/png", ".png"),
        ("JPEG", "cat.jpg", "image/jpeg", ".jpg"),
        ("JPEG", "CAT.JPEG", "image/jpeg", ".jpg"),
        ("WEBP", "cat.webp", "image/webp", ".webp"),
        ("GIF", "cat.gif", "image/gif", ".gif"),
        ("BMP", "cat.bmp", "image/bmp", ".bmp"),
        ("TIFF", "cat.tif", "image/tiff", ".tiff"),
        ("PNG", None, "image/png", ".png"),
    ],
)
def test_valid_images_are_accepted(
    fmt: str, filename: str | None, content_type: str, extension: str
) -> None:
    data = encode(fmt, (64, 48))
    image = inspect_image(data, filename, LIMITS)
    assert image.content_type == content_type
    assert image.extension == extension
    assert (image.width, image.height) == (64, 48)
    assert image.sha256 == hashlib.sha256(data).hexdigest()
    assert image.data == data
    assert image.size_bytes == len(data)


def test_content_decides_the_type_not_the_name() -> None:
    data = encode("JPEG", (40, 30))
    image = inspect_image(data, "actually-a-jpeg.png", LIMITS)
    assert image.content_type == "image/jpeg"
    assert image.extension == ".jpg"
    assert (image.width, image.height) == (40, 30)


@pytest.mark.parametrize(
    "filename",
    ["blob", "photo", "image.txt", "logo.svg", "a.png.exe", "cat.PNG", "", None],
)
def test_a_valid_image_is_accepted_under_any_name(filename: str | None) -> None:
    """A browser's `FormData.append("file", blob)` sends the name `blob`; a camera
    export may have none: the content alone decides."""
    data = encode("JPEG", (40, 30))
    image = inspect_image(data, filename, LIMITS)
    assert (image.content_type, image.extension) == ("image/jpeg", ".jpg")
    assert (image.width, image.height) == (40, 30)


def test_size_is_checked_before_the_content() -> None:
    """The cheapest check first: an oversized upload is a 413 whatever it holds."""
    with pytest.raises(ImageTooLarge):
        inspect_image(b"x" * 100, "a.txt", ImageLimits(max_bytes=10))


def test_text_content_with_image_name_is_refused() -> None:
    with pytest.raises(UnsupportedImage) as info:
        inspect_image(b"hello, I am definitely a cat picture\n" * 10, "cat.jpg", LIMITS)
    assert info.value.http_status == 415
    assert info.value.detail == (
        "content is not a supported image (JPEG, PNG, GIF, BMP, TIFF, ICO, WebP)"
    )


def test_svg_content_is_refused_even_without_a_name() -> None:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'
    with pytest.raises(UnsupportedImage):
        inspect_image(svg, None, LIMITS)


def test_untrusted_decoder_formats_are_refused() -> None:
    # Pillow can read PPM, but it is not on the trusted list.
    with pytest.raises(UnsupportedImage):
        inspect_image(encode("PPM"), None, LIMITS)


def test_empty_file_is_refused() -> None:
    with pytest.raises(UnsupportedImage, match="empty"):
        inspect_image(b"", "a.png", LIMITS)


def test_too_many_bytes_is_refused_with_413() -> None:
    data = encode("PNG")
    with pytest.raises(ImageTooLarge) as info:
        inspect_image(data, "a.png", ImageLimits(max_bytes=len(data) - 1))
    assert info.value.http_status == 413
    assert str(len(data)) in info.value.detail
    # exactly at the limit is fine
    assert inspect_image(data, "a.png", ImageLimits(max_bytes=len(data))).size_bytes == len(data)


def test_too_many_pixels_is_refused_with_413() -> None:
    data = encode("PNG", (100, 50))
    with pytest.raises(ImageTooLarge) as info:
        inspect_image(data, "a.png", ImageLimits(max_pixels=4999))
    assert info.value.http_status == 413
    assert "100x50" in info.value.detail
    assert inspect_image(data, "a.png", ImageLimits(max_pixels=5000)).width == 100


def test_real_decompression_bomb_is_refused_with_default_limits() -> None:
    buf = io.BytesIO()
    Image.new("1", (15_000, 15_000)).save(buf, "PNG")  # 225 Mpx
    data = buf.getvalue()
    assert len(data) < LIMITS.max_bytes  # small on disk: only the pixel guard can stop it
    with pytest.raises(ImageTooLarge) as info:
        inspect_image(data, "bomb.png", LIMITS)
    assert info.value.http_status == 413


def test_truncated_png_is_refused() -> None:
    data = noisy_png()
    assert inspect_image(data, "full.png", LIMITS).width == 128
    with pytest.raises(UnsupportedImage) as info:
        inspect_image(data[: len(data) // 2], "half.png", LIMITS)
    assert info.value.http_status == 415


def test_png_with_only_a_header_is_refused() -> None:
    with pytest.raises(UnsupportedImage):
        inspect_image(encode("PNG")[:20], "a.png", LIMITS)


def test_rejections_share_a_base_class() -> None:
    assert issubclass(UnsupportedImage, ImageRejected)
    assert issubclass(ImageTooLarge, ImageRejected)


def test_multi_picture_jpeg_is_accepted_as_jpeg() -> None:
    buf = io.BytesIO()
    first = Image.new("RGB", (40, 30), "red")
    first.save(buf, "MPO", save_all=True, append_images=[Image.new("RGB", (40, 30), "blue")])
    image = inspect_image(buf.getvalue(), "camera.jpg", LIMITS)
    assert image.content_type == "image/jpeg"
    assert (image.width, image.height) == (40, 30)


async def test_validate_image_matches_inspect_image() -> None:
    data = encode("WEBP", (33, 21))
    assert await validate_image(data, "x.webp", LIMITS) == inspect_image(data, "x.webp", LIMITS)


async def test_validate_image_raises_the_same_errors() -> None:
    with pytest.raises(UnsupportedImage):
        await validate_image(b"not an image", "x.png", LIMITS)
    with pytest.raises(ImageTooLarge):
        await validate_image(encode("PNG"), "x.png", ImageLimits(max_pixels=1))


def test_pixel_limit_above_pillows_own_cap_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 14000x13000 (182 Mpx) image is under the 200 Mpx default but over Pillow's cap."""
    from PIL import Image as PILImage

    from captionstream.ingest.validation import allow_pixels

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", PILImage.MAX_IMAGE_PIXELS)
    buf = io.BytesIO()
    PILImage.new("1", (14000, 13000)).save(buf, "PNG")
    data = buf.getvalue()
    with pytest.raises(ImageTooLarge):
        inspect_image(data, "big.png", ImageLimits())
    allow_pixels(ImageLimits().max_pixels)
    assert inspect_image(data, "big.png", ImageLimits()).width == 14000
