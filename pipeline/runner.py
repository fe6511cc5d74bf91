"""The stage runner: fingerprints, cache hits, one writer per output, resumable runs, manifests written last, MLflow runs."""

from __future__ import annotations

import importlib
import logging
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from types import ModuleType
from typing import Any

import ray

from pipeline import cluster, lineage, ray_logs, system_metrics
from pipeline.code_digest import code_digest
from pipeline.config import PipelineConfig, fingerprint, flatten, to_yaml
from pipeline.dataset import Dataset
from pipeline.lease import holder_gone, read_lease, stage_lease
from pipeline.progress import quiet_ray_data
from pipeline.storage import MANIFEST, Location, stage_location
from pipeline.system_metrics import SystemMetrics
from pipeline.tracking import StageRun, Tracker, code_version, ended_status

log = logging.getLogger("vq2")

# The stages in run order. A stage is a module with NAME, SECTION (its config section), FORMAT_VERSION,
# UPSTREAM (names of the stages it reads), optionally upstream(cfg) (those of UPSTREAM a config makes it read:
# a model taken from the Model Registry replaces a stage), optionally external_inputs(cfg) -> (fingerprints,
# data), and run(cfg, ctx) -> manifest body. Adding a stage is adding its module name here.
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
class StageAddress:
    """Where one stage's output lives for one set of inputs, and what went into its fingerprint."""

    fingerprint: str
    location: Location  # <root>/<stage>/<fingerprint>
    inputs: dict[str, str]  # upstream fingerprints, external input fingerprints and `code`, as hashed
    external: Any  # what external_inputs() returned besides fingerprints (e.g. the shard listing)


def upstream_of(module: ModuleType, cfg: PipelineConfig) -> tuple[str, ...]:
    """The upstream stages a stage reads under this config."""
    return tuple(module.upstream(cfg)) if hasattr(module, "upstream") else module.UPSTREAM


def stage_address(module: ModuleType, cfg: PipelineConfig, upstream: dict[str, str]) -> StageAddress:
    """The content address of a stage's output: a hash of its config section, the fingerprints of its
    upstream outputs (`upstream`: stage name -> fingerprint) and external inputs, the digest of the code
    it runs (pipeline/code_digest.py) and its format version. The one place this rule is written: runs,
    status, completeness checks and encode's lookup of earlier versions all call it. A model a stage takes from
    the Model Registry is an external input: the sha256 of its file (pipeline/registry.py)."""
    inputs = {name: upstream[name] for name in upstream_of(module, cfg)}
    external = None
    if hasattr(module, "external_inputs"):
        external_fingerprints, external = module.external_inputs(cfg)
        inputs |= external_fingerprints
    inputs["code"] = code_digest(module.__name__)
    stage_fingerprint = fingerprint(getattr(cfg, module.SECTION), inputs, module.FORMAT_VERSION)
    location = stage_location(Location.from_config(cfg.storage), module.NAME, stage_fingerprint)
    return StageAddress(stage_fingerprint, location, inputs, external)


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
    module: ModuleType
    cfg: PipelineConfig

    def output_for(self, upstream: dict[str, str]) -> Location:
        """This stage's output folder if its upstream outputs had these fingerprints (e.g. an earlier
        dataset version): where an earlier run of the same code and config wrote."""
        return stage_address(self.module, self.cfg, upstream).location


def cluster_size() -> int:
    return sum(1 for node in ray.nodes() if node["Alive"])


def ensure_ray(cfg: PipelineConfig) -> None:
    """Join the configured cluster (or start a local Ray) unless this process is already connected."""
    quiet_ray_data()
    if ray.is_initialized():
        return
    # ray.init replaces the SIGTERM handler with sys.exit; keep ours, which ends the MLflow runs KILLED.
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    if cfg.ray.address is None:
        ray.init(include_dashboard=False, runtime_env=ray_logs.RUNTIME_ENV)
    else:
        ray.init(address=cfg.ray.address, runtime_env=ray_logs.RUNTIME_ENV)  # merged into a Ray job's own
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm_handler)


def read_manifest(location: Location) -> dict | None:
    """The manifest of a stage output, or None while the output is incomplete."""
    manifest = location / MANIFEST
    return manifest.read_json() if manifest.exists() else None


def _fingerprints(upstream: dict[str, StageResult]) -> dict[str, str]:
    return {name: result.fingerprint for name, result in upstream.items()}


def run_stage(
    module: ModuleType, cfg: PipelineConfig, tracker: Tracker, upstream: dict[str, StageResult],
    tags: dict[str, str] | None = None,
) -> StageResult:
    """Run one stage unless its output for this fingerprint is complete; a partial output is resumed.
    `tags` go on its MLflow run (e.g. `role` of a run that is not the invocation's own stage).

    The run holds the output's lease while it works (pipeline/lease.py): a second run of the same
    config waits for this one's manifest instead of writing the same files.
    """
    address = stage_address(module, cfg, _fingerprints(upstream))
    output = address.location
    section = getattr(cfg, module.SECTION)
    tracking = tracker.start_stage(module.NAME, address.fingerprint, address.inputs,
                                   flatten(section, f"{module.SECTION}."))
    if tags:
        tracking.set_tags(tags)
    reads = {name: upstream[name] for name in upstream_of(module, cfg)}
    tracking.log_inputs(lineage.stage_inputs(module.NAME, reads, address.inputs, cfg.dataset.source,
                                             getattr(module, "TRAINS", False)))

    def cached(manifest: dict, how: str) -> StageResult:
        log.info("%s: %s at %s (made by MLflow run %s)", module.NAME, how, output, manifest.get("run_id"))
        tracking.set_tags({"cached": "true", "produced_by_run": manifest.get("run_id") or "", "output": output.uri})
        tracking.finish()
        return StageResult(module.NAME, address.fingerprint, output, manifest, cached=True)

    try:
        manifest = read_manifest(output)
        if manifest is not None:
            return cached(manifest, "cached")
        done = lambda: read_manifest(output) is not None  # noqa: E731
        with stage_lease(output, cfg.storage.lease_ttl_s, done, cfg.storage.lease_poll_s, module.NAME) as lease:
            manifest = read_manifest(output)  # the run that held the lease before may have finished it
            if manifest is not None:
                return cached(manifest, "made by a concurrent run" if lease is None else "cached")
            log.info("%s: running into %s", module.NAME, output)
            ensure_ray(cfg)  # only now: a pipeline whose stages are all cached never starts Ray
            # Here, not in the stages: what a stage asks of the cluster is not part of the code it runs.
            cluster.require(cluster.stage_demand(cfg, module.NAME), cfg.ray)
            tracking.set_tags({"cached": "false", "output": output.uri, "cluster_size": str(cluster_size())})
            started = time.monotonic()
            ctx = StageContext(module.NAME, address.fingerprint, Location.from_config(cfg.storage), output, upstream,
                               address.external, tracking, module, cfg)
            with SystemMetrics(tracking, cfg.mlflow.system_metrics_s, system_metrics.node_id()):
                body = module.run(cfg, ctx)
            wall_time_s = time.monotonic() - started
            tracking.log_metrics({"wall_time_s": wall_time_s})
            lease.check()  # the backlog files under the output are this run's workers' only while it holds the lease
            # Before the manifest, so that what MLflow has not received yet is listed in it, and so that a run
            # MLflow could not create when the stage started, created since, is the one the manifest names.
            tracker.replay(output)
            tracker.flush()
            lease.check()  # after the flush, which may take mlflow.flush_timeout_s: still this run's output
            manifest = body | {
                "stage": module.NAME,
                "fingerprint": address.fingerprint,
                "format_version": module.FORMAT_VERSION,
                "inputs": address.inputs,
                "run_id": tracking.run_id,
                "code_version": code_version(),
                "created": datetime.now(timezone.utc).isoformat(),
                "wall_time_s": wall_time_s,
                "tracking_backlog": tracker.backlog(),
            }
            # Written last: its presence is what marks every file it lists as complete.
            (output / MANIFEST).write_json(manifest)
    except BaseException as error:
        tracking.finish(ended_status(error))
        raise
    tracking.log_dict(manifest, MANIFEST)
    tracking.finish()
    return StageResult(module.NAME, address.fingerprint, output, manifest, cached=False)


class StageFailed(RuntimeError):
    """A stage raised; the stages before it are complete and a rerun reuses them."""

    def __init__(self, stage: str, completed: list[str], error: BaseException):
        self.stage, self.completed = stage, completed
        reusable = ", ".join(completed) or "none"
        super().__init__(f"stage {stage} failed: {type(error).__name__}: {error}\n"
                         f"completed stages (reused by a rerun, which resumes {stage}): {reusable}")


def _stage(module: ModuleType, cfg: PipelineConfig, tracker: Tracker, upstream: dict[str, StageResult],
           execute: bool, tags: dict[str, str] | None = None) -> StageResult:
    if not execute:
        return _require_complete(module, cfg, upstream)
    try:
        return run_stage(module, cfg, tracker, upstream, tags)
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
    wanted = set(available) if last is None else _needed_upstream(available, last, cfg) | {last}
    tracker = Tracker(cfg)
    tracker.start_pipeline(command, to_yaml(cfg))
    results: dict[str, StageResult] = {}
    pinned: dict[str, StageResult] | None = None  # what the training stages see under the encode policy
    error: BaseException | None = None
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
                    # A second run of this stage under the same parent, on the pinned dataset: tagged so that
                    # `vq2 compare` shows the newest dataset's run as this invocation's stage, not this one.
                    pinned[name] = _stage(module, cfg, tracker, pinned, execute, {"role": "training_input"})
            if name == "shard" and (first := pinned_dataset(cfg, results["shard"])) is not None:
                log.info("policy.on_new_data=encode: training stages keep dataset %s", first.fingerprint)
                pinned = {"shard": first}
    except BaseException as caught:
        error = caught
        raise
    finally:
        tracker.finish_pipeline(ended_status(error))
    return results


def pipeline_status(cfg: PipelineConfig) -> list[dict]:
    """For each stage: complete, partial (a crashed run left files; a rerun resumes) or missing, and where.

    Fingerprints come from the config and the upstream fingerprints, so downstream stages of a
    missing stage are still located. (Under the encode policy this shows the newest dataset's view.)
    """
    fingerprints: dict[str, str] = {}
    rows = []
    for name, module in stages().items():
        address = stage_address(module, cfg, fingerprints)
        output = address.location
        manifest = read_manifest(output)
        holder = read_lease(output) if manifest is None else None
        if manifest is not None:
            state = "complete"
        elif holder is not None and not holder_gone(holder):  # expired, or its process on this machine is gone
            state = "running"
        else:
            state = "partial" if output.list_files() else "missing"
        rows.append({"stage": name, "state": state, "fingerprint": address.fingerprint, "output": output.uri,
                     "run_id": (manifest or {}).get("run_id"), "created": (manifest or {}).get("created"),
                     "lease_owner": holder["owner"] if state == "running" else None})
        fingerprints[name] = address.fingerprint
    return rows


def _needed_upstream(available: dict[str, ModuleType], stage: str, cfg: PipelineConfig) -> set[str]:
    needed, todo = set(), list(upstream_of(available[stage], cfg))
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(upstream_of(available[name], cfg))
    return needed


class StageIncomplete(RuntimeError):
    """A stage run alone reads an upstream output that is not complete (`vq2 encode` on a fresh root)."""

    def __init__(self, stage: str, location: Location):
        self.stage, self.location = stage, location
        super().__init__(f"{stage} output {location} is not complete: make it first with `vq2 run --until {stage}`")


def _require_complete(module: ModuleType, cfg: PipelineConfig, upstream: dict[str, StageResult]) -> StageResult:
    address = stage_address(module, cfg, _fingerprints(upstream))
    manifest = read_manifest(address.location)
    if manifest is None:
        raise StageIncomplete(module.NAME, address.location)
    return StageResult(module.NAME, address.fingerprint, address.location, manifest, cached=True)
