"""The S3 blob store's references and the blob store factory, without a server (the
store against a real S3 server: tests/integration/test_s3_blobstore.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from captionstream.errors import BlobNotFound
from captionstream.ingest.blobstore import LocalBlobStore, open_blob_store
from captionstream.ingest.s3_blobstore import S3BlobStore, parse_store_url
from captionstream.settings import CommonSettings

SHA = "ab" + "c" * 62


@pytest.fixture(scope="module")
def store() -> Iterator[S3BlobStore]:
    # No request is made: building a client neither connects nor looks for credentials.
    s3 = S3BlobStore("blobs", "images/", endpoint_url="http://127.0.0.1:9", region="us-east-1")
    yield s3
    s3.close()


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://blobs", "blobs", ""),
        ("s3://blobs/", "blobs", ""),
        ("s3://blobs/images", "blobs", "images"),
        ("s3://blobs/a/b/", "blobs", "a/b"),
    ],
)
def test_parse_store_url(url: str, bucket: str, prefix: str) -> None:
    assert parse_store_url(url) == (bucket, prefix)


@pytest.mark.parametrize("url", ["s3://", "http://blobs/x", "blobs/x", "s3://b/x?y=1"])
def test_parse_store_url_refuses(url: str) -> None:
    with pytest.raises(ValueError, match="s3://BUCKET"):
        parse_store_url(url)


def test_keys_are_content_addressed_under_the_prefix(store: S3BlobStore) -> None:
    ref = f"s3://blobs/images/ab/{SHA}.png"
    assert store.key_of(ref) == f"images/ab/{SHA}.png"
    assert store.url == "s3://blobs/images"


def test_no_prefix() -> None:
    s3 = S3BlobStore("blobs", endpoint_url="http://127.0.0.1:9", region="us-east-1")
    try:
        assert s3.key_of(f"s3://blobs/ab/{SHA}.jpg") == f"ab/{SHA}.jpg"
        with pytest.raises(BlobNotFound):
            s3.key_of(f"s3://blobs/images/ab/{SHA}.jpg")
    finally:
        s3.close()


@pytest.mark.parametrize(
    "ref",
    [
        f"s3://other/images/ab/{SHA}.png",  # another bucket
        f"s3://blobs/secrets/ab/{SHA}.png",  # outside the prefix
        f"s3://blobs/images-2/ab/{SHA}.png",  # a prefix that only starts the same
        f"s3://blobs/ab/{SHA}.png",  # the bucket's root
        f"s3://blobs/images/cd/{SHA}.png",  # fan-out directory not the hash's
        f"s3://blobs/images/ab/{SHA[:-1]}.png",  # not a SHA-256
        f"s3://blobs/images/ab/{SHA.upper()}.png",
        f"s3://blobs/images/../ab/{SHA}.png",
        f"s3://blobs/images/ab/../../secrets/{SHA}.png",
        "s3://blobs/images/ab/report.pdf",
        f"s3://blobs/images/ab/{SHA}.png?versionId=1",
        f"file:///tmp/images/ab/{SHA}.png",
        f"https://blobs.s3.amazonaws.com/images/ab/{SHA}.png",
        "",
        "not a uri",
    ],
)
def test_forged_refs_are_refused(store: S3BlobStore, ref: str) -> None:
    with pytest.raises(BlobNotFound) as info:
        store.key_of(ref)
    assert info.value.http_status == 404
    assert not info.value.retriable


def test_forged_ref_is_refused_before_any_request(store: S3BlobStore) -> None:
    # The endpoint does not exist: reaching it would raise BlobStoreUnavailable instead.
    with pytest.raises(BlobNotFound):
        store.get_sync(f"s3://blobs/secrets/ab/{SHA}.png")
    with pytest.raises(BlobNotFound):
        store.delete_if_idle_sync(f"s3://other/images/ab/{SHA}.png", 0)


def test_factory_defaults_to_the_local_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CAPTIONSTREAM_BLOB_STORE", raising=False)
    settings = CommonSettings(data_dir=tmp_path)
    blobs = open_blob_store(settings)
    assert isinstance(blobs, LocalBlobStore)
    assert blobs.root == (tmp_path / "blobs").resolve()
    blobs.check()


def test_factory_opens_the_s3_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONSTREAM_BLOB_STORE", "s3://media/captionstream/images")
    monkeypatch.setenv("CAPTIONSTREAM_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("CAPTIONSTREAM_S3_REGION", "eu-west-3")
    blobs = open_blob_store(CommonSettings(data_dir=tmp_path))
    try:
        assert isinstance(blobs, S3BlobStore)
        assert (blobs.bucket, blobs.prefix) == ("media", "captionstream/images")
        assert blobs.endpoint == "http://127.0.0.1:9"
        assert blobs._s3.meta.region_name == "eu-west-3"
    finally:
        blobs.close()
    assert not (tmp_path / "blobs").exists()  # no local directory made for nothing


def test_empty_blob_store_setting_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONSTREAM_BLOB_STORE", "")
    monkeypatch.setenv("CAPTIONSTREAM_S3_ENDPOINT_URL", " ")
    settings = CommonSettings()
    assert settings.blob_store is None
    assert settings.s3_endpoint_url is None


@pytest.mark.parametrize("value", ["s3://", "s3:///x", "http://blobs/x", "/var/blobs"])
def test_blob_store_setting_must_be_an_s3_url(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CAPTIONSTREAM_BLOB_STORE", value)
    with pytest.raises(ValidationError, match="s3://BUCKET"):
        CommonSettings()
