"""The preflight of `vq2 run`: before any work, check on the cluster itself that the stages about to run have
what they need, and fail in seconds naming what is missing.

Checked, for the stages the command would run (those whose output is not complete: cached stages need nothing):
- from the driver: the storage root takes a probe object (written, read back, deleted) and the MLflow tracking
  server answers an authenticated call (credentials only from the environment; never sent over plain HTTP
  to another machine);
- the cluster can place each stage's workers or actors now, or its autoscaler can add the nodes
  (`pipeline.cluster.require`, which waits up to ray.scale_timeout_s where ray.autoscale is true);
- on every node that can hold a stage's worker, in a Ray task with that worker's resources: the stage's
  code imports (its dependencies are installed), the feature networks it loads load, a GPU is visible where
  it asks for one, and the storage root and the tracking server are reachable from there.
Nothing is left under the storage root and no MLflow run is started.
"""

from __future__ import annotations

import dataclasses
import importlib
import ipaddress
import logging
import time
import uuid
from urllib.parse import urlsplit

import ray
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline import cluster
from pipeline.config import PipelineConfig
from pipeline.feature_nets import EFFICIENTNET_LITE0, INCEPTION, load_feature_net
from pipeline.runner import _needed_upstream, ensure_ray, pipeline_status, stages
from pipeline.storage import Location
from pipeline.tracking import check_credentials, configured_tracking_uri, credentials_in_uri, tracking_uri

log = logging.getLogger("vq2")

# A preflight is a quick look: a storage fault that outlasts a few tries fails it (stages retry by storage.retry).
PROBE_ATTEMPTS = 3
DRIVER = "the driver"


class PreflightFailed(RuntimeError):
    """What the stages about to run lack, one problem a line; nothing was run."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("preflight failed; nothing was run:\n  " + "\n  ".join(problems))


def storage_problem(root: Location, where: str) -> str | None:
    """Why the storage root does not take a probe object (written, read back, deleted) from `where`, or None."""
    retry = dataclasses.replace(root.retry, attempts=min(root.retry.attempts, PROBE_ATTEMPTS))
    probe = Location(root.uri, root.endpoint_url, root.region, retry) / f"vq2-preflight-{uuid.uuid4().hex}"
    data = uuid.uuid4().bytes
    try:
        probe.write_bytes(data)
        try:
            if probe.read_bytes() != data:
                return f"storage root {root.uri} gave back other bytes than were written to it from {where}"
        finally:
            probe.remove()
    except Exception as error:  # noqa: BLE001 - any failure is the answer
        return f"storage root {root.uri} is not writable from {where}: {type(error).__name__}: {error}"
    return None


def _loopback(host: str | None) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def tracking_problem(cfg: PipelineConfig, where: str) -> str | None:
    """Why the MLflow tracking server does not answer an authenticated call from `where`, or None. A local store
    (sqlite or files) has no server to reach; the default one lives under the local root the storage probe checks."""
    uri = configured_tracking_uri(cfg)
    if uri is None:
        if Location.from_config(cfg.storage).protocol == "file":
            return None
        try:
            tracking_uri(cfg)  # refuses a remote root without a tracking server, saying what to set
        except ValueError as error:
            return str(error)
        return None
    parsed = urlsplit(uri)
    if parsed.scheme not in ("http", "https"):
        return None
    if (problem := credentials_in_uri(uri)) is not None:
        return problem
    credentials = get_default_host_creds(uri)
    if parsed.scheme == "http" and (credentials.username or credentials.token) and not _loopback(parsed.hostname):
        return f"MLflow credentials would cross the network in clear text to {uri}: use https://"
    try:
        check_credentials(uri, cfg.mlflow.request_timeout_s)
    except MlflowException as error:
        status = error.get_http_status_code()
        if status in (401, 403):
            return (f"MLflow at {uri} refused the credentials of {where} (HTTP {status}): set MLFLOW_TRACKING_USERNAME "
                    "and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN")
        return f"MLflow at {uri} is not reachable from {where}: {error}"
    return None


def packaged_nets(cfg: PipelineConfig, stage: str) -> dict[str, str | None]:
    """The feature networks a stage loads from installed packages (or configured weights): name -> weights."""
    if stage == "sample" and cfg.sample.rejection.classifier == EFFICIENTNET_LITE0:
        return {EFFICIENTNET_LITE0: None}
    if stage == "evaluate":
        weights = {INCEPTION: cfg.evaluate.inception_weights, EFFICIENTNET_LITE0: None}
        return {net: weights[net] for net in cfg.evaluate.feature_nets if net in weights}
    return {}


def stages_to_run(cfg: PipelineConfig, only: str | None = None, until: str | None = None) -> list[str]:
    """The stages the command would execute: those it runs (`only`, or up to `until` and what that needs) whose
    output is not complete. (Under the encode policy a grown dataset shows the training stages as not complete,
    as `vq2 status` does, though the run keeps their outputs: they are checked too.)"""
    available = stages()
    wanted = {only} if only else set(available) if until is None else _needed_upstream(available, until, cfg) | {until}
    return [row["stage"] for row in pipeline_status(cfg) if row["stage"] in wanted and row["state"] != "complete"]


@ray.remote(max_retries=0)
def _probe(cfg: PipelineConfig, checks: list[dict], gpus: float) -> list[str]:
    """On one node, with one stage worker's resources: what this node lacks for those stages."""
    where = f"node {ray.util.get_node_ip_address()}"
    names = ", ".join(check["stage"] for check in checks)
    problems = []
    for check in checks:
        try:
            importlib.import_module(check["module"])
        except Exception as error:  # noqa: BLE001 - a missing dependency, reported by name
            problems.append(f"{check['stage']} on {where}: cannot import {check['module']}: "
                            f"{type(error).__name__}: {error}")
        for net, weights in check["nets"].items():
            try:
                load_feature_net(net, weights)
            except Exception as error:  # noqa: BLE001
                problems.append(f"{check['stage']} on {where}: feature net {net} does not load: {error}")
    if gpus:
        import torch

        if torch.cuda.device_count() < gpus:
            problems.append(f"{names} on {where}: asks for {gpus:g} GPU, torch {torch.__version__} (CUDA "
                            f"{torch.version.cuda}) sees {torch.cuda.device_count()}")
    for problem in (storage_problem(Location.from_config(cfg.storage), where), tracking_problem(cfg, where)):
        if problem:
            problems.append(f"{names}: {problem}")
    return problems


def _probe_nodes(cfg: PipelineConfig, to_run: list[str]) -> tuple[list[str], int]:
    """Run the probe on every node that can hold a worker of the stages, once per distinct worker shape;
    (problems, probes run)."""
    modules = stages()
    shapes: dict[tuple, list[dict]] = {}
    for stage in to_run:
        bundle = cluster.stage_demand(cfg, stage).bundle
        check = {"stage": stage, "module": modules[stage].__name__, "nets": packaged_nets(cfg, stage)}
        shapes.setdefault(tuple(sorted(bundle.items())), []).append(check)
    probes = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        for shape, checks in shapes.items():
            bundle = dict(shape)
            if cluster.shortfall(cluster.Demand("preflight", 1, bundle, {}), [node["Resources"]]) is None:
                strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                task = _probe.options(num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                                      scheduling_strategy=strategy)
                probes[task.remote(cfg, checks, bundle.get("GPU", 0))] = (node["NodeManagerAddress"], checks)
    _, waiting = ray.wait(list(probes), num_returns=len(probes), timeout=cfg.ray.scale_timeout_s)
    problems = []
    for ref in probes:
        address, checks = probes[ref]
        names = ", ".join(check["stage"] for check in checks)
        if ref in waiting:
            ray.cancel(ref, force=True)
            problems.append(f"{names}: the probe on node {address} did not run within "
                            f"ray.scale_timeout_s={cfg.ray.scale_timeout_s:g} s")
            continue
        try:
            problems += ray.get(ref)
        except Exception as error:  # noqa: BLE001 - e.g. the project itself is not importable there
            last = (str(error).strip().splitlines() or [""])[-1]
            problems.append(f"{names}: the probe on node {address} failed: {type(error).__name__}: {last}")
    return problems, len(probes)


def preflight(cfg: PipelineConfig, only: str | None = None, until: str | None = None) -> list[str]:
    """Check what the stages about to run need (see the module docstring); the stages checked, or PreflightFailed
    listing every problem found."""
    started = time.monotonic()
    root = Location.from_config(cfg.storage)
    problems = [p for p in (storage_problem(root, DRIVER), tracking_problem(cfg, DRIVER)) if p]
    if problems:
        raise PreflightFailed(problems)
    to_run = stages_to_run(cfg, only, until)
    if not to_run:
        log.info("preflight: every stage is complete, nothing to check on the cluster")
        return []
    ensure_ray(cfg)
    for stage in to_run:
        try:
            cluster.require(cluster.stage_demand(cfg, stage), cfg.ray)
        except ValueError as error:
            problems.append(str(error))
            if cfg.ray.autoscale:  # it has waited its ray.scale_timeout_s already
                break
    if problems:
        raise PreflightFailed(problems)
    problems, probes = _probe_nodes(cfg, to_run)
    if problems:
        raise PreflightFailed(problems)
    log.info("preflight: the cluster is ready for %s (%d node probes, %.1f s)", ", ".join(to_run), probes,
             time.monotonic() - started)
    return to_run
