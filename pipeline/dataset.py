"""A sharded dataset version as later stages read it, and `verify`: re-read every shard against the manifest."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image
from webdataset.tariterators import base_plus_ext

from pipeline.storage import MANIFEST, Location, UnsafeKeyError, validate_key


@dataclass(frozen=True)
class Dataset:
    """A complete output of the shard stage: `<root>/shard/<fingerprint>`."""

    location: Location
    manifest: dict

    @classmethod
    def open(cls, location: Location | str) -> Dataset:
        location = location if isinstance(location, Location) else Location(location)
        manifest_file = location / MANIFEST
        if not manifest_file.exists():
            raise FileNotFoundError(f"{location}: no {MANIFEST}; not a complete dataset")
        return cls(location, manifest_file.read_json())

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    def ancestors(self) -> Iterator[Dataset]:
        """The versions this one grew from (append-only growth), newest first; a missing one raises
        FileNotFoundError when it is reached."""
        dataset = self
        while base := dataset.manifest.get("base"):
            dataset = Dataset.open(dataset.location.parent / base)
            yield dataset

    def shard_location(self, shard: dict) -> Location:
        # Shards kept from an earlier version (append-only growth) live in that version's folder.
        return self.location.parent / shard["dataset"] / shard["split"] / shard["name"]

    def shards(self, split: str) -> list[Location]:
        """Tar locations of one split that hold samples, in order (for WebDataset or Ray Data readers)."""
        return [location for location, _ in self.shard_sizes(split)]

    def shard_sizes(self, split: str) -> list[tuple[Location, int]]:
        """(tar location, samples) of one split's shards that hold samples, in order. A shard whose every input
        was rejected holds none: a trainer's rank dealt only such shards would wait forever for a batch."""
        return [(self.shard_location(s), s["samples"]) for s in self.manifest["shards"]
                if s["split"] == split and s["samples"]]


def _check_tar(data: bytes, shard: dict, classes: int, seen: set[str]) -> list[str]:
    problems, members = [], Counter()
    name = f"{shard['split']}/{shard['name']}"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            try:
                validate_key(member.name)
            except UnsafeKeyError as error:
                problems.append(f"{name}: {error}")
                continue
            if not member.isfile():
                problems.append(f"{name}: member {member.name} is not a regular file")
                continue
            # Split as the reader splits it (at the first dot of the base name): a class folder may hold a dot.
            key, extension = base_plus_ext(member.name)
            if key is None:  # no extension: the reader skips it
                problems.append(f"{name}: unexpected member {member.name}")
                continue
            members[key] += 1
            payload = tar.extractfile(member).read()
            if extension == "cls" and not (payload.isdigit() and int(payload) < classes):
                problems.append(f"{name}: {key}.cls = {payload[:20]!r} is not a class index below {classes}")
            elif extension == "jpg":
                try:
                    Image.open(io.BytesIO(payload)).verify()
                except Exception as error:  # noqa: BLE001 - any decoder error is a broken sample
                    problems.append(f"{name}: {key}.jpg does not decode: {error}")
            elif extension not in ("cls", "jpg"):
                problems.append(f"{name}: unexpected member {member.name}")
    for key, count in members.items():
        if count != 2:
            problems.append(f"{name}: sample {key} has {count} members, expected .jpg and .cls")
        if (shard["split"], key) in seen:
            problems.append(f"{name}: sample {key} appears in more than one shard")
        seen.add((shard["split"], key))
    if len(members) != shard["samples"]:
        problems.append(f"{name}: {len(members)} samples, manifest says {shard['samples']}")
    return problems


def verify(location: Location | str) -> list[str]:
    """Every problem found re-reading the dataset's shards (sizes, checksums, members, counts); [] if sound."""
    dataset = Dataset.open(location)
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    for shard in dataset.manifest["shards"]:
        tar = dataset.shard_location(shard)
        if not tar.exists():
            problems.append(f"{tar}: missing")
            continue
        data = tar.read_bytes()
        if len(data) != shard["bytes"]:
            problems.append(f"{tar}: {len(data)} bytes, manifest says {shard['bytes']}")
        if hashlib.sha256(data).hexdigest() != shard["sha256"]:
            problems.append(f"{tar}: sha256 differs from the manifest")
        problems += _check_tar(data, shard, len(dataset.classes), seen)
    counts = dataset.manifest["counts"]
    if len(seen) != counts["accepted"]:
        problems.append(f"{len(seen)} samples in the shards, manifest counts {counts['accepted']} accepted")
    if counts["accepted"] + counts["rejected"] != counts["inputs"]:
        problems.append(f"counts do not add up: {counts}")
    return problems
