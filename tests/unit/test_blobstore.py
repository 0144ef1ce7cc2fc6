"""Local blob store: content-addressed, idempotent, and confined to its root."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from captionstream.errors import BlobNotFound
from captionstream.ingest.blobstore import LocalBlobStore

DATA = b"\x89PNG fake image bytes"
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


async def test_put_get_round_trip(store: LocalBlobStore) -> None:
    ref = await store.put(DATA, SHA, ".png")
    assert await store.get(ref) == DATA
    assert store.get_sync(ref) == DATA


async def test_ref_is_a_file_uri_under_root(store: LocalBlobStore, tmp_path: Path) -> None:
    ref = await store.put(DATA, SHA, ".png")
    assert ref.startswith("file://")
    path = store.path_of(ref)
    assert path.is_relative_to((tmp_path / "blobs").resolve())
    assert path.name == f"{SHA}.png"
    assert path.parent.name == SHA[:2]
    assert path.read_bytes() == DATA


async def test_put_is_idempotent(store: LocalBlobStore) -> None:
    first = await store.put(DATA, SHA, ".png")
    second = await store.put(DATA, SHA, ".png")
    assert first == second
    files = [p for p in store.root.rglob("*") if p.is_file()]
    assert files == [store.path_of(first)]  # one file, and no leftover temp files


def test_root_is_created(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    LocalBlobStore(root)
    assert root.is_dir()


async def test_get_missing_blob_raises(store: LocalBlobStore) -> None:
    ref = (store.root / "00" / ("0" * 64 + ".png")).as_uri()
    with pytest.raises(BlobNotFound) as info:
        await store.get(ref)
    assert info.value.http_status == 404


@pytest.mark.parametrize(
    "ref",
    ["file:///etc/passwd", "file://localhost/etc/passwd", "file:///etc/../etc/hostname"],
)
async def test_get_outside_root_raises(store: LocalBlobStore, ref: str) -> None:
    with pytest.raises(BlobNotFound, match="outside"):
        await store.get(ref)


def test_get_with_dot_dot_escaping_root_raises(store: LocalBlobStore, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"secret")
    for ref in (
        store.root.as_uri() + "/../secret.txt",
        store.root.as_uri() + "/ab/../../secret.txt",
        store.root.as_uri() + "/%2e%2e/secret.txt",
    ):
        with pytest.raises(BlobNotFound):
            store.get_sync(ref)


async def test_get_of_sibling_with_root_as_prefix_raises(
    store: LocalBlobStore, tmp_path: Path
) -> None:
    sibling = tmp_path / "blobs2" / "x.png"
    sibling.parent.mkdir()
    sibling.write_bytes(DATA)
    with pytest.raises(BlobNotFound):
        await store.get(sibling.as_uri())


async def test_get_through_symlink_leaving_root_raises(
    store: LocalBlobStore, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"secret")
    (store.root / "link.png").symlink_to(secret)
    with pytest.raises(BlobNotFound):
        await store.get((store.root / "link.png").as_uri())


@pytest.mark.parametrize(
    "ref", ["http://example.com/a.png", "s3://bucket/a.png", "/etc/passwd", "garbage", ""]
)
async def test_get_non_file_scheme_raises(store: LocalBlobStore, ref: str) -> None:
    with pytest.raises(BlobNotFound):
        await store.get(ref)


async def test_get_of_a_directory_raises(store: LocalBlobStore) -> None:
    await store.put(DATA, SHA, ".png")
    with pytest.raises(BlobNotFound):
        await store.get(store.root.as_uri())
    with pytest.raises(BlobNotFound):
        await store.get((store.root / SHA[:2]).as_uri())


def test_get_with_nul_byte_raises_blob_not_found(store: LocalBlobStore) -> None:
    with pytest.raises(BlobNotFound):
        store.get_sync(store.root.as_uri() + "/ab/%00.png")


async def test_delete_removes_the_blob(store: LocalBlobStore) -> None:
    ref = await store.put(DATA, SHA, ".png")
    await store.delete(ref)
    assert not store.path_of(ref).exists()
    with pytest.raises(BlobNotFound):
        await store.get(ref)
    await store.delete(ref)  # deleting again is a no-op
    # and it can be stored again
    assert await store.put(DATA, SHA, ".png") == ref
    assert await store.get(ref) == DATA


async def test_delete_outside_root_raises(store: LocalBlobStore, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me")
    with pytest.raises(BlobNotFound):
        await store.delete(victim.as_uri())
    assert victim.read_bytes() == b"keep me"


async def test_different_content_gets_different_refs(store: LocalBlobStore) -> None:
    other = b"other bytes"
    ref_a = await store.put(DATA, SHA, ".png")
    ref_b = await store.put(other, hashlib.sha256(other).hexdigest(), ".jpg")
    assert ref_a != ref_b
    assert await store.get(ref_a) == DATA
    assert await store.get(ref_b) == other


def test_delete_if_idle_keeps_a_blob_a_recent_job_stored_again(tmp_path: Path) -> None:
    import os
    import time

    store = LocalBlobStore(tmp_path / "blobs")
    ref = store.put_sync(b"same bytes", "ab" * 32, ".png")
    path = store.path_of(ref)
    old = time.time() - 100
    os.utime(path, (old, old))
    assert store.delete_if_idle_sync(ref, idle_s=10) is True
    assert not path.exists()

    ref = store.put_sync(b"same bytes", "ab" * 32, ".png")
    os.utime(store.path_of(ref), (old, old))
    store.put_sync(b"same bytes", "ab" * 32, ".png")  # a new job with the same content
    assert store.delete_if_idle_sync(ref, idle_s=10) is False
    assert store.get_sync(ref) == b"same bytes"
    assert store.delete_if_idle_sync(store.root.as_uri() + "/zz/gone.png", idle_s=0) is False
