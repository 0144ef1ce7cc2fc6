"""Image validation judged by decoding the content, never by the file name.

`inspect_image` is pure and synchronous (Pillow); `validate_image` runs it in a worker
thread so that decoding a large upload never blocks the event loop.

Hostile input must cost little, so the checks run cheapest first and each is bounded by
the upload's byte size, never by what its headers claim:

1. the byte size; then, before Pillow opens the file, the two formats whose headers
   can make opening it expensive: the pictures an ICO embeds (Pillow decodes one on
   open) and compressed PNG metadata (text and ICC chunks, inflated with a cap);
2. the format, found by the trusted Pillow decoders only (SVG, PDF, HTML, ... get 415);
3. the pixel count of the first frame, its longest side, and the frame count (GIF,
   APNG, WebP, TIFF, MPO; only the first frame is captioned): all 413;
4. the data: JPEG is decoded at 1/8 scale (DCT scaling), which finds a truncated upload
   at a fraction of a full decode's cost (skipped for large progressive JPEGs, whose
   decoder buffers every coefficient at full size); PNG chunk checksums are verified.
   Other formats are checked structurally; what only a full decode could find fails
   the job at processing (`processor.pipeline.decode_rgb`) with its reason.

The file name plays no part: a valid image is accepted under any name or none (a
browser's `FormData.append("file", blob)` names it `blob`), and a non-image named
`cat.jpg` is refused by the format check.

An accepted file is stored byte-for-byte as uploaded: metadata (EXIF, text chunks) and
trailing bytes (a ZIP or a script after the image: a polyglot) are kept, and the content
type recorded is the one detected here, never the client's. Stored images are only ever
decoded, never served back, so a polyglot's other reading is never exposed.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from captionstream.errors import ImageRejected, ImageTooLarge, UnsupportedImage

if TYPE_CHECKING:
    from captionstream.settings import IngestSettings

# The usual file name extensions of the formats below. Not a check on uploads (the
# content decides); bulk ingest uses it to pick the candidate files in a directory.
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

# No side may be longer (JPEG's own limit): Pillow feeds a decoded WebP through a buffer
# that is copied again for every 64 KiB of a row, so a 200-byte animated WebP declaring a
# 15,000,000 x 12 canvas (under the pixel limit) took minutes to decode.
MAX_SIDE = 65_535

# A progressive JPEG's decoder holds every DCT coefficient of the whole image (about
# 3 bytes a pixel), even at 1/8 scale: above this many pixels the upload is not decoded
# here (a truncated one then fails at processing instead).
PROGRESSIVE_JPEG_CHECK_MAX_PIXELS = 24_000_000

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ICO_SIGNATURE = b"\x00\x00\x01\x00"


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_bytes: int = 5 * 1024 * 1024
    max_pixels: int = 200_000_000
    max_frames: int = 1000

    @classmethod
    def from_settings(cls, settings: IngestSettings) -> ImageLimits:
        return cls(
            max_bytes=settings.max_upload_bytes,
            max_pixels=settings.max_pixels,
            max_frames=settings.max_frames,
        )


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


def inspect_image(data: bytes, filename: str | None, limits: ImageLimits) -> ValidatedImage:
    """Validate an upload by its content. `filename` is accepted for the callers' sake
    and ignored: it decides neither the type nor where the bytes are stored (the blob
    store is content-addressed)."""
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    if not data:
        raise UnsupportedImage("empty file")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit decides (see `allow_pixels`); Pillow's hard bomb error
            # stays as a backstop and is reported the same way.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Pillow's complaints about odd metadata are not ours to log per upload.
            warnings.simplefilter("ignore", UserWarning)
            if data.startswith(_ICO_SIGNATURE):
                _check_ico_pictures(data, limits)
            if data.startswith(_PNG_SIGNATURE):
                _check_png_metadata(data)
            with Image.open(io.BytesIO(data), formats=DECODERS) as img:
                fmt = img.format or ""
                width, height = img.size
                if width * height > limits.max_pixels:
                    raise ImageTooLarge(
                        f"image is {width}x{height} = {width * height} pixels; "
                        f"the limit is {limits.max_pixels}"
                    )
                if max(width, height) > MAX_SIDE:
                    raise ImageTooLarge(
                        f"image is {width}x{height}; no side may be longer than {MAX_SIDE} pixels"
                    )
                _check_frames(img, fmt, limits.max_frames)
                _check_data(img, fmt, width * height)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedImage(
            "content is not a supported image (JPEG, PNG, GIF, BMP, TIFF, ICO, WebP)"
        ) from exc
    except MemoryError:
        raise  # not the client's fault: let it be a 500, not a 415
    except Exception as exc:  # Pillow raises many types for corrupt data
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


# --- the checks -----------------------------------------------------------------------


def _check_frames(img: Image.Image, fmt: str, max_frames: int) -> None:
    """Refuse animations and multi-page files with more than `max_frames` frames."""
    if fmt == "TIFF":
        # Pillow's TIFF `n_frames` walks the page chain in quadratic time (10 s for a
        # 5 MiB file of tiny pages): only ask whether one frame too many exists.
        try:
            img.seek(max_frames)
        except EOFError:
            return
        raise ImageTooLarge(
            f"image has more than {max_frames} frames; the limit is {max_frames} "
            "(only the first frame is captioned)"
        )
    # GIF: a walk over the frames' blocks without decoding them (linear in the file's
    # size); APNG, WebP, MPO: the count their header declares; other formats: 1.
    frames = int(getattr(img, "n_frames", 1))
    if frames > max_frames:
        raise ImageTooLarge(
            f"image has {frames} frames; the limit is {max_frames} "
            "(only the first frame is captioned)"
        )


def _check_data(img: Image.Image, fmt: str, pixels: int) -> None:
    if fmt in ("JPEG", "MPO"):
        progressive = "progressive" in img.info or "progression" in img.info
        if not progressive or pixels <= PROGRESSIVE_JPEG_CHECK_MAX_PIXELS:
            # Decode at the smallest DCT scale (1/8 a side): every entropy-coded byte is
            # still read, so a truncated file raises "image file is truncated".
            img.draft(None, (1, 1))
            img.load()
        return
    img.verify()  # structural check without decoding pixels (PNG: every chunk's CRC)


def _check_ico_pictures(data: bytes, limits: ImageLimits) -> None:
    """Refuse an ICO file any of whose pictures has too many pixels.

    Pillow decodes the largest picture while opening an ICO, and the directory's sizes
    (one byte each) say nothing about the embedded PNG or bitmap: a 16x16 entry can hold
    a 14000x14000 PNG of under a megabyte. So the pictures' own headers are read first.
    """
    for width, height in _ico_pictures(data):
        if width * height > limits.max_pixels:
            raise ImageTooLarge(
                f"icon holds a {width}x{height} = {width * height} pixel picture; "
                f"the limit is {limits.max_pixels}"
            )


def _ico_pictures(data: bytes) -> Iterator[tuple[int, int]]:
    """(width, height) from the header of each picture an ICO file embeds. A bitmap's
    height counts its mask too, as Pillow's own bomb check does."""
    count = int.from_bytes(data[4:6], "little")
    for entry in range(6, min(6 + 16 * count, len(data) - 15), 16):
        offset = int.from_bytes(data[entry + 12 : entry + 16], "little")
        head = data[offset : offset + 24]
        if head.startswith(_PNG_SIGNATURE) and len(head) == 24:
            yield int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        elif int.from_bytes(head[0:4], "little") == 12 and len(head) >= 8:  # OS/2 header
            yield int.from_bytes(head[4:6], "little"), int.from_bytes(head[6:8], "little")
        elif len(head) >= 12:
            width = int.from_bytes(head[4:8], "little", signed=True)
            height = int.from_bytes(head[8:12], "little", signed=True)
            yield abs(width), abs(height)


def _check_png_metadata(data: bytes) -> None:
    """Refuse compressed PNG metadata that inflates past Pillow's caps, wherever it is.

    Pillow inflates zTXt, iTXt and iCCP chunks with a cap (`MAX_TEXT_CHUNK`, 1 MiB each;
    `MAX_TEXT_MEMORY`, 64 MiB of text in all) and refuses the file beyond it. It reads
    the chunks before the pixel data on open, but those after it only when decoding:
    without this walk such a file would be accepted here and fail at processing.
    Uncompressed metadata needs no check: it is counted in the upload's byte size.
    """
    text_bytes = 0
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += length + 12
        if kind == b"IEND":
            return
        if kind == b"tEXt":
            text_bytes += len(body)
        elif kind in (b"zTXt", b"iCCP"):
            # keyword NUL, compression method (1 byte), compressed data
            text_bytes += _inflated_size(kind, body.partition(b"\0")[2][1:])
        elif kind == b"iTXt":
            # keyword NUL, compressed flag, method, language NUL, translated keyword NUL
            rest = body.partition(b"\0")[2]
            text = rest[2:].partition(b"\0")[2].partition(b"\0")[2]
            text_bytes += _inflated_size(kind, text) if rest[:1] == b"\x01" else len(text)
        if text_bytes > PngImagePlugin.MAX_TEXT_MEMORY:
            raise ImageTooLarge(
                f"PNG text metadata inflates to more than {PngImagePlugin.MAX_TEXT_MEMORY} "
                "bytes (a decompression bomb)"
            )


def _inflated_size(kind: bytes, compressed: bytes) -> int:
    inflater = zlib.decompressobj()
    try:
        size = len(inflater.decompress(compressed, PngImagePlugin.MAX_TEXT_CHUNK))
    except zlib.error:
        return 0  # Pillow ignores metadata it cannot inflate, and so do we
    if inflater.unconsumed_tail:
        raise ImageTooLarge(
            f"a PNG {kind.decode()} metadata chunk inflates to more than "
            f"{PngImagePlugin.MAX_TEXT_CHUNK} bytes (a decompression bomb)"
        )
    return size
