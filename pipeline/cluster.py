"""What each stage asks of the Ray cluster, and waiting for it: at once, or after the autoscaler has added nodes."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import ray
from ray.autoscaler.sdk import request_resources

from pipeline.config import PipelineConfig, RayConfig, TrainerConfig

log = logging.getLogger("vq2")

TRAINERS = ("train_vqvae", "train_classifier", "train_prior")
ACTOR_POOLS = ("encode", "evaluate")
# Ray Data gives an actor that names no CPUs one CPU (the sample stage's actors name GPUs only).
RAY_DATA_ACTOR_CPUS = 1.0


@dataclass(frozen=True)
class Demand:
    """What a stage places at once: `count` workers (or actors, or tasks), each a bundle of resources that has
    to fit on one node; `asked_by` names the config keys behind each resource, for the messages."""

    stage: str
    count: int
    bundle: Mapping[str, float]
    asked_by: Mapping[str, str]

    @property
    def bundles(self) -> list[dict[str, float]]:
        return [dict(self.bundle) for _ in range(self.count)]

    def total(self, resource: str) -> float:
        return self.count * self.bundle[resource]


def _demand(stage: str, count: int, counted_by: str, cpus: float, cpus_key: str | None, gpu: bool) -> Demand:
    bundle = {"CPU": cpus} | ({"GPU": 1.0} if gpu else {})
    cpu_source = f"{cpus_key}={cpus:g}" if cpus_key else f"{cpus:g} CPU each (Ray Data's default)"
    asked_by = {"CPU": f"{counted_by} x {cpu_source}", "GPU": f"{stage}.use_gpu with {counted_by}"}
    return Demand(stage, count, bundle, asked_by)


def trainer_demand(section: TrainerConfig, stage: str) -> Demand:
    """A Ray Train stage's workers: num_workers bundles of cpus_per_worker CPUs and one GPU with use_gpu."""
    return _demand(stage, section.num_workers, f"{stage}.num_workers={section.num_workers}", section.cpus_per_worker,
                   f"{stage}.cpus_per_worker", section.use_gpu)


def stage_demand(cfg: PipelineConfig, stage: str) -> Demand:
    """What `stage` places at once, from its config section: the one rule every resource check, the
    preflight and the cluster-fit test use."""
    if stage in TRAINERS:
        return trainer_demand(getattr(cfg, stage), stage)
    if stage in ACTOR_POOLS:
        section = getattr(cfg, stage)
        return _demand(stage, section.num_actors, f"{stage}.num_actors={section.num_actors}", section.cpus_per_actor,
                       f"{stage}.cpus_per_actor", section.use_gpu)
    if stage == "sample":
        section = cfg.sample
        return _demand(stage, section.num_actors, f"sample.num_actors={section.num_actors}", RAY_DATA_ACTOR_CPUS, None,
                       section.use_gpu)
    if stage == "shard":
        # Its tasks queue for CPUs: one placed at a time is enough to make progress.
        return _demand(stage, 1, "shard: one task", cfg.ray.cpus_per_task, "ray.cpus_per_task", False)
    raise ValueError(f"no resource rule for stage {stage!r}")


def _plural(resource: str, amount: float) -> str:
    return f"{amount:g} {resource}s" if resource in ("CPU", "GPU") else f"{amount:g} of resource {resource!r}"


def shortfall(demand: Demand, nodes: Iterable[Mapping[str, float]]) -> str | None:
    """Why `demand` cannot be placed on nodes of these total resources, or None when it can.

    Every bundle has to fit on one node: a node holds as many bundles as its scarcest resource allows."""
    nodes = list(nodes)
    for resource, amount in demand.bundle.items():
        have = sum(node.get(resource, 0.0) for node in nodes)
        if demand.total(resource) > have:
            return (f"{demand.asked_by.get(resource, demand.stage)} needs {_plural(resource, demand.total(resource))}; "
                    f"the Ray cluster has {have:g}")
    wanted = {resource: amount for resource, amount in demand.bundle.items() if amount > 0}
    holds = sum(min((math.floor(node.get(r, 0.0) / a + 1e-9) for r, a in wanted.items()), default=demand.count)
                for node in nodes)
    if holds < demand.count:
        bundle = " + ".join(_plural(r, a) for r, a in demand.bundle.items())
        shapes = ", ".join(" + ".join(_plural(r, node.get(r, 0.0)) for r in demand.bundle) for node in nodes)
        return (f"{demand.stage} places {demand.count} workers of {bundle} each, each on one node; the nodes "
                f"({shapes or 'none'}) hold {holds}")
    return None


def live_nodes() -> list[dict[str, float]]:
    """The total resources of each node of the cluster this process is connected to."""
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def require(demand: Demand, ray_cfg: RayConfig) -> None:
    """Return once the cluster can place `demand`, else raise a ValueError naming the stage, what it needs and
    what is there.

    A cluster that cannot grow (ray.autoscale false) fails at once. One that can is asked for the bundles
    (the autoscaler's request_resources) and looked at every ray.scale_poll_s, with a progress line, until
    they fit or ray.scale_timeout_s has passed; the request is withdrawn either way, so the autoscaler may
    remove the nodes once they idle.
    """
    problem = shortfall(demand, live_nodes())
    if problem is None:
        return
    if not ray_cfg.autoscale:
        raise ValueError(f"{problem} (ray.autoscale is false: the cluster cannot grow)")
    request_resources(bundles=demand.bundles)
    deadline = time.monotonic() + ray_cfg.scale_timeout_s
    try:
        while problem is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ValueError(f"{problem}, still after waiting ray.scale_timeout_s={ray_cfg.scale_timeout_s:g} s "
                                 "for the autoscaler")
            log.info("%s: waiting for the autoscaler (%.0f s left): %s", demand.stage, left, problem)
            time.sleep(min(ray_cfg.scale_poll_s, left))
            problem = shortfall(demand, live_nodes())
    finally:
        request_resources(bundles=[])
    log.info("%s: the cluster has grown to fit %d x %s", demand.stage, demand.count, dict(demand.bundle))
