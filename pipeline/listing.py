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
    version: str | None = None  # storage.file_version of the listed file; None when named by a listing file


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


def _classify(path: str, version: str | None, splits: tuple[str, ...], seen: set[tuple[str, str]]) -> Entry | Rejected:
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
    return Entry(split, label_name, key, path, version)


class SourceError(ValueError):
    """A dataset source that cannot be sharded: missing, empty, or without a configured split."""


def _read_paths(source: Location, listing: Location | None, splits: tuple[str, ...]) -> dict[str, str | None]:
    """Each input path with its file version (pipeline.storage.file_version), or None when a listing file names it."""
    if listing is not None:
        if not listing.exists():
            raise SourceError(f"dataset.listing {listing}: not found")
        lines = listing.read_bytes().decode("utf-8", errors="replace").splitlines()
        return {line.strip(): None for line in lines if line.strip()}
    if not source.exists():
        raise SourceError(f"dataset.source {source}: not found (expected a folder <split>/<class>/<file>)")
    paths: dict[str, str | None] = {}
    for split in splits:
        for relative, version in (source / split).list_file_versions().items():
            paths[f"{split}/{relative}"] = version
    return paths


def scan(source: Location, splits: tuple[str, ...], listing: Location | None = None) -> Listing:
    """List the source (or read the listing file), sort it, split accepted entries from bad names.

    A source (or listing) that is missing, or has no file of a configured split, is a SourceError: it
    would make an empty dataset, and a mistyped URI looks exactly like that."""
    paths = _read_paths(source, listing, splits)
    result = Listing()
    seen: set[tuple[str, str]] = set()
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(f"{path}\0{paths[path]}\n".encode("utf-8", errors="surrogateescape"))
        item = _classify(path, paths[path], splits, seen)
        (result.entries if isinstance(item, Entry) else result.rejected).append(item)
    result.fingerprint = digest.hexdigest()[:16]
    listed = {entry.split for entry in result.entries}
    empty = [split for split in splits if split not in listed]
    if empty:
        where = f"dataset.source {source}" + (f" (listed in dataset.listing {listing})" if listing else "")
        raise SourceError(f"{where}: no file in split folder(s) {', '.join(empty)} "
                          f"(dataset.splits: {', '.join(splits)}; expected <split>/<class>/<file>)")
    return result
