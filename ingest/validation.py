"""Image validation judged by decoding the content, never by trusting the file name.

`inspect_image` is pure and synchronous (Pillow); `validate_image` runs it in a worker
thread so that decoding a large upload never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import PurePath

from PIL import Image, UnidentifiedImageError

from captionstream.errors import ImageTooLarge, UnsupportedImage

# Extensions accepted on upload names (the reference service's list, plus .webp).
ALLOWED_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tiff", ".tif", ".ico", ".webp"}
)

# Pillow format name -> (MIME type, canonical extension). Only these decoders are trusted.
FORMATS: dict[str, tuple[str, str]] = {
    "JPEG": ("image/jpeg", ".jpg"),
    # Camera JPEGs with an embedded second picture: Pillow's JPEG plugin reports them as
    # MPO even when only JPEG was asked for. They are JPEG files; BLIP sees frame one.
    "MPO": ("image/jpeg", ".jpg"),
    "PNG": ("image/png", ".png"),
    "GIF": ("image/gif", ".gif"),
    "BMP": ("image/bmp", ".bmp"),
    "TIFF": ("image/tiff", ".tiff"),
    "ICO": ("image/vnd.microsoft.icon", ".ico"),
    "WEBP": ("image/webp", ".webp"),
}

# The Pillow decoders tried, in order (MPO is reached through the JPEG decoder).
DECODERS = ["JPEG", "PNG", "GIF", "BMP", "TIFF", "ICO", "WEBP"]


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_bytes: int = 5 * 1024 * 1024
    max_pixels: int = 200_000_000


@dataclass(frozen=True, slots=True)
class ValidatedImage:
    data: bytes
    content_type: str
    extension: str
    width: int
    height: int
    sha256: str

    @property
    def size_bytes(self) -> int:
        return len(self.data)


def allow_pixels(max_pixels: int) -> None:
    """Let our `max_pixels` decide: Pillow refuses at 2 x MAX_IMAGE_PIXELS (~179 Mpx) by
    itself, which would silently cap the setting. Process-wide; called at start-up."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def check_filename(filename: str | None) -> None:
    """Refuse names whose extension is not an image type (cheap, before decoding)."""
    if not filename:
        return  # no name (e.g. a URL or a raw body): the content alone decides
    ext = PurePath(filename).suffix.lower()
    if ext not in ALLOWED_EXTENSIONS:
        allowed = ", ".join(sorted(ALLOWED_EXTENSIONS))
        raise UnsupportedImage(f"file extension {ext or '(none)'!r} not allowed; use {allowed}")


def inspect_image(data: bytes, filename: str | None, limits: ImageLimits) -> ValidatedImage:
    check_filename(filename)
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    if not data:
        raise UnsupportedImage("empty file")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit decides (see `allow_pixels`); Pillow's hard bomb error
            # stays as a backstop and is reported the same way.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=DECODERS) as img:
                fmt = img.format or ""
                width, height = img.size
                if width * height > limits.max_pixels:
                    raise ImageTooLarge(
                        f"image is {width}x{height} = {width * height} pixels; "
                        f"the limit is {limits.max_pixels}"
                    )
                img.verify()  # structural check of the whole file without decoding pixels
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedImage(
            "content is not a supported image (JPEG, PNG, GIF, BMP, TIFF, ICO, WebP)"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnsupportedImage(f"image is corrupt or truncated: {exc}") from exc
    if fmt not in FORMATS:  # defensive: a plugin reported a format we never asked for
        raise UnsupportedImage(f"unsupported image format {fmt or '(unknown)'}")
    content_type, extension = FORMATS[fmt]
    return ValidatedImage(
        data=data,
        content_type=content_type,
        extension=extension,
        width=width,
        height=height,
        sha256=hashlib.sha256(data).hexdigest(),
    )


async def validate_image(data: bytes, filename: str | None, limits: ImageLimits) -> ValidatedImage:
    """`inspect_image` off the event loop."""
    return await asyncio.to_thread(inspect_image, data, filename, limits)
