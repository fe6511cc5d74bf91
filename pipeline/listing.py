"""The input listing of an image folder in ImageNet layout `<split>/<class>/<file>`, sorted and fingerprinted."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from pipeline.storage import Location, UnsafeKeyError, validate_key


@dataclass(frozen=True)
class Entry:
    """One accepted input file: sample key `<class>/<image id>` within its split."""

    split: str
    label_name: str
    key: str
    path: str  # relative to the source folder


@dataclass(frozen=True)
class Rejected:
    path: str
    reason: str


@dataclass
class Listing:
    """Every input path exactly once: as an Entry or as a Rejected with its reason."""

    entries: list[Entry] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    fingerprint: str = ""

    @property
    def count(self) -> int:
        return len(self.entries) + len(self.rejected)


def _image_id(file_name: str) -> str:
    # WebDataset splits a member name at the first dot of its base name, so the id keeps none.
    stem = file_name.rsplit(".", 1)[0] if "." in file_name else file_name
    return stem.replace(".", "_")


def _classify(path: str, splits: tuple[str, ...], seen: set[tuple[str, str]]) -> Entry | Rejected:
    parts = path.split("/")
    if len(parts) != 3 or parts[0] not in splits:
        return Rejected(path, "not in <split>/<class>/<file> layout")
    split, label_name, file_name = parts
    try:
        validate_key(f"{label_name}/{file_name}")
        key = validate_key(f"{label_name}/{_image_id(file_name)}")
    except UnsafeKeyError as error:
        return Rejected(path, f"unsafe name: {error}")
    if (split, key) in seen:
        return Rejected(path, f"duplicate key {key} in split {split}")
    seen.add((split, key))
    return Entry(split, label_name, key, path)


def _read_paths(source: Location, listing: Location | None, splits: tuple[str, ...]) -> dict[str, int | None]:
    if listing is not None:
        lines = listing.read_bytes().decode("utf-8", errors="replace").splitlines()
        return {line.strip(): None for line in lines if line.strip()}
    paths: dict[str, int | None] = {}
    for split in splits:
        split_root = Location(f"{source.uri}/{split}", source.endpoint_url, source.region)
        for relative, size in split_root.list_files().items():
            paths[f"{split}/{relative}"] = size
    return paths


def scan(source: Location, splits: tuple[str, ...], listing: Location | None = None) -> Listing:
    """List the source (or read the listing file), sort it, split accepted entries from bad names."""
    paths = _read_paths(source, listing, splits)
    result = Listing()
    seen: set[tuple[str, str]] = set()
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(f"{path}\0{paths[path]}\n".encode("utf-8", errors="surrogateescape"))
        item = _classify(path, splits, seen)
        (result.entries if isinstance(item, Entry) else result.rejected).append(item)
    result.fingerprint = digest.hexdigest()[:16]
    return result
