"""Hostile images: each gets a clear 4xx at upload (`inspect_image`) or, when only a full
decode could tell, a FAILURE with a reason at processing (`decode_rgb` raising
`ImageUnreadable`). Never a crash, never unbounded time or memory.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import time
import zipfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps, PngImagePlugin

from captionstream.errors import ImageRejected, ImageUnreadable, UnsupportedImage
from captionstream.ingest import validation
from captionstream.ingest.blobstore import LocalBlobStore
from captionstream.ingest.submission import submit_image
from captionstream.ingest.validation import MAX_SIDE, ImageLimits, ValidatedImage, inspect_image
from captionstream.processor.pipeline import decode_rgb
from captionstream.schemas.events import ImageSubmitted, JobState
from captionstream.settings import GatewaySettings, IngestSettings

LIMITS = ImageLimits()


# --- building hostile files -------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def noise(size: tuple[int, int]) -> Image.Image:
    """Pixels that do not compress, so the entropy-coded data is most of the file."""
    return Image.frombytes("RGB", size, random.Random(str(size)).randbytes(size[0] * size[1] * 3))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_chunks(before_pixels: bytes = b"", after_pixels: bytes = b"") -> bytes:
    """A 40x20 PNG with extra chunks after IHDR and/or just before IEND."""
    data = encode(Image.new("RGB", (40, 20), "red"), "PNG")
    ihdr_end, iend_start = 8 + 25, len(data) - 12
    return (
        data[:ihdr_end]
        + before_pixels
        + data[ihdr_end:iend_start]
        + after_pixels
        + data[iend_start:]
    )


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature, IHDR and a tiny IDAT: huge dimensions, a few dozen bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + png_chunk(b"IEND", b"")
    )


def zeros_deflated(size: int) -> bytes:
    return zlib.compress(b"\0" * size, 9)


def gif_of_tiny_frames(frames: int, screen: tuple[int, int] = (1, 1)) -> bytes:
    """A hand-made GIF of `frames` 1x1 frames of 15 bytes each (a frame-count bomb)."""
    header = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame * frames + b";"


def animated(fmt: str, frames: int, size: tuple[int, int] = (8, 8), **params: object) -> bytes:
    """`frames` distinct frames (encoders merge identical ones)."""
    images = [Image.new("RGB", size, (i % 256, (i // 256) * 40 % 256, 0)) for i in range(frames)]
    return encode(images[0], fmt, save_all=True, append_images=images[1:], **params)


def tiff_of_tiny_pages(pages: int) -> bytes:
    """A hand-made little-endian TIFF of `pages` 1x1 grey pages sharing one strip."""

    def ifd(next_offset: int, strip_offset: int) -> bytes:
        short = [(256, 1), (257, 1), (258, 8), (262, 1), (278, 1)]
        entries = [struct.pack("<HHIHH", tag, 3, 1, value, 0) for tag, value in short]
        entries += [struct.pack("<HHII", 273, 4, 1, strip_offset)]
        entries += [struct.pack("<HHII", 279, 4, 1, 1)]
        entries.sort()
        return struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", next_offset)

    size = len(ifd(0, 0))
    strip = 8 + pages * size
    body = b"".join(ifd(8 + (i + 1) * size if i < pages - 1 else 0, strip) for i in range(pages))
    return b"II*\x00" + struct.pack("<I", 8) + body + b"\x80"


def webp_with_canvas(width: int, height: int) -> bytes:
    """An animated WebP of two 16x12 frames whose header declares a larger canvas."""
    data = bytearray(animated("WEBP", 2, (16, 12), lossless=True))
    at = data.index(b"VP8X") + 12
    data[at : at + 3] = (width - 1).to_bytes(3, "little")
    data[at + 3 : at + 6] = (height - 1).to_bytes(3, "little")
    return bytes(data)


def ico_holding(picture: bytes, declared: int = 16) -> bytes:
    """An ICO whose directory announces a `declared`-pixel square around `picture`."""
    directory = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", declared, declared, 0, 0, 1, 32, len(picture), 6 + 16)
    return directory + entry + picture


def jpeg_with_exif(exif: bytes | Image.Exif, size: tuple[int, int] = (40, 20)) -> bytes:
    left_red_right_blue = Image.new("RGB", size, "blue")
    left_red_right_blue.paste("red", (0, 0, size[0] // 2, size[1]))
    return encode(left_red_right_blue, "JPEG", exif=exif, quality=95)


def raw_exif(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """EXIF bytes with one IFD of (tag, type, count, 4-byte value) entries, as written."""
    ifd = struct.pack("<H", len(entries))
    ifd += b"".join(
        struct.pack("<HHI", tag, kind, count) + value for tag, kind, count, value in entries
    )
    return b"Exif\0\0" + b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


def outcome(data: bytes) -> str:
    """What becomes of an upload: refused at upload (with its status), or at processing
    decoded to RGB or failed as unreadable. Anything else raised is a crash."""
    try:
        inspect_image(data, None, LIMITS)
    except ImageRejected as error:
        return f"refused {error.http_status}"
    try:
        return f"decoded {decode_rgb(data, LIMITS.max_pixels).mode}"
    except ImageUnreadable as error:
        return f"unreadable: {error.detail}"


def files_under(root: Path) -> list[Path]:
    return sorted(path.resolve() for path in root.rglob("*") if path.is_file())


def refused(
    data: bytes, filename: str | None = None, limits: ImageLimits = LIMITS
) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        inspect_image(data, filename, limits)
    assert 400 <= info.value.http_status < 500
    return info.value


def unreadable(data: bytes, max_pixels: int = LIMITS.max_pixels) -> ImageUnreadable:
    with pytest.raises(ImageUnreadable) as info:
        decode_rgb(data, max_pixels)
    assert not info.value.retriable  # a FAILURE with its reason, not a retry
    return info.value


# --- truncated files ----------------------------------------------------------------------


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("keep", [0.99, 0.5, 0.05])
def test_truncated_jpeg_is_refused_at_upload(progressive: bool, keep: float) -> None:
    data = encode(noise((320, 240)), "JPEG", progressive=progressive)
    assert inspect_image(data, "photo.jpg", LIMITS).width == 320
    error = refused(data[: int(len(data) * keep)], "photo.jpg")
    assert error.http_status == 415
    assert "truncated" in error.detail


def test_jpeg_without_its_end_marker_is_refused() -> None:
    data = encode(noise((64, 64)), "JPEG")
    assert data.endswith(b"\xff\xd9")
    assert "truncated" in refused(data[:-2]).detail


def test_truncated_jpeg_fails_at_processing_with_a_reason() -> None:
    data = encode(noise((320, 240)), "JPEG")
    assert "truncated" in unreadable(data[: len(data) // 2]).detail


def test_large_progressive_jpeg_is_left_to_processing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the bound, the upload is not decoded (its decoder would buffer every
    coefficient): a truncated one is accepted, and its job fails with the reason."""
    monkeypatch.setattr(validation, "PROGRESSIVE_JPEG_CHECK_MAX_PIXELS", 320 * 240 - 1)
    data = encode(noise((320, 240)), "JPEG", progressive=True)[:-500]
    assert inspect_image(data, None, LIMITS).content_type == "image/jpeg"
    assert "truncated" in unreadable(data).detail
    baseline = encode(noise((320, 240)), "JPEG")[:-500]
    assert "truncated" in refused(baseline).detail  # a baseline one is still decoded


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP", "ICO", "PNG"])
def test_other_truncated_formats_are_refused_or_fail_at_processing(fmt: str) -> None:
    data = encode(noise((128, 128)), fmt)
    result = outcome(data[: len(data) // 2])
    assert result == "refused 415" or (
        result.startswith("unreadable: ") and "truncated" in result
    ), result


# --- decompression bombs ------------------------------------------------------------------


def test_png_declaring_ten_gigapixels_is_refused_at_once() -> None:
    data = png_header_only(100_000, 100_000)
    assert len(data) < 100
    start = time.perf_counter()
    error = refused(data, "bomb.png")
    assert error.http_status == 413
    assert time.perf_counter() - start < 1
    assert "pixels" in unreadable(data).detail


def test_png_bomb_under_the_pixel_limit_but_over_a_lower_setting() -> None:
    error = refused(png_header_only(12_000, 12_000), limits=ImageLimits(max_pixels=100_000_000))
    assert error.http_status == 413
    assert "12000x12000" in error.detail


def test_gif_whose_screen_is_four_gigapixels_is_refused() -> None:
    assert refused(gif_of_tiny_frames(1, screen=(65_535, 65_535))).http_status == 413


def test_gif_whose_first_frame_outgrows_its_screen_is_refused() -> None:
    header = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, 65_535, 65_535, 0) + b"\x02\x02\x44\x01\x00"
    assert refused(header + frame + b";").http_status == 413


def test_webp_canvas_over_the_pixel_limit_is_refused() -> None:
    data = webp_with_canvas(16_000, 16_000)
    assert len(data) < 1000
    assert refused(data).http_status == 413
    assert "pixels" in unreadable(data).detail


def test_very_wide_webp_canvas_is_refused_quickly() -> None:
    """10,000,000 x 12 is under 200 Mpx, but Pillow copies a decoded WebP row again for
    every 64 KiB of it: such a 200-byte file took minutes to decode before the side
    limit."""
    data = webp_with_canvas(10_000_000, 12)
    start = time.perf_counter()
    error = refused(data)
    assert error.http_status == 413
    assert f"no side may be longer than {MAX_SIDE}" in error.detail
    assert "no side" in unreadable(data).detail
    assert time.perf_counter() - start < 2


def test_widest_allowed_webp_canvas_decodes_in_bounded_time() -> None:
    data = webp_with_canvas(MAX_SIDE, 12)
    assert inspect_image(data, None, LIMITS).width == MAX_SIDE
    start = time.perf_counter()
    assert decode_rgb(data, LIMITS.max_pixels).size == (MAX_SIDE, 12)
    assert time.perf_counter() - start < 5


def test_ico_holding_a_huge_png_is_refused_before_pillow_decodes_it() -> None:
    """Pillow decodes an icon's picture while opening it, and the directory's one-byte
    sizes say nothing about it: the embedded header is read first."""
    inner = encode(Image.new("1", (4000, 4000)), "PNG")
    data = ico_holding(inner)
    assert len(data) < 10_000
    error = refused(data, "favicon.ico", ImageLimits(max_pixels=1_000_000))
    assert error.http_status == 413
    assert "icon holds a 4000x4000" in error.detail


def test_ico_holding_a_huge_bitmap_is_refused() -> None:
    header = struct.pack("<IiiHHIIiiII", 40, 3000, 6000, 1, 1, 0, 0, 0, 0, 0, 0)
    error = refused(ico_holding(header + b"\0" * 64), limits=ImageLimits(max_pixels=1_000_000))
    assert "icon holds a 3000x6000" in error.detail


def test_ordinary_icons_are_accepted() -> None:
    data = encode(Image.new("RGBA", (64, 64), "green"), "ICO", sizes=[(16, 16), (32, 32), (64, 64)])
    image = inspect_image(data, "favicon.ico", LIMITS)
    assert (image.content_type, image.width) == ("image/vnd.microsoft.icon", 64)
    assert decode_rgb(data, LIMITS.max_pixels).size == (64, 64)


@pytest.mark.parametrize("where", ["before the pixels", "after the pixels"])
@pytest.mark.parametrize(
    "chunk",
    [
        png_chunk(b"zTXt", b"Comment\0\0" + zeros_deflated(8 << 20)),
        png_chunk(b"iTXt", b"Comment\0\x01\x00\0\0" + zeros_deflated(8 << 20)),
        png_chunk(b"iCCP", b"icc\0\0" + zeros_deflated(8 << 20)),
    ],
    ids=["zTXt", "iTXt", "iCCP"],
)
def test_compressed_png_metadata_bomb_is_refused(chunk: bytes, where: str) -> None:
    """8 MiB of metadata in 8 KiB: Pillow refuses it past 1 MiB, on open when it comes
    before the pixel data, but only when decoding when it comes after."""
    data = png_with_chunks(chunk) if where == "before the pixels" else png_with_chunks(b"", chunk)
    assert len(data) < 20_000
    error = refused(data, "meta.png")
    assert error.http_status == 413
    assert "decompression bomb" in error.detail
    unreadable(data)  # and processing refuses it too, were it ever stored


def test_many_compressed_text_chunks_adding_up_past_pillows_cap_are_refused() -> None:
    each = PngImagePlugin.MAX_TEXT_CHUNK - 1000  # every chunk is under the per-chunk cap
    count = PngImagePlugin.MAX_TEXT_MEMORY // each + 1
    chunk = png_chunk(b"zTXt", b"Comment\0\0" + zeros_deflated(each))
    data = png_with_chunks(b"", chunk * count)
    error = refused(data)
    assert error.http_status == 413
    assert "text metadata" in error.detail
    unreadable(data)


def test_corrupt_compressed_metadata_is_ignored_as_pillow_does() -> None:
    data = png_with_chunks(png_chunk(b"zTXt", b"Comment\0\0not zlib at all"))
    assert inspect_image(data, None, LIMITS).width == 40
    assert decode_rgb(data, LIMITS.max_pixels).size == (40, 20)


# --- frame counts ---------------------------------------------------------------------------


def test_gif_with_5000_frames_is_refused_with_413() -> None:
    data = animated("GIF", 5000)
    error = refused(data, "anim.gif")
    assert error.http_status == 413
    assert "5000 frames" in error.detail
    assert "the limit is 1000" in error.detail
    assert "first frame" in error.detail


def test_gif_with_1000_frames_is_accepted_and_its_first_frame_captioned() -> None:
    data = animated("GIF", 1000)
    assert inspect_image(data, "anim.gif", LIMITS).content_type == "image/gif"
    first = decode_rgb(data, LIMITS.max_pixels)
    assert first.getpixel((0, 0)) == (0, 0, 0)  # frame 0 is black; frame 1 is (1, 0, 0)


def test_counting_the_frames_of_a_5_mib_gif_is_bounded_in_time() -> None:
    """The worst case for the frame walk: 5 MiB of 15-byte frames (about 350,000)."""
    data = gif_of_tiny_frames((LIMITS.max_bytes - 100) // 15)
    assert len(data) <= LIMITS.max_bytes
    start = time.perf_counter()
    error = refused(data)
    elapsed = time.perf_counter() - start
    assert error.http_status == 413
    assert elapsed < 5, f"validating took {elapsed:.1f}s"


def test_counting_the_pages_of_a_5_mib_tiff_is_bounded_in_time() -> None:
    """Pillow's TIFF `n_frames` is quadratic: 10 s for these 50,000 pages. Validation
    only asks whether page 1001 exists."""
    data = tiff_of_tiny_pages(50_000)
    assert len(data) <= LIMITS.max_bytes
    start = time.perf_counter()
    error = refused(data)
    elapsed = time.perf_counter() - start
    assert error.http_status == 413
    assert "more than 1000 frames" in error.detail
    assert elapsed < 2, f"validating took {elapsed:.1f}s"


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {})],
    ids=["GIF", "APNG", "WebP", "TIFF"],
)
def test_frame_limit_applies_to_every_animated_format(fmt: str, params: dict[str, object]) -> None:
    data = animated(fmt, 3, **params)
    assert inspect_image(data, None, ImageLimits(max_frames=3)).width == 8
    error = refused(data, limits=ImageLimits(max_frames=2))
    assert error.http_status == 413
    assert "frames; the limit is 2" in error.detail


def test_frame_limit_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert IngestSettings().max_frames == 1000
    monkeypatch.setenv("CAPTIONSTREAM_MAX_FRAMES", "10")
    monkeypatch.setenv("CAPTIONSTREAM_MAX_PIXELS", "1000000")
    monkeypatch.setenv("CAPTIONSTREAM_MAX_UPLOAD_BYTES", "2048")
    limits = ImageLimits.from_settings(GatewaySettings())
    assert limits == ImageLimits(max_bytes=2048, max_pixels=1_000_000, max_frames=10)


# --- metadata -------------------------------------------------------------------------------


def test_jpeg_with_a_60_kb_exif_blob_is_accepted_and_kept() -> None:
    """Metadata is irrelevant to captioning and counted in the byte limit: kept as is."""
    exif = Image.Exif()
    exif[0x010E] = "A" * 60_000  # ImageDescription
    data = jpeg_with_exif(exif)
    assert 60_000 < len(data) < 65_536 + 1000
    image = inspect_image(data, "big-exif.jpg", LIMITS)
    assert image.data == data
    assert decode_rgb(data, LIMITS.max_pixels).size == (40, 20)


def test_jpeg_with_60_kb_of_garbage_exif_is_accepted() -> None:
    data = jpeg_with_exif(b"Exif\0\0II*\x00\x08\x00\x00\x00" + os.urandom(60_000))
    assert inspect_image(data, None, LIMITS).width == 40
    assert decode_rgb(data, LIMITS.max_pixels).size == (40, 20)


def test_png_with_a_2_mb_text_chunk_is_accepted() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "x" * 2_000_000)
    data = encode(Image.new("RGB", (40, 20)), "PNG", pnginfo=info)
    assert inspect_image(data, None, LIMITS).width == 40
    assert decode_rgb(data, LIMITS.max_pixels).size == (40, 20)
    assert refused(data, limits=ImageLimits(max_bytes=1_000_000)).http_status == 413


# --- EXIF orientation -----------------------------------------------------------------------


def test_exif_rotated_photo_is_accepted_and_captioned_upright() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90 degrees clockwise
    data = jpeg_with_exif(exif, (40, 20))
    image = inspect_image(data, "portrait.jpg", LIMITS)
    assert (image.width, image.height) == (40, 20)  # as stored
    upright = decode_rgb(data, LIMITS.max_pixels)
    assert upright.size == (20, 40)
    red, blue = upright.getpixel((10, 2)), upright.getpixel((10, 37))
    assert isinstance(red, tuple)
    assert isinstance(blue, tuple)
    assert red[0] > 200 > red[2]  # the left (red) half is on top once upright
    assert blue[2] > 200 > blue[0]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pillows_exif_transpose(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg_with_exif(exif, (40, 20))
    with Image.open(io.BytesIO(data)) as img:
        expected = ImageOps.exif_transpose(img).convert("RGB")
    assert decode_rgb(data, LIMITS.max_pixels).tobytes() == expected.tobytes()


def test_rotated_photo_with_a_malformed_exif_tag_is_still_captioned_upright() -> None:
    """Orientation 6 plus a GPS pointer of a signed type (-1000): Pillow's
    `exif_transpose` fails rewriting the EXIF ("negative seek value"), which failed the
    job as unreadable although its pixels decode."""
    orientation = (0x0112, 3, 1, struct.pack("<HH", 6, 0))
    gps_pointer = (0x8825, 8, 1, struct.pack("<hH", -1000, 0))
    data = jpeg_with_exif(raw_exif([orientation, gps_pointer]))
    assert inspect_image(data, None, LIMITS).width == 40
    assert decode_rgb(data, LIMITS.max_pixels).size == (20, 40)


def test_orientation_of_an_unexpected_type_is_ignored() -> None:
    as_text = (0x0112, 2, 2, b"6\0\0\0")
    assert decode_rgb(jpeg_with_exif(raw_exif([as_text])), LIMITS.max_pixels).size == (40, 20)


# --- not raster images ----------------------------------------------------------------------

SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'


@pytest.mark.parametrize(
    ("data", "filename"),
    [
        (SVG, "logo.svg"),
        (SVG, "logo.png"),
        (SVG, None),
        (b'<?xml version="1.0" encoding="UTF-8"?>\n' + SVG, "logo.jpg"),
        (b"\xef\xbb\xbf" + SVG, None),  # with a byte-order mark
        (zlib.compress(SVG), "logo.svgz"),
        (zlib.compress(SVG), "logo.gif"),
    ],
)
def test_svg_is_refused_with_415(data: bytes, filename: str | None) -> None:
    error = refused(data, filename)
    assert error.http_status == 415
    assert "not a supported image" in error.detail
    unreadable(data)


# --- polyglots ------------------------------------------------------------------------------


def zip_archive() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("index.html", "<script>alert(1)</script>")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("image", "tail", "content_type"),
    [
        (encode(Image.new("RGB", (40, 20)), "PNG"), zip_archive(), "image/png"),
        (encode(Image.new("RGB", (40, 20)), "GIF"), zip_archive(), "image/gif"),  # a GIFAR
        (encode(Image.new("RGB", (40, 20)), "JPEG"), b"<script>alert(1)</script>", "image/jpeg"),
        (encode(Image.new("RGB", (40, 20)), "JPEG"), b"%PDF-1.4\n%%EOF\n", "image/jpeg"),
    ],
    ids=["png+zip", "gif+jar", "jpeg+script", "jpeg+pdf"],
)
def test_image_with_something_appended_is_accepted_as_the_image_and_stored_verbatim(
    image: bytes, tail: bytes, content_type: str
) -> None:
    """Validated by decoding: the image part decodes, so the file is that image. What is
    stored is the upload byte for byte, and the content type is the detected one; the
    bytes are only ever decoded, never served back."""
    data = image + tail
    accepted = inspect_image(data, "x.png", LIMITS)
    assert accepted.content_type == content_type
    assert accepted.data == data
    assert accepted.sha256 == hashlib.sha256(data).hexdigest()
    assert zipfile.is_zipfile(io.BytesIO(data)) == (b"PK" in tail)
    assert decode_rgb(data, LIMITS.max_pixels).size == (40, 20)


@pytest.mark.parametrize(
    "data",
    [
        b"<html><body><img src=x onerror=alert(1)></body></html>",
        b"%PDF-1.4\n" + encode(Image.new("RGB", (4, 4)), "PNG"),
        zip_archive() + encode(Image.new("RGB", (4, 4)), "PNG"),
        b"GIF89a/*<script>alert(1)</script>*/",
        b"\xff\xd8\xff<script>alert(1)</script>",
        b"#!/bin/sh\necho pwned\n",
    ],
    ids=["html", "pdf-then-png", "zip-then-png", "gif-magic-js", "jpeg-magic-js", "script"],
)
def test_documents_that_only_start_like_or_contain_an_image_are_refused(data: bytes) -> None:
    assert refused(data, "x.png").http_status == 415
    unreadable(data)


def test_name_never_decides_the_type() -> None:
    jpeg = encode(Image.new("RGB", (8, 8)), "JPEG")
    assert inspect_image(jpeg, "really.gif", LIMITS).content_type == "image/jpeg"
    assert inspect_image(jpeg, "page.html", LIMITS).content_type == "image/jpeg"
    assert refused(b"<html><body>hi</body></html>", "cat.jpg").http_status == 415


# --- file names and where bytes are stored -------------------------------------------------


class RecordingPublisher:
    def __init__(self) -> None:
        self.events: list[ImageSubmitted] = []

    async def publish_submission(self, state: JobState, event: ImageSubmitted) -> None:
        self.events.append(event)


HOSTILE_NAMES = [
    "../../etc/passwd.png",
    "../../../../../../tmp/evil.png",
    "/etc/passwd.png",
    "..\\..\\windows\\win.ini.png",
    "photo\x00.png",
    "evil.sh\x00.png",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd.png",
    "\u202egnp.exe.png",  # right-to-left override
    "a/" * 200 + "deep.png",
    "CON.png",
    "~/.ssh/authorized_keys.png",
    # no image extension at all: accepted for the content, stored by it too
    "../../etc/passwd",
    "x.png\x00.sh",
    "../../.bashrc",
]


@pytest.mark.parametrize("filename", HOSTILE_NAMES)
async def test_file_name_cannot_influence_where_the_blob_is_stored(
    tmp_path: Path, filename: str
) -> None:
    root = tmp_path / "data" / "blobs"
    blobs = LocalBlobStore(root)
    publisher = RecordingPublisher()
    data = encode(noise((16, 16)), "PNG")
    sha = hashlib.sha256(data).hexdigest()
    _, event = await submit_image(data, filename, limits=LIMITS, blobs=blobs, publisher=publisher)
    expected = root.resolve() / sha[:2] / f"{sha}.png"
    assert event.image_ref == expected.as_uri()
    assert blobs.get_sync(event.image_ref) == data
    assert files_under(tmp_path) == [expected]  # nothing anywhere else, whatever the name said
    assert publisher.events == [event]
    assert filename not in event.model_dump_json()  # the name is not even recorded


@pytest.mark.parametrize("filename", ["../../etc/passwd", "x.png\x00.sh", "../../evil.png"])
async def test_a_refused_upload_stores_nothing_whatever_its_name(
    tmp_path: Path, filename: str
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    publisher = RecordingPublisher()
    with pytest.raises(UnsupportedImage):
        await submit_image(
            b"#!/bin/sh\nrm -rf ~\n",
            filename,
            limits=LIMITS,
            blobs=blobs,
            publisher=publisher,
        )
    assert files_under(tmp_path) == []
    assert publisher.events == []


def test_stored_extension_comes_from_the_content() -> None:
    image: ValidatedImage = inspect_image(
        encode(Image.new("RGB", (4, 4)), "GIF"), "../x.png", LIMITS
    )
    assert image.extension == ".gif"


# --- never a crash --------------------------------------------------------------------------

SEEDS = [
    encode(noise((24, 16)), "JPEG"),
    encode(noise((24, 16)), "JPEG", progressive=True),
    encode(noise((24, 16)), "PNG"),
    encode(noise((24, 16)), "WEBP"),
    encode(noise((24, 16)), "TIFF"),
    encode(noise((24, 16)), "BMP"),
    encode(noise((24, 16)), "GIF"),
    encode(noise((24, 16)), "ICO"),
    animated("GIF", 3),
    animated("PNG", 3),
    animated("WEBP", 3, lossless=True),
    jpeg_with_exif(raw_exif([(0x0112, 3, 1, struct.pack("<HH", 6, 0))])),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["set", "cut", "insert", "int"]))
        if action == "set" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "int" and at + 4 <= len(data):
            data[at : at + 4] = draw(
                st.sampled_from([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\0\0\0\0"])
            )
    return bytes(data)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutated())
def test_corrupted_images_are_refused_or_fail_their_job_never_crash(data: bytes) -> None:
    result = outcome(data)
    assert result in ("refused 413", "refused 415", "decoded RGB") or result.startswith(
        "unreadable: "
    )
