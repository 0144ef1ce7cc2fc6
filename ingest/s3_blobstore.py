"""Image bytes in an S3-compatible object store, so workers on other hosts can read them.

Chosen client: boto3 (measured against aiobotocore and obstore in bench/s3_clients.py,
bench/RESULTS-s3.md). The store needs a sync read on the worker's inference thread (boto3
is sync; aiobotocore has no sync API), user metadata on HEAD and a copy-in-place that
replaces it, for the last-use time TTL expiry needs (obstore's `head` returns no user
metadata and its `copy` cannot replace it), and the whole AWS credential chain (profiles,
SSO, assumed roles, instance and container roles). boto3 was already installed with moto
for the tests; aiobotocore pins botocore to a few patch releases. Its cost, ~7 ms of
client CPU per 200 KB put + get (obstore ~2 ms), is small beside captioning an image. The
gateway's async calls run it in threads (`asyncio.to_thread`), as the local store does.

Layout: content-addressed keys `<prefix>/<sha[:2]>/<sha><ext>`, referenced as
`s3://bucket/key`. A reference is resolved only if it has exactly that shape, in this
store's bucket and prefix, so a forged one cannot read other objects.

Expiry without mtimes: each object carries its last use in its metadata
(`x-amz-meta-captionstream-last-used`, Unix seconds). Storing content that is already
there refreshes it by copying the object onto itself with new metadata (no upload), and
`delete_if_idle_sync` deletes only objects whose last use is older than the TTL, so an
image a newer job still uses is kept (the same check-then-delete as the local store: a
job storing the image in the milliseconds between the two is the window it leaves).

The bucket must exist; the credentials need s3:ListBucket on it (without it S3 answers
403, not 404, for a missing object) and s3:GetObject, PutObject, DeleteObject on the
prefix.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any, cast
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from captionstream.errors import BlobNotFound, BlobStoreUnavailable, ConfigurationError
from captionstream.ingest.validation import FORMATS

LAST_USED = "captionstream-last-used"  # user metadata: x-amz-meta-captionstream-last-used
CONTENT_TYPES = {extension: mime for mime, extension in FORMATS.values()}
# A failing store must not hold a submission (or a batch) for long: a request gets 3 s to
# connect and 20 s between bytes, and 3 attempts in all (botocore's standard retries, with
# backoff, on throttling and 5xx answers and on connection errors).
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 20.0
MAX_ATTEMPTS = 3
_MISSING = {"404", "NoSuchKey", "NotFound"}
_NO_BUCKET = {"404", "NoSuchBucket", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"}


def parse_store_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix without slashes at either end)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
        raise ValueError(f"expected s3://BUCKET or s3://BUCKET/PREFIX, not {url!r}")
    return parsed.netloc, parsed.path.strip("/")


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3BlobStore:
    """Content-addressed objects under `s3://bucket/prefix`, referenced as `s3://` URIs."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        lead = re.escape(f"{self.prefix}/") if self.prefix else ""
        self._key_shape = re.compile(
            rf"{lead}(?P<fan>[0-9a-f]{{2}})/(?P<sha>[0-9a-f]{{64}})(\.[a-z0-9]{{1,8}})?"
        )
        # Credentials: botocore's chain (AWS_ACCESS_KEY_ID..., AWS_PROFILE, SSO, roles),
        # looked up once for both clients.
        session = boto3.session.Session()
        self._s3 = self._client(session, endpoint_url, region, MAX_ATTEMPTS)
        # The start-up check tries once: a wrong setting is reported at once, not retried.
        self._probe = self._client(session, endpoint_url, region, 1)
        self.endpoint = str(self._s3.meta.endpoint_url)

    @staticmethod
    def _client(session: Any, endpoint_url: str | None, region: str | None, attempts: int) -> Any:
        config = Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            retries={"mode": "standard", "total_max_attempts": attempts},
            # S3-compatible servers (MinIO, moto) are addressed by host and port, with the
            # bucket in the path; AWS itself (no endpoint set) by virtual host.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)

    # references

    def _key_for(self, sha256: str, extension: str) -> str:
        name = f"{sha256[:2]}/{sha256}{extension}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def key_of(self, ref: str) -> str:
        """The object key a reference names, if it is one of this store's."""
        url = urlparse(ref)
        key = url.path.removeprefix("/")
        shape = self._key_shape.fullmatch(key)
        if url.scheme != "s3" or url.netloc != self.bucket or url.query or url.fragment:
            raise BlobNotFound(f"not a reference into {self.url}: {ref!r}")
        if shape is None or shape["sha"][:2] != shape["fan"]:
            raise BlobNotFound(f"reference outside the blob store {self.url}: {ref!r}")
        return key

    def _unavailable(self, doing: str, key: str, exc: Exception) -> BlobStoreUnavailable:
        return BlobStoreUnavailable(
            f"blob store {self.url} ({self.endpoint}) failed to {doing} {key!r}: {exc}"
        )

    # the BlobStore protocol

    def check(self) -> None:
        """Fail at start, with what to change, when the bucket cannot be used: missing,
        credentials refused or absent, endpoint unreachable (one attempt, seconds)."""
        where = f"CAPTIONSTREAM_BLOB_STORE={self.url} at {self.endpoint}"
        try:
            self._probe.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = _code(exc)
            if code in _NO_BUCKET:
                raise ConfigurationError(
                    f"{where}: bucket {self.bucket!r} does not exist (create it, or fix the "
                    f"bucket name or CAPTIONSTREAM_S3_ENDPOINT_URL)"
                ) from exc
            if code in _DENIED:
                raise ConfigurationError(
                    f"{where}: access to bucket {self.bucket!r} denied ({code}); check the "
                    f"AWS credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
                    f"or the role) and that they may list the bucket: {exc}"
                ) from exc
            raise ConfigurationError(
                f"{where}: bucket {self.bucket!r} cannot be used ({code}; a wrong "
                f"CAPTIONSTREAM_S3_REGION answers 301 or 400): {exc}"
            ) from exc
        except NoCredentialsError as exc:
            raise ConfigurationError(
                f"{where}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with a role"
            ) from exc
        except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as exc:
            raise ConfigurationError(
                f"{where}: cannot reach the endpoint (CAPTIONSTREAM_S3_ENDPOINT_URL): {exc}"
            ) from exc
        except BotoCoreError as exc:
            raise ConfigurationError(f"{where}: {exc}") from exc

    def put_sync(self, data: bytes, sha256: str, extension: str) -> str:
        key = self._key_for(sha256, extension)
        extra = {
            "Bucket": self.bucket,
            "Key": key,
            "Metadata": {LAST_USED: f"{time.time():.3f}"},
            "ContentType": CONTENT_TYPES.get(extension, "application/octet-stream"),
        }
        try:
            # Content-addressed: many jobs can share one object. Already there: refresh
            # its last use in place (a copy onto itself, no upload), so expiry keeps it.
            self._s3.copy_object(
                CopySource={"Bucket": self.bucket, "Key": key},
                MetadataDirective="REPLACE",
                **extra,
            )
        except ClientError as exc:
            if _code(exc) not in _MISSING:
                raise self._unavailable("store", key, exc) from exc
            try:
                self._s3.put_object(Body=data, **extra)
            except (ClientError, BotoCoreError) as put_exc:
                raise self._unavailable("store", key, put_exc) from put_exc
        except BotoCoreError as exc:
            raise self._unavailable("store", key, exc) from exc
        return f"s3://{self.bucket}/{key}"

    def get_sync(self, ref: str) -> bytes:
        key = self.key_of(ref)
        try:
            response = self._s3.get_object(Bucket=self.bucket, Key=key)
            # Uploads are capped (max_upload_bytes): read whole, in this thread.
            return cast(bytes, response["Body"].read())
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise BlobNotFound(f"image {ref!r} is not in the blob store") from exc
            raise self._unavailable("read", key, exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable("read", key, exc) from exc

    def delete_sync(self, ref: str) -> None:
        key = self.key_of(ref)
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=key)  # missing: no error
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable("delete", key, exc) from exc

    def last_used(self, ref: str) -> float | None:
        """When a job last stored the object (Unix seconds); None if it is not there.
        Objects stored without the metadata count from their modification time."""
        key = self.key_of(ref)
        try:
            head = self._s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise self._unavailable("look up", key, exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable("look up", key, exc) from exc
        try:
            return float(head.get("Metadata", {})[LAST_USED])
        except (KeyError, ValueError):
            return float(head["LastModified"].timestamp())

    def delete_if_idle_sync(self, ref: str, idle_s: float) -> bool:
        """Delete the object unless a job stored it (again) within the last `idle_s`."""
        last = self.last_used(ref)
        if last is None or time.time() - last < idle_s:
            return False
        self.delete_sync(ref)
        return True

    def close(self) -> None:
        self._s3.close()
        self._probe.close()

    async def put(self, data: bytes, sha256: str, extension: str) -> str:
        return await asyncio.to_thread(self.put_sync, data, sha256, extension)

    async def get(self, ref: str) -> bytes:
        return await asyncio.to_thread(self.get_sync, ref)

    async def delete(self, ref: str) -> None:
        await asyncio.to_thread(self.delete_sync, ref)
