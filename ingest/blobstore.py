"""Blob storage for image bytes; events carry only the reference URI.

`BlobStore` is the seam: the local directory store below serves one machine (or a shared
volume); `ingest.s3_blobstore.S3BlobStore` serves workers on many hosts.
`open_blob_store` picks one from the settings (CAPTIONSTREAM_BLOB_STORE).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

from captionstream.errors import BlobNotFound, ConfigurationError
from captionstream.settings import CommonSettings


class BlobStore(Protocol):
    """What the gateway, the workers and bulk ingest need of a blob store.

    References are opaque strings made by `put`; one outside the store (forged, or made
    by another store) raises `BlobNotFound`, as does one whose blob is gone.
    """

    async def put(self, data: bytes, sha256: str, extension: str) -> str:
        """Store `data` (idempotent per content, and a new use of it); return its
        reference URI."""
        ...

    async def get(self, ref: str) -> bytes: ...

    async def delete(self, ref: str) -> None: ...

    def get_sync(self, ref: str) -> bytes:
        """Blocking read, for threads that are not an event loop (the inference thread)."""
        ...

    def delete_if_idle_sync(self, ref: str, idle_s: float) -> bool:
        """Delete the blob unless it was stored (used) within the last `idle_s`; True if
        it was deleted. Blocking."""
        ...

    def check(self) -> None:
        """Raise `ConfigurationError` if the store cannot be used (at start-up). Blocking."""
        ...

    def close(self) -> None: ...


def open_blob_store(settings: CommonSettings) -> BlobStore:
    """The store CAPTIONSTREAM_BLOB_STORE names: `s3://bucket/prefix`, or unset for the
    local directory `data_dir`/blobs. Not yet checked: call `check()`."""
    if settings.blob_store is None:
        return LocalBlobStore(settings.blob_dir)
    # Imported only here: boto3 costs ~0.5 s of start-up that local users need not pay.
    from captionstream.ingest.s3_blobstore import S3BlobStore, parse_store_url

    try:
        bucket, prefix = parse_store_url(settings.blob_store)
    except ValueError as exc:
        raise ConfigurationError(f"CAPTIONSTREAM_BLOB_STORE: {exc}") from exc
    return S3BlobStore(
        bucket, prefix, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
    )


class LocalBlobStore:
    """Content-addressed files under `root`, referenced as `file://` URIs.

    Storing is idempotent (same content, same reference), writes are atomic (temp file +
    rename), and references are resolved strictly inside `root` so a forged reference
    cannot read other files.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path_for(self, sha256: str, extension: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}{extension}"

    def path_of(self, ref: str) -> Path:
        url = urlparse(ref)
        if url.scheme != "file":
            raise BlobNotFound(f"not a local blob reference: {ref!r}")
        try:
            path = Path(unquote(url.path)).resolve()
        except (ValueError, OSError) as exc:  # e.g. an embedded NUL byte
            raise BlobNotFound(f"malformed blob reference: {ref!r}") from exc
        if not path.is_relative_to(self.root):
            raise BlobNotFound(f"reference outside the blob store: {ref!r}")
        return path

    def put_sync(self, data: bytes, sha256: str, extension: str) -> str:
        path = self._path_for(sha256, extension)
        if path.exists():
            # Content-addressed: many jobs can share one blob. Its mtime is its last use,
            # so expiry never deletes a blob a recent job still needs.
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return path.as_uri()

    def get_sync(self, ref: str) -> bytes:
        try:
            return self.path_of(ref).read_bytes()
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise BlobNotFound(f"image {ref!r} is not in the blob store") from exc

    def delete_if_idle_sync(self, ref: str, idle_s: float) -> bool:
        """Delete the blob unless a job stored it (again) within the last `idle_s`."""
        path = self.path_of(ref)
        try:
            if time.time() - path.stat().st_mtime < idle_s:
                return False
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def check(self) -> None:
        """Nothing to check: the constructor made the directory."""

    def close(self) -> None:
        pass

    async def put(self, data: bytes, sha256: str, extension: str) -> str:
        return await asyncio.to_thread(self.put_sync, data, sha256, extension)

    async def get(self, ref: str) -> bytes:
        return await asyncio.to_thread(self.get_sync, ref)

    async def delete(self, ref: str) -> None:
        await asyncio.to_thread(self.path_of(ref).unlink, True)
