"""Storage on fsspec URIs: validated keys, atomic writes, content-addressed stage prefixes."""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

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


def _s3_options(endpoint_url: str | None, region: str | None) -> dict[str, Any]:
    # Credentials are left to botocore (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, profiles, roles):
    # they never pass through config, params, logs or Ray task arguments.
    client_kwargs: dict[str, Any] = {}
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if region or os.environ.get("AWS_DEFAULT_REGION"):
        client_kwargs["region_name"] = region or os.environ["AWS_DEFAULT_REGION"]
    return {"client_kwargs": client_kwargs} if client_kwargs else {}


@dataclass(frozen=True)
class Location:
    """A file or folder URI plus what is needed to reach it; picklable, so Ray tasks can take one."""

    uri: str
    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def from_config(cls, storage_cfg) -> Location:
        """The storage root of a `StorageConfig`."""
        return cls(storage_cfg.root, storage_cfg.endpoint_url, storage_cfg.region)

    def __post_init__(self) -> None:
        if "://" not in self.uri:
            object.__setattr__(self, "uri", os.path.abspath(self.uri))
        object.__setattr__(self, "uri", self.uri.rstrip("/") or "/")

    @property
    def protocol(self) -> str:
        return self.uri.split("://", 1)[0] if "://" in self.uri else "file"

    @cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        options = _s3_options(self.endpoint_url, self.region) if self.protocol in ("s3", "s3a") else {}
        return fsspec.filesystem(self.protocol, **options)

    @property
    def path(self) -> str:
        """The path as the filesystem names it (no protocol)."""
        return self.fs._strip_protocol(self.uri)

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.uri.rsplit("/", 1)[0], self.endpoint_url, self.region)

    def __truediv__(self, key: str) -> Location:
        return Location(f"{self.uri}/{validate_key(key)}", self.endpoint_url, self.region)

    def __str__(self) -> str:
        return self.uri

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def size(self) -> int:
        return self.fs.size(self.path)

    def read_bytes(self, limit: int | None = None) -> bytes:
        """The file's bytes; with `limit`, reads at most limit + 1 bytes (so callers can reject big files)."""
        with self.fs.open(self.path, "rb") as stream:
            return stream.read(-1 if limit is None else limit + 1)

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def write_bytes(self, data: bytes) -> None:
        """Write atomically: a reader sees the old file, no file, or all of `data`, never a part."""
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
            self.fs.pipe_file(self.path, bytes(data))

    def write_json(self, obj: Any) -> None:
        self.write_bytes(json.dumps(obj, indent=1, sort_keys=True).encode())

    def list_files(self) -> dict[str, int]:
        """Every file below this folder as `relative key -> size`, sorted; empty if the folder is missing."""
        self.fs.invalidate_cache(self.path)
        if not self.exists():
            return {}
        prefix = self.path.rstrip("/") + "/"
        found = self.fs.find(self.path, detail=True)
        return {
            name[len(prefix) :]: int(info.get("size") or 0)
            for name, info in sorted(found.items())
            if info.get("type", "file") == "file" and name.startswith(prefix)
        }

    def list_folders(self) -> list[str]:
        """Names of the folders directly below this one, sorted; empty if the folder is missing."""
        self.fs.invalidate_cache(self.path)
        if not self.exists():
            return []
        return sorted(
            info["name"].rstrip("/").rsplit("/", 1)[-1]
            for info in self.fs.ls(self.path, detail=True)
            if info.get("type") == "directory"
        )

    def remove(self) -> None:
        """Delete a file or a whole folder (used to clear test data and stale versions)."""
        if self.exists():
            self.fs.rm(self.path, recursive=True)
        self.fs.invalidate_cache()


def stage_location(root: Location, stage: str, fingerprint: str) -> Location:
    """The content-addressed output prefix `<root>/<stage>/<fingerprint>` of one stage version."""
    return root / stage / fingerprint
