"""Storage on a local folder and on a real S3 server: atomic writes, listing, key validation, credentials."""

import os
import pickle

import pytest
from fsspec.implementations.local import LocalFileSystem
from s3fs import S3FileSystem

from pipeline.config import StorageConfig
from pipeline.faults import RetryPolicy, StorageUnavailable
from pipeline.storage import Location, UnsafeKeyError, stage_location, validate_key


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path) -> Location:
    """A fresh storage root on each backend."""
    if request.param == "file":
        return Location(f"file://{tmp_path}/root")
    server = request.getfixturevalue("s3_env")
    return Location(server.uri(f"storage/{request.node.name.replace('[', '-').rstrip(']')}"))


def test_write_read_roundtrip(root):
    (root / "a/b.bin").write_bytes(b"\x00\x01payload")
    (root / "a/c.json").write_json({"x": [1, 2]})
    assert (root / "a/b.bin").read_bytes() == b"\x00\x01payload"
    assert (root / "a/c.json").read_json() == {"x": [1, 2]}
    assert (root / "a/b.bin").size() == 9
    assert (root / "a/b.bin").read_bytes(limit=3) == b"\x00\x01pa"  # limit + 1 bytes: "more than limit"


def test_overwrite_leaves_only_the_final_file(root):
    target = root / "stage/fp/file.bin"
    target.write_bytes(b"first")
    big = os.urandom(7 * 1024 * 1024)  # above s3fs's multipart threshold on object stores
    target.write_bytes(big)
    assert target.read_bytes() == big
    assert root.list_files() == {"stage/fp/file.bin": len(big)}  # no temporary names left behind


def test_failed_local_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = Location(str(tmp_path), retry=RetryPolicy(attempts=2, backoff_s=0)) / "manifest.json"
    target.write_bytes(b"old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StorageUnavailable, match=f"write {target.uri}: failed 2 time.*No space"):
        target.write_bytes(b"new and half-written")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_the_retry_policy_travels_with_the_location(tmp_path):
    cfg = StorageConfig(root=str(tmp_path), retry={"attempts": 3, "backoff_s": 0.5, "max_backoff_s": 4})
    root = Location.from_config(cfg)
    policy = RetryPolicy(attempts=3, backoff_s=0.5, max_backoff_s=4)
    assert root.exists()  # its filesystem object is made (and cached): a pickle leaves it out
    derived = [root / "a/b", (root / "a").parent, root.at("s3://bucket/x"), pickle.loads(pickle.dumps(root))]
    assert all(location.retry == policy for location in [root, *derived])
    assert all(0.25 <= policy.wait_s(1) <= 0.5 and 2 <= policy.wait_s(4) <= 4 for _ in range(20))


def test_list_files_is_sorted_and_relative(root):
    for key in ("b/2", "a/1", "b/1/x"):
        (root / key).write_bytes(b"x")
    assert list(root.list_files()) == ["a/1", "b/1/x", "b/2"]
    assert (root / "missing").list_files() == {}


def test_a_local_file_deleted_while_listed_is_left_out(tmp_path, monkeypatch):
    """A file deleted after the walk found it, before its version was read (a corpus changing while a night lists
    it): left out, as from a listing a moment later, not an error that fails the stage."""
    root = Location(str(tmp_path))
    for key in ("a/1", "a/2"):
        (root / key).write_bytes(b"x")
    find = LocalFileSystem.find

    def find_then_delete(filesystem, *args, **kwargs):
        found = find(filesystem, *args, **kwargs)
        os.remove(tmp_path / "a/1")
        return found

    monkeypatch.setattr(LocalFileSystem, "find", find_then_delete)
    assert list(root.list_file_versions()) == ["a/2"]


def test_list_folders(root):
    for key in ("shard/aaa/manifest.json", "shard/bbb/train/x.tar", "shard/file"):
        (root / key).write_bytes(b"x")
    assert (root / "shard").list_folders() == ["aaa", "bbb"]
    assert (root / "missing").list_folders() == []


def test_stage_location_is_content_addressed(root):
    assert stage_location(root, "shard", "0123abcd0123abcd").uri == f"{root.uri}/shard/0123abcd0123abcd"


@pytest.mark.parametrize(
    "key",
    [
        "",
        "..",
        "../etc/passwd",
        "a/../b",
        "/abs",
        "a//b",
        "a/./b",
        ".hidden",
        "a b",
        "caf\u00e9",
        "a\\b",
        "a/",
        "x" * 1025,
    ],
)
def test_unsafe_keys_are_rejected(key):
    with pytest.raises(UnsafeKeyError):
        validate_key(key)
    with pytest.raises(UnsafeKeyError):
        Location("/tmp") / key


@pytest.mark.parametrize("key", ["n01440764/n01440764_10026", "train/shard-000000.tar", "a.b_c-d/E9"])
def test_safe_keys_pass(key):
    assert validate_key(key) == key


def test_plain_paths_and_file_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Location("rel/dir").uri == str(tmp_path / "rel/dir")
    (Location("rel/dir") / "f").write_bytes(b"1")
    assert (Location(f"file://{tmp_path}/rel/dir") / "f").read_bytes() == b"1"


def test_memory_filesystem():
    root = Location("memory://vq2-storage-test")
    (root / "x/y").write_bytes(b"z")
    assert root.list_files() == {"x/y": 1}


def test_s3_credentials_come_from_the_environment_and_stay_out(s3_env, monkeypatch):
    # The endpoint may come from config; the credentials only ever from the environment.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    root = Location.from_config(StorageConfig(root=s3_env.uri("creds"), endpoint_url=s3_env.endpoint))
    (root / "f").write_bytes(b"ok")
    assert (root / "f").read_bytes() == b"ok"
    for text in (repr(root), str(root), pickle.dumps(root), repr(StorageConfig(root=root.uri))):
        assert s3_env.secret not in str(text)


def test_s3_wrong_credentials_fail(s3_env, monkeypatch):
    # The server checks signatures (it is not an anonymous emulator); a fresh client sees the bad secret.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    S3FileSystem.clear_instance_cache()
    try:
        # Retried like any error that does not say the file is missing (an expired token looks the same).
        with pytest.raises(StorageUnavailable, match="failed 2 time.*PermissionError.*signature"):
            (Location(s3_env.uri("denied"), retry=RetryPolicy(attempts=2, backoff_s=0)) / "f").write_bytes(b"no")
    finally:
        S3FileSystem.clear_instance_cache()
