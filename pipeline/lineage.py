"""Data lineage in MLflow: the datasets a stage run reads, logged as the run's inputs.

Each input is an MLflow dataset whose source is the URI of the stage output (or image folder) it read and
whose digest is that output's fingerprint, so MLflow's UI shows which version of the data every model was
trained on; its schema and profile (row counts per split) come from the output's manifest. The model files
a stage reads are not datasets: they reach MLflow as registered models (pipeline/registry.py).
"""

from __future__ import annotations

import json

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.types.schema import Array, ColSpec, DataType, Schema

from pipeline.codes import level_names
from pipeline.storage import Location

CONTEXT_TAG = "mlflow.data.context"  # what MLflow's UI shows beside a run's dataset ("training", ...)


def _schema(columns: list[ColSpec]) -> str:
    return json.dumps({"mlflow_colspec": Schema(columns).to_dict()})


def _dataset(name: str, location: Location, fingerprint: str, columns: list[ColSpec], profile: dict) -> Dataset:
    source_type = "local" if location.protocol == "file" else location.protocol
    return Dataset(name, fingerprint, source_type, json.dumps({"uri": location.uri}), _schema(columns),
                   json.dumps(profile, sort_keys=True))


def _code_columns(levels: int) -> list[ColSpec]:
    return [ColSpec(DataType.string, "key"), ColSpec(DataType.integer, "label")] + [
        ColSpec(Array(DataType.integer), name) for name in level_names(levels)]


def shards_dataset(location: Location, fingerprint: str, manifest: dict) -> Dataset:
    """A shard-stage version: WebDataset tars of (key, jpg, cls)."""
    columns = [ColSpec(DataType.string, "__key__"), ColSpec(DataType.binary, "jpg"), ColSpec(DataType.integer, "cls")]
    splits = manifest.get("splits") or {}
    return _dataset("shards", location, fingerprint, columns,
                    {"num_rows": sum(splits.values()), "splits": splits, "shards": len(manifest.get("shards", [])),
                     "classes": len(manifest.get("classes", []))})


def codes_dataset(location: Location, fingerprint: str, manifest: dict) -> Dataset:
    """An encode output: Parquet code tables, one column per level."""
    return _dataset("codes", location, fingerprint, _code_columns(len(manifest["layout"]["grids"])),
                    {"num_rows": manifest["rows"], "splits": manifest["splits"],
                     "files": sum(len(entries) for entries in manifest["files"].values()),
                     "parquet_bytes": manifest.get("parquet_bytes")})


def samples_dataset(location: Location, fingerprint: str, manifest: dict) -> Dataset:
    """A sample output: code tables with seed, temperature and score per sample, and PNG tars."""
    columns = _code_columns(len(manifest["layout"]["grids"])) + [
        ColSpec(DataType.long, "seed"), ColSpec(Array(DataType.float), "temperature"), ColSpec(DataType.float, "score")]
    metrics = manifest.get("metrics", {})
    return _dataset("samples", location, fingerprint, columns,
                    {"num_rows": metrics.get("samples"), "accepted": metrics.get("accepted"),
                     "batches": manifest["batches"], "classes": len(manifest.get("classes", []))})


def images_dataset(source: Location, listing_fingerprint: str) -> Dataset:
    """The shard stage's source: an image folder <split>/<class>/<file> as listed."""
    columns = [ColSpec(DataType.string, "path"), ColSpec(DataType.binary, "image")]
    return _dataset("images", source, listing_fingerprint, columns, {})


DESCRIBE = {"shard": shards_dataset, "encode": codes_dataset, "sample": samples_dataset}
CONTEXTS = {"evaluate": "evaluation"}  # else "training" for the training stages, "input" for the others


def stage_inputs(stage: str, reads: dict, inputs: dict[str, str], source: str, trains: bool) -> list[DatasetInput]:
    """The dataset inputs of one stage run: the upstream outputs it reads that are data (`reads`: StageResults
    by stage name), and for the shard stage its image folder `source` (`inputs['listing']`: the listing's
    fingerprint)."""
    tags = [InputTag(CONTEXT_TAG, CONTEXTS.get(stage, "training" if trains else "input"))]
    found = [DESCRIBE[name](result.location, result.fingerprint, result.manifest)
             for name, result in sorted(reads.items()) if name in DESCRIBE]
    if stage == "shard" and "listing" in inputs:
        found.append(images_dataset(Location(source), inputs["listing"]))
    return [DatasetInput(dataset, tags) for dataset in found]
