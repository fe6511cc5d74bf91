"""The stage runner: fingerprints, cache hits, resumable runs, manifests written last, MLflow runs."""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from types import ModuleType
from typing import Any

import ray

from pipeline.config import PipelineConfig, fingerprint, flatten, to_yaml
from pipeline.dataset import Dataset
from pipeline.storage import MANIFEST, Location, stage_location
from pipeline.tracking import StageRun, Tracker, code_version

log = logging.getLogger("vq2")

# The stages in run order. A stage is a module with NAME, SECTION (its config section), FORMAT_VERSION,
# UPSTREAM (names of the stages it reads), optionally external_inputs(cfg) -> (fingerprints, data),
# and run(cfg, ctx) -> manifest body. Adding a stage is adding its module name here.
STAGE_MODULES = (
    "pipeline.shard",
    "pipeline.train_vqvae",
    "pipeline.encode",
    "pipeline.train_classifier",
    "pipeline.train_prior",
    "pipeline.sample",
    "pipeline.evaluate",
)


def stages() -> dict[str, ModuleType]:
    """Stage name -> module, in run order."""
    modules = [importlib.import_module(name) for name in STAGE_MODULES]
    return {module.NAME: module for module in modules}


@dataclass(frozen=True)
class StageResult:
    """A complete stage output: where it is, its fingerprint and manifest, whether this run made it."""

    name: str
    fingerprint: str
    location: Location
    manifest: dict
    cached: bool


@dataclass
class StageContext:
    """What `run(cfg, ctx)` gets: its output folder, upstream results, external inputs, its MLflow run."""

    name: str
    fingerprint: str
    root: Location
    output: Location  # <root>/<stage>/<fingerprint>; the stage writes here, the runner adds the manifest
    upstream: dict[str, StageResult]
    external: Any  # what external_inputs() returned besides fingerprints (e.g. the shard listing)
    tracking: StageRun


def cluster_size() -> int:
    return sum(1 for node in ray.nodes() if node["Alive"])


def ensure_ray(cfg: PipelineConfig) -> None:
    """Join the configured cluster (or start a local Ray) unless this process is already connected."""
    if ray.is_initialized():
        return
    if cfg.ray.address is None:
        ray.init(include_dashboard=False,
                 runtime_env={"worker_process_setup_hook": "pipeline.ray_logs.quiet_placement_group_cleaner"})
    else:
        ray.init(address=cfg.ray.address)


def read_manifest(location: Location) -> dict | None:
    """The manifest of a stage output, or None while the output is incomplete."""
    manifest = location / MANIFEST
    return manifest.read_json() if manifest.exists() else None


def _inputs(module: ModuleType, cfg: PipelineConfig, upstream: dict[str, StageResult]) -> tuple[dict, Any]:
    fingerprints = {name: upstream[name].fingerprint for name in module.UPSTREAM}
    external = None
    if hasattr(module, "external_inputs"):
        external_fingerprints, external = module.external_inputs(cfg)
        fingerprints |= external_fingerprints
    return fingerprints, external


def run_stage(
    module: ModuleType, cfg: PipelineConfig, tracker: Tracker, upstream: dict[str, StageResult]
) -> StageResult:
    """Run one stage unless its output for this fingerprint is complete; a partial output is resumed."""
    root = Location.from_config(cfg.storage)
    section = getattr(cfg, module.SECTION)
    inputs, external = _inputs(module, cfg, upstream)
    stage_fingerprint = fingerprint(section, inputs, module.FORMAT_VERSION)
    output = stage_location(root, module.NAME, stage_fingerprint)
    tracking = tracker.start_stage(module.NAME, stage_fingerprint, inputs, flatten(section, f"{module.SECTION}."))

    manifest = read_manifest(output)
    if manifest is not None:
        log.info("%s: cached at %s (made by MLflow run %s)", module.NAME, output, manifest.get("run_id"))
        tracking.set_tags({"cached": "true", "produced_by_run": manifest.get("run_id") or "", "output": output.uri})
        tracking.finish()
        return StageResult(module.NAME, stage_fingerprint, output, manifest, cached=True)

    log.info("%s: running into %s", module.NAME, output)
    ensure_ray(cfg)  # only now: a pipeline whose stages are all cached never starts Ray
    tracking.set_tags({"cached": "false", "output": output.uri, "cluster_size": str(cluster_size())})
    started = time.monotonic()
    ctx = StageContext(module.NAME, stage_fingerprint, root, output, upstream, external, tracking)
    try:
        body = module.run(cfg, ctx)
    except BaseException:
        tracking.finish("FAILED")
        raise
    wall_time_s = time.monotonic() - started
    tracking.log_metrics({"wall_time_s": wall_time_s})
    manifest = body | {
        "stage": module.NAME,
        "fingerprint": stage_fingerprint,
        "format_version": module.FORMAT_VERSION,
        "inputs": inputs,
        "run_id": tracking.run_id,
        "code_version": code_version(),
        "created": datetime.now(timezone.utc).isoformat(),
        "wall_time_s": wall_time_s,
        "tracking_failures": list(tracker.failures),
    }
    # Written last: its presence is what marks every file it lists as complete.
    (output / MANIFEST).write_json(manifest)
    tracking.log_dict(manifest, MANIFEST)
    tracking.finish()
    return StageResult(module.NAME, stage_fingerprint, output, manifest, cached=False)


class StageFailed(RuntimeError):
    """A stage raised; the stages before it are complete and a rerun reuses them."""

    def __init__(self, stage: str, completed: list[str], error: BaseException):
        self.stage, self.completed = stage, completed
        reusable = ", ".join(completed) or "none"
        super().__init__(f"stage {stage} failed: {type(error).__name__}: {error}\n"
                         f"completed stages (reused by a rerun, which resumes {stage}): {reusable}")


def _stage(module: ModuleType, cfg: PipelineConfig, tracker: Tracker, upstream: dict[str, StageResult],
           execute: bool) -> StageResult:
    if not execute:
        return _require_complete(module, cfg, upstream)
    try:
        return run_stage(module, cfg, tracker, upstream)
    except Exception as error:
        raise StageFailed(module.NAME, [name for name in upstream], error) from error


def pinned_dataset(cfg: PipelineConfig, shard: StageResult) -> StageResult | None:
    """Under `policy.on_new_data: encode`, the first version of a grown dataset: the one the training
    stages keep seeing, so new images are encoded with the existing models instead of retraining them."""
    if cfg.policy.on_new_data != "encode" or not shard.manifest.get("base"):
        return None
    try:
        *_, first = Dataset(shard.location, shard.manifest).ancestors()
    except FileNotFoundError as error:
        raise RuntimeError(f"an ancestor of dataset version {shard.location} is not complete: {error}") from error
    return StageResult("shard", first.manifest["fingerprint"], first.location, first.manifest, cached=True)


def run_pipeline(cfg: PipelineConfig, only: str | None = None, command: str = "run",
                 until: str | None = None) -> dict[str, StageResult]:
    """Run every stage in order (or only `only`, whose upstream outputs must already be complete; or the
    stages up to `until` and what it needs).

    Training stages (TRAINS = True) see the dataset that `policy.on_new_data` chooses: the newest
    version ("retrain"), or the first version of its append-only lineage ("encode"); the other
    stages always see the newest one.
    """
    available = stages()
    for stage in (only, until):
        if stage is not None and stage not in available:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(available)}")
    last = only or until
    wanted = set(available) if last is None else _needed_upstream(available, last) | {last}
    tracker = Tracker(cfg)
    tracker.start_pipeline(command, to_yaml(cfg))
    results: dict[str, StageResult] = {}
    pinned: dict[str, StageResult] | None = None  # what the training stages see under the encode policy
    status = "FAILED"
    try:
        for index, (name, module) in enumerate(available.items()):
            if name not in wanted:
                continue
            execute = only is None or name == only
            trains = getattr(module, "TRAINS", False)
            results[name] = _stage(module, cfg, tracker, pinned if pinned is not None and trains else results, execute)
            if pinned is not None:
                later_training = [m for m in list(available.values())[index + 1 :] if getattr(m, "TRAINS", False)]
                if trains:
                    pinned[name] = results[name]
                elif any(name in m.UPSTREAM for m in later_training):
                    pinned[name] = _stage(module, cfg, tracker, pinned, execute)
            if name == "shard" and (first := pinned_dataset(cfg, results["shard"])) is not None:
                log.info("policy.on_new_data=encode: training stages keep dataset %s", first.fingerprint)
                pinned = {"shard": first}
        status = "FINISHED"
    finally:
        tracker.finish_pipeline(status)
    if tracker.failures:
        log.warning("MLflow tracking failed during this run (data is complete): %s", "; ".join(tracker.failures))
    return results


def pipeline_status(cfg: PipelineConfig) -> list[dict]:
    """For each stage: complete, partial (a crashed run left files; a rerun resumes) or missing, and where.

    Fingerprints come from the config and the upstream fingerprints, so downstream stages of a
    missing stage are still located. (Under the encode policy this shows the newest dataset's view.)
    """
    root = Location.from_config(cfg.storage)
    upstream: dict[str, StageResult] = {}
    rows = []
    for name, module in stages().items():
        inputs, _ = _inputs(module, cfg, upstream)
        stage_fingerprint = fingerprint(getattr(cfg, module.SECTION), inputs, module.FORMAT_VERSION)
        output = stage_location(root, name, stage_fingerprint)
        manifest = read_manifest(output)
        state = "complete" if manifest is not None else "partial" if output.list_files() else "missing"
        rows.append({"stage": name, "state": state, "fingerprint": stage_fingerprint, "output": output.uri,
                     "run_id": (manifest or {}).get("run_id"), "created": (manifest or {}).get("created")})
        upstream[name] = StageResult(name, stage_fingerprint, output, manifest or {}, cached=manifest is not None)
    return rows


def _needed_upstream(available: dict[str, ModuleType], stage: str) -> set[str]:
    needed, todo = set(), list(available[stage].UPSTREAM)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(available[name].UPSTREAM)
    return needed


def _require_complete(module: ModuleType, cfg: PipelineConfig, upstream: dict[str, StageResult]) -> StageResult:
    root = Location.from_config(cfg.storage)
    inputs, _ = _inputs(module, cfg, upstream)
    stage_fingerprint = fingerprint(getattr(cfg, module.SECTION), inputs, module.FORMAT_VERSION)
    output = stage_location(root, module.NAME, stage_fingerprint)
    manifest = read_manifest(output)
    if manifest is None:
        raise RuntimeError(f"{module.NAME} output {output} is not complete: run `vq2 {module.NAME}` or `vq2 run` first")
    return StageResult(module.NAME, stage_fingerprint, output, manifest, cached=True)
