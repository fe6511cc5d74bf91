"""Encode the corpus into Parquet code tables with the trained VQ-VAE: Ray Data, one encoder actor per model copy.

Output layout (under the stage's content-addressed prefix `<root>/encode/<fingerprint>/`):

    <split>/codes-<shard index>.parquet   one zstd Parquet file per input shard, rows in shard order;
                                          columns key (string), label (int32), one fixed_size_list<int16>
                                          column per level (top, ..., bottom; row-major h*w codes);
                                          metadata `vq2.codes`: grids, codebook sizes, VQ-VAE model URI
                                          and train_vqvae fingerprint (pipeline/codes.py)
    stats/<split>/codes-<index>.json      per-shard statistics (rows, code histograms, reconstruction
                                          error), written after the Parquet file: the pair marks the
                                          shard done, so a crashed run resumes without duplicate rows
    manifest.json                         written last: files per split with row counts, the layout, totals

A grown dataset (append-only, see the shard stage) is encoded incrementally: the code tables of the
shards it shares with an earlier version, encoded by this VQ-VAE with this config, are copied from
that version's encode output; only the new shards are encoded. A table copied or left by a crashed run
is kept only if it holds this VQ-VAE's codes (its CodesLayout: fingerprint, grids and codebooks, not the
model URI, which differs when the root is reached by another path); any other is encoded again.

Later stages find a split's files with `code_files(result_or_location, split)` (validated footers),
read them whole with `read_split`, or stream them with `ray_dataset` (Ray Data `read_parquet`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import asdict

import numpy as np
import ray
import ray.data
import torch

from pipeline.actor_pool import pool_rows
from pipeline.checkpoints import load_model
from pipeline.codes import CodesLayout, CodesSchemaError, codes_file_info, codes_table, read_codes, write_codes
from pipeline.config import PipelineConfig
from pipeline.dataset import Dataset
from pipeline.faults import RetryPolicy
from pipeline.progress import Progress
from pipeline.shard_reader import batch_loader, to_model_range
from pipeline.storage import MANIFEST, Location

log = logging.getLogger("vq2")

NAME = "encode"
SECTION = "encode"
FORMAT_VERSION = 1
UPSTREAM = ("shard", "train_vqvae")
STATS = "stats"
MSE_SPLIT = "val"  # the split whose reconstruction error is measured (decode the codes, compare)


def code_file_name(shard_name: str) -> str:
    """`shard-000123.tar` -> `codes-000123.parquet`."""
    stem = shard_name.removesuffix(".tar")
    return f"codes-{stem.removeprefix('shard-')}.parquet"


def layout_for(vqvae_result) -> CodesLayout:
    """The code-table layout a train_vqvae output produces: its grids, codebooks, model URI and fingerprint."""
    manifest = vqvae_result.manifest
    grids = [tuple(grid) for grid in manifest["grids"]]
    return CodesLayout(
        grids=grids,
        codebook_sizes=[manifest["vqvae_config"]["codebook_size"]] * len(grids),
        vqvae_model=(vqvae_result.location / manifest["model"]).uri,
        vqvae_fingerprint=vqvae_result.fingerprint,
    )


# ----------------------------------------------------------------------------------------- one shard


def encode_shard(task: dict, model: torch.nn.Module, layout: CodesLayout, batch_size: int, loader_workers: int,
                 device: torch.device) -> dict:
    """Encode one tar into its Parquet file (atomically), then its stats record; returns the stats."""
    endpoint, region, retry = task["endpoint_url"], task["region"], RetryPolicy(**task["retry"])
    shard = Location(task["shard"], endpoint, region, retry)
    measure = task["split"] == MSE_SPLIT
    keys, labels, codes = [], [], [[] for _ in layout.grids]
    histograms = [torch.zeros(k, dtype=torch.int64) for k in layout.codebook_sizes]
    squared_error, elements = 0.0, 0
    started, started_at = time.perf_counter(), time.time()
    with torch.inference_mode():
        for batch_keys, images, batch_labels in batch_loader([shard], batch_size, repeat=False, workers=loader_workers):
            x = to_model_range(images.to(device, non_blocking=True))
            grids = model.encode(x)
            if measure:
                y = model.decode_codes(grids)
                squared_error += float(((y - x) ** 2).sum(dtype=torch.float64))
                elements += x.numel()
            keys += batch_keys
            labels.append(batch_labels)
            for level, grid in enumerate(grids):
                grid = grid.cpu()
                histograms[level] += torch.bincount(grid.reshape(-1), minlength=layout.codebook_sizes[level])
                codes[level].append(grid.to(torch.int16))
    if len(keys) != task["samples"]:
        raise RuntimeError(f"{shard}: read {len(keys)} samples, the shard manifest says {task['samples']}")
    if not keys:
        codes = [torch.zeros(0, h, w, dtype=torch.int16) for h, w in layout.grids]
        labels_all = np.zeros(0, np.int32)
    else:
        codes = [torch.cat(level) for level in codes]
        labels_all = torch.cat(labels).numpy()
    table = codes_table(keys, labels_all, codes, layout)
    output = Location(task["output"], endpoint, region, retry)
    write_codes(output, table)
    stats = {
        "split": task["split"],
        "shard": task["shard_name"],
        "file": task["file"],
        "rows": len(keys),
        "histograms": [h.tolist() for h in histograms],
        "squared_error": squared_error,
        "elements": elements,
        "seconds": time.perf_counter() - started,
        "started_at": started_at,  # wall clock (epoch s): the stage's steady rate spans first start to last end
        "finished_at": time.time(),
    }
    Location(task["stats"], endpoint, region, retry).write_json(stats)  # after the table: the pair marks it done
    return stats


class ShardEncoder:
    """A Ray Data actor: one VQ-VAE, loaded once; each call encodes the shards of a batch of tasks."""

    def __init__(self, model: str, endpoint_url: str | None, region: str | None, retry: RetryPolicy,
                 layout: CodesLayout, batch_size: int, loader_workers: int, use_gpu: bool, threads: int):
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model, _ = load_model(Location(model, endpoint_url, region, retry), "vqvae", map_location=self.device)
        self.model.to(self.device)
        self.layout, self.batch_size, self.loader_workers = layout, batch_size, loader_workers

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [
            json.dumps(encode_shard(json.loads(str(task)), self.model, self.layout, self.batch_size,
                                    self.loader_workers, self.device))
            for task in batch["task"]
        ]
        return {"stats": np.array(results, dtype=object)}


# ----------------------------------------------------------------------------------------- the stage


def _plan(dataset: Dataset, output: Location) -> list[dict]:
    """One task per input shard, in manifest order; each names its tar, Parquet file and stats record."""
    tasks, seen = [], set()
    for shard in dataset.manifest["shards"]:
        file = f"{shard['split']}/{code_file_name(shard['name'])}"
        if file in seen:
            raise RuntimeError(f"two shards of split {shard['split']!r} map to {file}: shard names must be unique")
        seen.add(file)
        tasks.append({
            "split": shard["split"],
            "shard_name": f"{shard['split']}/{shard['name']}",
            "shard": dataset.shard_location(shard).uri,
            "sha256": shard["sha256"],
            "samples": shard["samples"],
            "file": file,
            "output": (output / file).uri,
            "stats": (output / STATS / file.replace(".parquet", ".json")).uri,
            "endpoint_url": output.endpoint_url,
            "region": output.region,
            "retry": asdict(output.retry),
        })
    return tasks


def _same_codes(file: Location, layout: CodesLayout) -> bool:
    """Whether a code table written before this run holds this stage's codes. One that does not is encoded
    again: kept, it would fail _verify on this run and every rerun, which would resume it again."""
    try:
        found, _ = codes_file_info(file)
    except CodesSchemaError:
        return False
    return found == layout


def _completed(task: dict, output: Location, layout: CodesLayout) -> dict | None:
    """The stats of a shard finished by an earlier (crashed) run: its Parquet file, of this layout, and stats."""
    stats_file = output.at(task["stats"])
    if not (stats_file.exists() and (output / task["file"]).exists()):
        return None
    stats = stats_file.read_json()
    return stats if stats.get("rows") == task["samples"] and _same_codes(output / task["file"], layout) else None


def _earlier_outputs(ctx, dataset: Dataset) -> list[tuple[Location, Dataset]]:
    """(encode output, its dataset) for each version `dataset` grew from whose encode output with the
    same VQ-VAE and encode config is complete; newest first."""
    found = []
    try:
        for ancestor in dataset.ancestors():
            earlier = ctx.output_for({"shard": ancestor.manifest["fingerprint"],
                                      "train_vqvae": ctx.upstream["train_vqvae"].fingerprint})
            if (earlier / MANIFEST).exists():
                found.append((earlier, ancestor))
    except FileNotFoundError:  # an ancestor was deleted: nothing older can be reused either
        pass
    return found


def _reuse(todo: list[dict], earlier_outputs: list[tuple[Location, Dataset]], output: Location,
           layout: CodesLayout) -> dict[str, dict]:
    """Copy the code table and stats of every shard in `todo` that an earlier output encoded from the very
    same tar (location and checksum) into the same codes; returns their stats by file. Copies are atomic
    writes, table first."""
    reused = {}
    for earlier, dataset in earlier_outputs:
        before = len(reused)
        shards = {(dataset.shard_location(s).uri, s["sha256"]) for s in dataset.manifest["shards"]}
        for task in todo:
            if task["file"] in reused or (task["shard"], task["sha256"]) not in shards:
                continue
            stats_file = f"{STATS}/{task['file'].replace('.parquet', '.json')}"
            stats = (earlier / stats_file).read_json()
            if stats.get("rows") != task["samples"] or not _same_codes(earlier / task["file"], layout):
                continue
            (output / task["file"]).write_bytes((earlier / task["file"]).read_bytes())
            (output / stats_file).write_json(stats)
            reused[task["file"]] = stats
        if len(reused) > before:
            log.info("encode: %d shards copied from %s (the same tars, VQ-VAE and config)", len(reused) - before,
                     earlier)
    return reused


def _execute(todo: list[dict], cfg: PipelineConfig, layout: CodesLayout, root: Location) -> list[dict]:
    """Encode the shards not yet done with an actor pool; the stats of each shard as it finishes."""
    section = cfg.encode
    progress = Progress("encode", len(todo))
    if not todo:
        return []
    # One shard per call (each call writes exactly one Parquet file); a fixed pool with at most 2 shards queued
    # per actor, so the last shards do not wait behind a busy one.
    encoded = pool_rows(
        [{"task": json.dumps(task)} for task in todo], ShardEncoder,
        {"model": layout.vqvae_model, "endpoint_url": root.endpoint_url, "region": root.region, "retry": root.retry,
         "layout": layout, "batch_size": section.batch_size, "loader_workers": section.loader_workers,
         "use_gpu": section.use_gpu, "threads": max(1, int(section.cpus_per_actor))},
        actors=section.num_actors, num_cpus=section.cpus_per_actor, num_gpus=1 if section.use_gpu else 0,
    )
    results = []
    for row in encoded:
        stats = json.loads(str(row["stats"]))
        results.append(stats)
        progress.advance(1, stats["rows"])
    return results


def _verify(tasks: list[dict], output: Location, layout: CodesLayout, dataset: Dataset) -> dict[str, list[dict]]:
    """Every shard has exactly one file with its row count and the layout; totals match the shard manifest."""
    files: dict[str, list[dict]] = {}
    sizes = {split: (output / split).list_files() for split in sorted({t["split"] for t in tasks})}
    for task in tasks:
        location = output / task["file"]
        found, rows = codes_file_info(location)
        if found != layout:
            raise CodesSchemaError(f"{location}: layout {asdict(found)} differs from this stage's {asdict(layout)}")
        if rows != task["samples"]:
            raise RuntimeError(f"{location}: {rows} rows, its shard {task['shard_name']} has {task['samples']} samples")
        name = task["file"].split("/", 1)[1]
        files.setdefault(task["split"], []).append(
            {"file": task["file"], "rows": rows, "bytes": sizes[task["split"]][name], "shard": task["shard_name"]}
        )
    expected = dataset.manifest.get("splits") or {}
    for split, entries in files.items():
        rows = sum(entry["rows"] for entry in entries)
        if split in expected and rows != expected[split]:
            raise RuntimeError(f"encode: {rows} rows in split {split!r}, the shard manifest counts {expected[split]}")
    missing = sorted(set(expected) - set(files))
    if missing and any(expected[s] for s in missing):
        raise RuntimeError(f"encode: no code tables for split(s) {missing} of the shard manifest")
    return files


def usage_and_perplexity(histogram: np.ndarray) -> tuple[float, float]:
    """Fraction of the codebook used at least once, and exp(entropy) of the code frequencies."""
    total = histogram.sum()
    if total == 0:
        return 0.0, 0.0
    p = histogram[histogram > 0] / total
    return float((histogram > 0).mean()), float(math.exp(-(p * np.log(p)).sum()))


def histogram_png(histogram: np.ndarray, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_index, ranked) = plt.subplots(1, 2, figsize=(10, 3.2))
    by_index.bar(np.arange(len(histogram)), histogram, width=1.0, color="tab:blue")
    by_index.set(xlabel="code index", ylabel="count", title=title)
    ranked.plot(np.sort(histogram)[::-1], color="tab:orange")
    ranked.set(xlabel="codes ranked by use", ylabel="count", yscale="symlog", title="ranked")
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100)
    plt.close(figure)
    return out.getvalue()


def run(cfg: PipelineConfig, ctx) -> dict:
    dataset = Dataset.open(ctx.upstream["shard"].location)
    layout = layout_for(ctx.upstream["train_vqvae"])
    tasks = _plan(dataset, ctx.output)

    done = {}
    for task in tasks:
        stats = _completed(task, ctx.output, layout)
        if stats is not None:
            done[task["file"]] = stats
    todo = [task for task in tasks if task["file"] not in done]
    if done:
        log.info("encode: %d of %d shards already encoded (resuming)", len(done), len(tasks))
    reused = _reuse(todo, _earlier_outputs(ctx, dataset), ctx.output, layout) if todo else {}
    todo = [task for task in todo if task["file"] not in reused]
    started = time.perf_counter()
    results = _execute(todo, cfg, layout, ctx.root)
    seconds = time.perf_counter() - started
    stats = done | reused | {s["file"]: s for s in results}
    files = _verify(tasks, ctx.output, layout, dataset)

    encoded_images = sum(s["rows"] for s in results)
    images_per_s = encoded_images / seconds if results else None
    # Steady state: the images over the span from the first shard's start to the last one's end in the
    # actors (actor start-up and model loading excluded; on a cluster, up to the nodes' clock skew).
    span = max(s["finished_at"] for s in results) - min(s["started_at"] for s in results) if results else 0
    steady = encoded_images / span if span > 0 else None
    histograms = [np.sum([s["histograms"][level] for s in stats.values()], axis=0).astype(np.int64)
                  for level in range(len(layout.grids))]
    val = [s for s in stats.values() if s["split"] == MSE_SPLIT]
    elements = sum(s["elements"] for s in val)
    val_recon_mse = sum(s["squared_error"] for s in val) / elements if elements else None

    metrics = {}
    usage, perplexity = {}, {}
    for level, (name, histogram) in enumerate(zip(layout.levels, histograms)):
        usage[name], perplexity[name] = usage_and_perplexity(histogram)
        metrics[f"code_usage_level{level}"] = usage[name]
        metrics[f"code_perplexity_level{level}"] = perplexity[name]
        title = f"level {level} ({name}): {usage[name]:.0%} used, perplexity {perplexity[name]:.1f}"
        ctx.tracking.log_bytes(histogram_png(histogram, title), f"code_usage/level{level}_{name}.png")
    if images_per_s is not None:
        metrics["encode_images_per_s"] = images_per_s
    if steady is not None:
        metrics["encode_steady_images_per_s"] = steady
    if val_recon_mse is not None:
        metrics["val_recon_mse"] = val_recon_mse
    metrics["rows"] = sum(s["rows"] for s in stats.values())
    metrics["shards_reused"] = len(reused)
    ctx.tracking.log_metrics(metrics)
    ctx.tracking.set_tags({"vqvae_model": layout.vqvae_model})
    splits = {split: sum(entry["rows"] for entry in entries) for split, entries in files.items()}
    log.info("encode: %s rows (%s), %d shards encoded, %d copied from an earlier version, %d resumed, val MSE %s",
             sum(splits.values()), splits, len(results), len(reused), len(done),
             "n/a" if val_recon_mse is None else f"{val_recon_mse:.5f}")
    return {
        "format": "one zstd Parquet file per input shard at <split>/codes-<shard index>.parquet; columns key "
                  "(string), label (int32), one fixed_size_list<int16> per level (top first, row-major); "
                  "read with pipeline.encode.code_files / read_split / ray_dataset",
        "layout": asdict(layout),
        "levels": layout.levels,
        "files": files,
        "splits": splits,
        "rows": sum(splits.values()),
        "parquet_bytes": sum(entry["bytes"] for entries in files.values() for entry in entries),
        "shard_bytes": sum(shard["bytes"] for shard in dataset.manifest["shards"]),
        "val_recon_mse": val_recon_mse,
        "code_usage": usage,
        "code_perplexity": perplexity,
        "code_histograms": {name: h.tolist() for name, h in zip(layout.levels, histograms)},
        "shards_encoded": len(results),
        "shards_reused": len(reused),
        "shards_resumed": len(done),
        "images_encoded": encoded_images,
        "encode_seconds": seconds,
        "images_per_s": images_per_s,
        "steady_images_per_s": steady,
    }


# ----------------------------------------------------------------------------------------- readers


def _output(source) -> tuple[Location, dict]:
    """(location, manifest) of a complete encode output: a StageResult, a Location or a URI."""
    if hasattr(source, "location") and hasattr(source, "manifest"):
        return source.location, source.manifest
    location = source if isinstance(source, Location) else Location(str(source))
    manifest_file = location / MANIFEST
    if not manifest_file.exists():
        raise FileNotFoundError(f"{location}: no {MANIFEST}; not a complete encode output")
    return location, manifest_file.read_json()


def code_files(source, split: str, validate: bool = True) -> tuple[list[Location], CodesLayout]:
    """The Parquet files of one split (in shard order) and their layout, from the encode manifest.

    `source` is the encode StageResult, its Location or URI. With `validate`, every file's footer is
    checked (columns, types, layout, row count): a mismatch is a CodesSchemaError naming file and column.
    """
    location, manifest = _output(source)
    if manifest.get("stage", NAME) != NAME:
        raise ValueError(f"{location}: a {manifest.get('stage')!r} output, not an encode output")
    layout = CodesLayout(**manifest["layout"])
    if split not in manifest["files"]:
        raise ValueError(f"{location}: no split {split!r}; splits: {', '.join(manifest['files'])}")
    entries = manifest["files"][split]
    files = [location / entry["file"] for entry in entries]
    if validate:
        for file, entry in zip(files, entries):
            found, rows = codes_file_info(file)
            if found != layout:
                raise CodesSchemaError(f"{file}: layout {asdict(found)} differs from the manifest's {asdict(layout)}")
            if rows != entry["rows"]:
                raise CodesSchemaError(f"{file}: {rows} rows, the manifest lists {entry['rows']}")
    return files, layout


def read_split(source, split: str):
    """(layout, one pyarrow Table of the whole split), every file validated by read_codes."""
    import pyarrow as pa

    files, layout = code_files(source, split, validate=False)
    tables = []
    for file in files:
        found, table = read_codes(file)
        if found != layout:
            raise CodesSchemaError(f"{file}: layout {asdict(found)} differs from the manifest's {asdict(layout)}")
        tables.append(table)
    return layout, (pa.concat_tables(tables) if tables else layout.schema().empty_table())


def ray_dataset(source, split: str, **read_parquet_args) -> tuple[ray.data.Dataset, CodesLayout]:
    """A Ray Data dataset of one split's rows (read_parquet over the validated files) and the layout."""
    from pipeline.training import ray_storage

    files, layout = code_files(source, split)
    _, filesystem = ray_storage(files[0]) if files else (None, None)
    return ray.data.read_parquet([f.path for f in files], filesystem=filesystem, **read_parquet_args), layout
