"""The shard stage: an image folder becomes WebDataset tars per split, written by Ray tasks."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import webdataset as wds

from pipeline.config import PipelineConfig
from pipeline.faults import DEFINITE, BadInput
from pipeline.images import ImageSettings, process_image
from pipeline.listing import Entry, Listing, SourceError, scan
from pipeline.progress import Progress
from pipeline.storage import MANIFEST, Location

NAME = "shard"
SECTION = "dataset"
FORMAT_VERSION = 2  # 2: images in shard_order (1: listing order, one class a shard); a version of another format is never grown from
UPSTREAM: tuple[str, ...] = ()

CLASSES = "classes.json"
INDEX = "index.parquet"
log = logging.getLogger("vq2")


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: its inputs in order (key, label, source path) and where it goes."""

    split: str
    index: int
    samples: tuple[tuple[str, int, str], ...]
    source: Location
    output: Location  # the dataset version folder

    @property
    def name(self) -> str:
        return f"shard-{self.index:06d}.tar"

    @property
    def tar(self) -> Location:
        return self.output / self.split / self.name

    @property
    def record(self) -> Location:
        """Sidecar JSON written after the tar: its existence marks the shard complete (for resume)."""
        return self.output / self.split / self.name.replace(".tar", ".json")


def _rejection(path: str, error: Exception) -> dict:
    """The record of an input rejected on reading: its reason, and whether that is about the file's content."""
    # A BadInput (not an image, corrupt, a bomb, too large; its message is the reason) holds while the file is
    # unchanged; the storage's answer that the file is not there (or is a folder) may not hold at the next read.
    content = isinstance(error, BadInput)
    reason = str(error) if content else f"not found: {type(error).__name__}: {error}"
    return {"path": path, "reason": reason, "content": content}


def build_shard(task: ShardTask, settings: ImageSettings) -> tuple[bytes, dict]:
    """Decode, convert and re-encode every input of a shard into tar bytes; bad inputs are rejected.

    Reads are retried on transient faults (Location); one that persists raises, failing the task, so an
    image is rejected only for what it is, never for what the storage did."""
    stream = io.BytesIO()
    keys, labels, rejected = [], [], []
    # mtime fixed so that the same inputs always give the same bytes (checksums stable across reruns).
    writer = wds.TarWriter(stream, encoder=False, mtime=0.0)
    try:
        for key, label, path in task.samples:
            try:
                data = (task.source / path).read_bytes(limit=settings.max_file_bytes)
                jpeg = process_image(data, settings)
            except (BadInput, *DEFINITE) as error:  # what the file holds, or that it is not there; anything
                rejected.append(_rejection(path, error))  # else (the storage down, a bug) fails the task
                continue
            writer.write({"__key__": key, "jpg": jpeg, "cls": str(label).encode()})
            keys.append(key)
            labels.append(label)
    finally:
        writer.close()  # closes the tar stream only; the BytesIO stays readable
    data = stream.getvalue()
    record = {
        "split": task.split,
        "name": task.name,
        "inputs": [path for _, _, path in task.samples],
        "keys": keys,
        "labels": labels,
        "samples": len(keys),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "rejected": rejected,
    }
    return data, record


def write_shard(task: ShardTask, settings: ImageSettings) -> dict:
    """Build a shard, write the tar atomically, then its record; returns the record."""
    data, record = build_shard(task, settings)
    task.tar.write_bytes(data)
    task.record.write_json(record)
    return record


@ray.remote
def write_shard_task(task: ShardTask, settings: ImageSettings) -> dict:
    return write_shard(task, settings)


def _source(cfg: PipelineConfig) -> Location:
    """The image folder, reached like the storage root (endpoint, region, retry policy)."""
    return Location.from_config(cfg.storage).at(cfg.dataset.source)


def external_inputs(cfg: PipelineConfig) -> tuple[dict[str, str], Listing]:
    """The listing of the source folder: its fingerprint goes into the stage fingerprint. A missing or empty
    source, or a configured split without files, is a SourceError naming the URI."""
    dataset = cfg.dataset
    listing_file = Location.from_config(cfg.storage).at(dataset.listing) if dataset.listing else None
    listing = scan(_source(cfg), dataset.splits, listing_file)
    return {"listing": listing.fingerprint}, listing


def _previous_versions(stage_root: Location, config: dict, own: str) -> list[tuple[dict, Location]]:
    """Complete earlier versions made with the same settings, newest first."""
    versions = []
    for name in stage_root.list_folders():
        folder = stage_root / name
        if name != own and (folder / MANIFEST).exists():
            manifest = (folder / MANIFEST).read_json()
            if manifest.get("config") == config and manifest.get("format_version") == FORMAT_VERSION:
                versions.append((manifest, folder))
    return sorted(versions, key=lambda item: item[0]["created"], reverse=True)


def _sources(listing: Listing) -> dict[tuple[str, str], Entry]:
    """Each listed sample by (split, key)."""
    return {(entry.split, entry.key): entry for entry in listing.entries}


def _changed_samples(index: pa.Table, sources: dict[tuple[str, str], Entry]) -> list[str] | None:
    """The source paths of a version's samples that are no longer listed, or not as the same file; None if the
    version cannot tell."""
    # A key can change files (x.png, once a duplicate of x.jpg's key, is the key's file when x.jpg is gone), and
    # a file can be rewritten under its name: either way a kept shard would hold another image than the listing
    # names. A version without paths and file versions in its index (written before they were kept) cannot tell.
    if not {"path", "version"} <= set(index.column_names):
        return None
    rows = zip(*(index[column].to_pylist() for column in ("split", "key", "path", "version")), strict=True)
    return [path for split, key, path, version in rows
            if (entry := sources.get((split, key))) is None or (entry.path, entry.version) != (path, version)]


def _find_base(ctx, sources: dict[tuple[str, str], Entry], config: dict) -> tuple[dict, pa.Table] | None:
    """The newest earlier version whose samples are all still listed, from the same unchanged files: its shards
    are kept."""
    for manifest, folder in _previous_versions(ctx.output.parent, config, ctx.fingerprint):
        index = pq.read_table(io.BytesIO((folder / INDEX).read_bytes()))
        changed = _changed_samples(index, sources)
        if changed == []:
            return manifest, index
        why = ("its index predates file versions" if changed is None else
               f"{len(changed)} of its samples are no longer listed, come from other files or were rewritten "
               f"in place (the first {changed[0]})")
        log.info("shard: not growing from version %s: %s", manifest["fingerprint"], why)
    return None


def _carried_rejections(base, versions: dict[str, str | None]) -> list[dict]:
    """The base version's rejections of the content of files it read that are still listed as samples,
    unchanged: not read again.

    A rejection by the listing (a bad name, a duplicate key) is never carried: the new listing decides it
    again, and a duplicate whose key's first file is gone is now a sample to read. A file rewritten in place
    (another version) is read again: it may be an image now. So is a file that was not found: it may be there
    now under the same version (moved away and back, an object put again with the same bytes, a listing file's
    name, which has no version). A rejection recorded without `content` (before it was kept) is not carried:
    its file is read once more and decided by this rule."""
    if not base:
        return []
    return [item for item in base[0]["rejected"]
            if item["by"] == "reading" and item.get("content")
            and item["path"] in versions and item.get("version") == versions[item["path"]]]


def _plan(listing: Listing, classes: dict[str, int], base, carried: list[dict], shard_size: int, source: Location,
          output: Location):
    """Shard tasks for the entries not already in the base version or rejected by reading (`carried`), numbered
    after its shards."""
    done_keys: set[tuple[str, str]] = set()
    done_paths: set[str] = set()
    next_index: dict[str, int] = defaultdict(int)
    if base:
        manifest, index = base
        done_keys = set(zip(index["split"].to_pylist(), index["key"].to_pylist(), strict=True))
        done_paths = {item["path"] for item in carried}
        for shard in manifest["shards"]:
            next_index[shard["split"]] = max(next_index[shard["split"]], int(shard["name"][6:12]) + 1)
    new: dict[str, list[Entry]] = defaultdict(list)
    for entry in listing.entries:
        if (entry.split, entry.key) not in done_keys and entry.path not in done_paths:
            new[entry.split].append(entry)
    tasks = []
    for split in sorted(new):
        entries = sorted(new[split], key=shard_order)
        for start in range(0, len(entries), shard_size):
            chunk = entries[start : start + shard_size]
            samples = tuple((e.key, classes[e.label_name], e.path) for e in chunk)
            tasks.append(ShardTask(split, next_index[split] + start // shard_size, samples, source, output))
    return tasks


def shard_order(entry: Entry) -> bytes:
    """Where an image goes among its split's new images: by a hash of its key, so a shard mixes the classes.

    A listing comes class folder by class folder, and shards cut from it in that order held one class each:
    a loader's shuffle buffer then saw one class at a time, and a classifier trained on such batches
    learned the batch's BatchNorm statistics instead of the images (0.04 val top-1 at 0.9 train accuracy
    on Fashion-MNIST). The hash keeps the order the same on every rerun and independent of the listing."""
    return hashlib.sha256(entry.key.encode()).digest()


def _class_index(listing: Listing, base) -> dict[str, int]:
    # Append-only like the shards: labels of known classes never change, new classes go last.
    names = list(base[0]["classes"]) if base else []
    names += sorted({entry.label_name for entry in listing.entries} - set(names))
    return {name: label for label, name in enumerate(names)}


def _completed(task: ShardTask) -> dict | None:
    """The record of a shard a previous (crashed) attempt finished, if its tar is there too."""
    if not (task.record.exists() and task.tar.exists()):
        return None
    record = task.record.read_json()
    return record if record["inputs"] == [path for _, _, path in task.samples] else None


def _execute(tasks: list[ShardTask], settings: ImageSettings, cfg: PipelineConfig) -> tuple[list[dict], Progress]:
    """Run the missing shards as Ray tasks, at most `ray.num_workers` in flight; returns all records."""
    completed = {task: _completed(task) for task in tasks}
    records = [record for record in completed.values() if record]
    todo = [task for task, record in completed.items() if not record]
    if records:
        log.info("shard: %d of %d shards already complete; writing %d", len(records), len(tasks), len(todo))
    remote = write_shard_task.options(
        num_cpus=cfg.ray.cpus_per_task, max_retries=cfg.ray.max_retries, retry_exceptions=True
    )
    progress = Progress("shard", len(todo))

    def collect(finished: list[ray.ObjectRef]) -> None:
        record = ray.get(finished[0])
        records.append(record)
        progress.advance(1, record["samples"])

    # Bounded in flight (as in Ray's "limit pending tasks" pattern): memory stays flat at any corpus size.
    pending: list[ray.ObjectRef] = []
    for task in todo:
        if len(pending) >= cfg.ray.num_workers:
            finished, pending = ray.wait(pending, num_returns=1)
            collect(finished)
        pending.append(remote.remote(task, settings))
    while pending:
        finished, pending = ray.wait(pending, num_returns=1)
        collect(finished)
    return records, progress


def _index_table(base, records: list[dict], fingerprint: str, sources: dict[tuple[str, str], Entry]) -> pa.Table:
    """One row per accepted sample (split, key, label, shard, source path and file version): the base version's
    rows, then the new ones."""
    columns = {"split": [], "key": [], "label": [], "shard": [], "path": [], "version": []}
    for record in records:
        shard = f"{fingerprint}/{record['split']}/{record['name']}"
        for key, label in zip(record["keys"], record["labels"], strict=True):
            entry = sources[(record["split"], key)]
            columns["split"].append(record["split"])
            columns["key"].append(key)
            columns["label"].append(label)
            columns["shard"].append(shard)
            columns["path"].append(entry.path)
            columns["version"].append(entry.version)
    schema = pa.schema([("split", pa.string()), ("key", pa.string()), ("label", pa.int32()), ("shard", pa.string()),
                        ("path", pa.string()), ("version", pa.string())])
    table = pa.table(columns, schema=schema)
    return pa.concat_tables([base[1].cast(schema), table]) if base else table


def run(cfg: PipelineConfig, ctx) -> dict:
    """Shard the listing into `<output>/<split>/shard-NNNNNN.tar`; returns the manifest body."""
    listing: Listing = ctx.external
    config = cfg.dataset.model_dump(mode="json")
    sources = _sources(listing)
    base = _find_base(ctx, sources, config)
    if base:
        log.info("shard: growing version %s (append-only)", base[0]["fingerprint"])
    classes = _class_index(listing, base)
    source = _source(cfg)
    versions = {entry.path: entry.version for entry in listing.entries}  # of the listed samples' files
    carried = _carried_rejections(base, versions)
    tasks = _plan(listing, classes, base, carried, cfg.dataset.shard_size, source, ctx.output)
    records, progress = _execute(tasks, ImageSettings.from_config(cfg.dataset), cfg)
    records.sort(key=lambda record: (record["split"], record["name"]))

    shards = list(base[0]["shards"]) if base else []
    shards += [
        {key: record[key] for key in ("split", "name", "samples", "bytes", "sha256")} | {"dataset": ctx.fingerprint}
        for record in records
    ]
    # "by", "content" and "version" tell a growing version which rejections to carry (those of reading an
    # unchanged file's content) and which to decide again.
    rejected = list(carried)
    rejected += [{"path": item.path, "reason": item.reason, "by": "listing"} for item in listing.rejected]
    rejected += [item | {"by": "reading", "version": versions[item["path"]]}
                 for record in records for item in record["rejected"]]
    rejected.sort(key=lambda item: item["path"])
    accepted = sum(shard["samples"] for shard in shards)
    # Every listed path is accounted for exactly once; a mismatch is a bug, never a silent loss.
    if accepted + len(rejected) != listing.count:
        raise RuntimeError(f"shard: {listing.count} inputs but {accepted} accepted + {len(rejected)} rejected")
    for split in cfg.dataset.splits:
        # Listed but all rejected (a listing file under a mistyped source, say): an empty split is no dataset.
        if not any(shard["samples"] for shard in shards if shard["split"] == split):
            reasons = [f"{item['path']}: {item['reason']}" for item in rejected if item["path"].startswith(f"{split}/")]
            raise SourceError(f"dataset.source {source}: no usable image in split {split!r}; "
                              f"{len(reasons)} rejected, the first {reasons[0]}")

    index = _index_table(base, records, ctx.fingerprint, sources)
    sink = io.BytesIO()
    pq.write_table(index, sink, compression="zstd")
    (ctx.output / INDEX).write_bytes(sink.getvalue())
    (ctx.output / CLASSES).write_bytes(json.dumps(list(classes)).encode())

    ctx.tracking.log_metrics(
        {
            "inputs": listing.count,
            "accepted": accepted,
            "rejected": len(rejected),
            "shards_written": progress.done,
            "images_per_s": progress.rate,
        }
    )
    return {
        "config": config,
        "base": base[0]["fingerprint"] if base else None,
        "classes": list(classes),
        "counts": {"inputs": listing.count, "accepted": accepted, "rejected": len(rejected)},
        "splits": {
            split: sum(shard["samples"] for shard in shards if shard["split"] == split)
            for split in sorted({shard["split"] for shard in shards})
        },
        "shards": shards,
        "rejected": rejected,
        "files": [INDEX, CLASSES],
    }
