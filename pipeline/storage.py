"""Storage on fsspec URIs: validated keys, atomic writes, content-addressed stage prefixes, and every call
retried on transient faults by one rule (pipeline/faults.py)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.faults import RetryPolicy, with_retries

# One path segment of a key written or read from data: starts alphanumeric (so never `.`, `..`
# or hidden), then letters, digits, `.`, `_`, `-` only. No spaces, no unicode, no separators.
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
MAX_KEY_LENGTH = 1024
MANIFEST = "manifest.json"


class UnsafeKeyError(ValueError):
    """A storage key or archive member name that could escape its prefix or is not portable."""


def validate_key(key: str) -> str:
    """Return `key` if it is a relative `a/b/c` path of safe segments, else raise UnsafeKeyError."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise UnsafeKeyError(f"unsafe key {key!r}: empty or longer than {MAX_KEY_LENGTH}")
    for segment in key.split("/"):
        if not _SEGMENT.fullmatch(segment):
            raise UnsafeKeyError(f"unsafe key {key!r}: segment {segment!r} is not [A-Za-z0-9][A-Za-z0-9._-]*")
    return key


# What a filesystem's listing says changes when a file is rewritten: an object's ETag (S3, GCS), a blob's MD5,
# else a modification or creation time. The first one present counts. Local files are not told by these: see
# file_version.
_CHANGE_MARKERS = ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "updated", "created")


def file_version(info: dict[str, Any], filesystem: fsspec.AbstractFileSystem) -> str:
    """One listed file's size and change marker: `4854:"9f3c..."` (an object's ETag), `4854:<mtime ns>:<ctime ns>`
    (a local file). Another value means other content, or content that may be other. A filesystem that gives no
    marker gives the size alone. Raises FileNotFoundError for a local file deleted since it was listed."""
    if isinstance(filesystem, LocalFileSystem):
        # The modification time alone misses a rewrite of the same length that sets it back (tar -x of a
        # reproducible tar, cp -p, shutil.copy2, unzip); the status change time cannot be set back. It also
        # changes on a chmod or a rename: that file is read again, never served stale. From os.stat, since
        # fsspec's `created` is the birth time where there is one (macOS, Windows), which a rewrite keeps.
        stat = os.stat(info["name"])
        return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
    size = int(info.get("size") or 0)
    marker = next((info[key] for key in _CHANGE_MARKERS if info.get(key) is not None), None)
    return str(size) if marker is None else f"{size}:{marker}"


def _s3_filesystem(endpoint_url: str | None, region: str | None) -> fsspec.AbstractFileSystem:
    """An s3fs filesystem that tries each request once: the Location's RetryPolicy is the only retry rule."""
    # Credentials are left to botocore (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, profiles, roles):
    # they never pass through config, params, logs or Ray task arguments.
    client_kwargs: dict[str, Any] = {}
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if region or os.environ.get("AWS_DEFAULT_REGION"):
        client_kwargs["region_name"] = region or os.environ["AWS_DEFAULT_REGION"]
    # botocore retries by itself (legacy mode, its default: 5 attempts with waits of up to 8 s; standard: 3),
    # and s3fs retries SlowDown and connection errors 5 times around that (up to 25 requests per call).
    filesystem = fsspec.filesystem("s3", client_kwargs=client_kwargs,
                                   config_kwargs={"retries": {"mode": "standard", "total_max_attempts": 1}})
    filesystem.retries = 1  # s3fs's loop; a class attribute, not a constructor argument
    return filesystem


T = TypeVar("T")


@dataclass(frozen=True)
class Location:
    """A file or folder URI plus what is needed to reach it: endpoint, region and the retry policy every
    call on it follows; picklable (without its filesystem object), so Ray tasks can take one."""

    uri: str
    endpoint_url: str | None = None
    region: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @classmethod
    def from_config(cls, storage_cfg) -> Location:
        """The storage root of a `StorageConfig`, with its retry settings."""
        retry = RetryPolicy(**storage_cfg.retry.model_dump())
        return cls(storage_cfg.root, storage_cfg.endpoint_url, storage_cfg.region, retry)

    def __post_init__(self) -> None:
        if "://" not in self.uri:
            object.__setattr__(self, "uri", os.path.abspath(self.uri))
        object.__setattr__(self, "uri", self.uri.rstrip("/") or "/")

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "fs"}

    @property
    def protocol(self) -> str:
        return self.uri.split("://", 1)[0] if "://" in self.uri else "file"

    @cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem, raw: its calls are not retried (use the methods below)."""
        if self.protocol in ("s3", "s3a"):
            return _s3_filesystem(self.endpoint_url, self.region)
        return fsspec.filesystem(self.protocol)

    @property
    def path(self) -> str:
        """The path as the filesystem names it (no protocol)."""
        return self.fs._strip_protocol(self.uri)

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    def at(self, uri: str) -> Location:
        """Another file or folder reached the same way (endpoint, region, retry policy)."""
        return Location(uri, self.endpoint_url, self.region, self.retry)

    @property
    def parent(self) -> Location:
        return self.at(self.uri.rsplit("/", 1)[0])

    def __truediv__(self, key: str) -> Location:
        return self.at(f"{self.uri}/{validate_key(key)}")

    def __str__(self) -> str:
        return self.uri

    def _retrying(self, operation: str, call: Callable[[], T]) -> T:
        return with_retries(call, self.retry, f"{operation} {self.uri}")

    def exists(self) -> bool:
        def probe() -> bool:
            # Not fs.exists: fsspec's generic one (and s3fs's for a bucket) says False on any error. Not from
            # s3fs's listing cache either: another run may have written the file since.
            try:
                self.fs.info(self.path, refresh=True)
            except FileNotFoundError:
                return False
            return True

        return self._retrying("exists", probe)

    def size(self) -> int:
        return self._retrying("size", lambda: self.fs.size(self.path))

    def read_bytes(self, limit: int | None = None) -> bytes:
        """The file's bytes; with `limit`, reads at most limit + 1 bytes (so callers can reject big files)."""

        def read() -> bytes:
            with self.fs.open(self.path, "rb") as stream:
                return stream.read(-1 if limit is None else limit + 1)

        return self._retrying("read", read)

    def sha256(self) -> str:
        """Hex sha256 of the file's bytes, read in 4 MB chunks."""
        digest = hashlib.sha256()
        with self.open_read() as stream:
            for chunk in iter(lambda: stream.read(1 << 22), b""):
                digest.update(chunk)
        return digest.hexdigest()

    def open_read(self) -> io.RawIOBase:
        """A seekable read-only stream of the file (tars, Parquet footers) whose reads are retried."""
        return _RetryingReader(self)

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def write_bytes(self, data: bytes) -> None:
        """Write atomically: a reader sees the old file, no file, or all of `data`, never a part."""
        self._retrying("write", lambda: self._write_once(bytes(data)))

    def _write_once(self, data: bytes) -> None:
        if isinstance(self.fs, LocalFileSystem):
            self.fs.makedirs(self.parent.path, exist_ok=True)
            temporary = f"{self.path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(temporary, "wb") as stream:
                    stream.write(data)
                    stream.flush()
                    os.fsync(stream.fileno())
                os.replace(temporary, self.path)
            finally:
                if os.path.exists(temporary):
                    os.remove(temporary)
        else:
            # Object stores publish an object only when its PUT (or multipart upload) completes.
            self.fs.pipe_file(self.path, data)

    def write_json(self, obj: Any) -> None:
        self.write_bytes(json.dumps(obj, indent=1, sort_keys=True).encode())

    def list_files(self) -> dict[str, int]:
        """Every file below this folder as `relative key -> size`, sorted; empty if the folder is missing."""
        return {name: int(info.get("size") or 0) for name, info in self._find().items()}

    def list_file_versions(self) -> dict[str, str]:
        """Every file below this folder as `relative key -> file_version(...)`, sorted; empty if it is missing.
        A file deleted between the listing and its version is left out, as from a listing a moment later."""
        versions = {}
        for name, info in self._find().items():
            try:
                versions[name] = file_version(info, self.fs)
            except FileNotFoundError:
                continue
        return versions

    def _find(self) -> dict[str, dict]:
        """Every file below this folder as `relative key -> the filesystem's details`, sorted."""
        prefix = self.path.rstrip("/") + "/"
        # The generic walk (local, memory) skips what it cannot list unless told to raise; s3fs lists a
        # prefix with paginated requests and raises on any failed page.
        on_error = {} if self.protocol in ("s3", "s3a") else {"on_error": "raise"}

        def listing() -> dict[str, dict]:
            self.fs.invalidate_cache(self.path)
            try:
                found = self.fs.find(self.path, detail=True, **on_error)
            except FileNotFoundError:
                return {}
            return {
                name[len(prefix) :]: info
                for name, info in sorted(found.items())
                if info.get("type", "file") == "file" and name.startswith(prefix)
            }

        return self._retrying("list", listing)

    def list_folders(self) -> list[str]:
        """Names of the folders directly below this one, sorted; empty if the folder is missing."""

        def listing() -> list[str]:
            self.fs.invalidate_cache(self.path)
            try:
                found = self.fs.ls(self.path, detail=True)
            except FileNotFoundError:
                return []
            names = (info["name"].rstrip("/").rsplit("/", 1)[-1] for info in found if info.get("type") == "directory")
            return sorted(names)

        return self._retrying("list", listing)

    def remove(self) -> None:
        """Delete a file or a whole folder (used to clear test data and stale versions)."""

        def remove() -> None:
            try:
                self.fs.rm(self.path, recursive=True)
            except FileNotFoundError:
                pass
            self.fs.invalidate_cache()

        self._retrying("remove", remove)


class _RetryingReader(io.RawIOBase):
    """A read-only, seekable stream of one file that survives transient faults: a failed read reopens the
    file and goes on from the same offset, under the Location's retry policy."""

    def __init__(self, location: Location):
        super().__init__()
        self._location, self._position, self._stream = location, 0, None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position}.get(whence)
        position = (self._location.size() if base is None else base) + offset
        if position < 0:
            raise ValueError(f"{self._location}: seek to {position}")
        self._position = position
        return position

    def readinto(self, buffer) -> int:
        def read() -> int:
            try:
                if self._stream is None:
                    self._stream = self._location.fs.open(self._location.path, "rb")
                self._stream.seek(self._position)
                return self._stream.readinto(buffer)
            except Exception:
                self._drop()  # a stream that failed mid-read is not trusted again
                raise

        count = with_retries(read, self._location.retry, f"read {self._location}")
        self._position += count
        return count

    def _drop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too; it is dropped anyway
                pass

    def close(self) -> None:
        self._drop()
        super().close()


def stage_location(root: Location, stage: str, fingerprint: str) -> Location:
    """The content-addressed output prefix `<root>/<stage>/<fingerprint>` of one stage version."""
    return root / stage / fingerprint
