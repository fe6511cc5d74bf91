"""The cluster the paper configs run on: they fit it, and a stage that needs more waits for the autoscaler."""

import logging
import threading
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
from ray.experimental.internal_kv import _internal_kv_get

from conftest import ray_cluster, section_config
from pipeline import cluster
from pipeline.config import RayConfig, load_config
from pipeline.runner import run_pipeline, stages

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = ("imagenet256", "ffhq1024")


def launcher_nodes(path: Path) -> list[dict[str, float]]:
    """The resources of every node of a cluster-launcher config at its largest: the head and each worker type
    at its max_workers (which the cluster-wide max_workers must allow all at once)."""
    launcher = yaml.safe_load(path.read_text())
    types = launcher["available_node_types"]
    workers = {name: spec for name, spec in types.items() if name != launcher["head_node_type"]}
    assert sum(spec["max_workers"] for spec in workers.values()) <= launcher["max_workers"]
    nodes = [dict(types[launcher["head_node_type"]]["resources"])]
    for spec in workers.values():
        nodes += [dict(spec["resources"]) for _ in range(spec["max_workers"])]
    return nodes


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_every_stage_of_the_paper_configs_fits_the_launcher_cluster(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    nodes = launcher_nodes(REPO / "ray_cluster.yaml")
    most_gpus = sum(node.get("GPU", 0) for node in nodes)
    for stage in stages():
        demand = cluster.stage_demand(cfg, stage)
        assert demand.count * demand.bundle.get("GPU", 0) <= most_gpus, stage
        assert any(all(node.get(r, 0) >= amount for r, amount in demand.bundle.items()) for node in nodes), stage
        assert cluster.shortfall(demand, nodes) is None, stage
    # The cluster starts with its head only, which has no GPU: the stages have to ask the autoscaler for theirs.
    assert cfg.ray.autoscale and "GPU" not in nodes[0]


def test_the_imagenet_config_keeps_the_papers_global_batches():
    cfg = load_config(REPO / "configs/imagenet256.yaml")
    # PAPER.md: VQ-VAE batch 128; top prior 1024; bottom prior 512 (global, over all workers).
    assert cfg.train_vqvae.batch_size * cfg.train_vqvae.num_workers == 128
    assert cfg.train_prior.level_batch("top") * cfg.train_prior.num_workers == 1024
    assert cfg.train_prior.level_batch("bottom") * cfg.train_prior.num_workers == 512


def test_a_worker_has_to_fit_on_one_node():
    demand = cluster.Demand("train_vqvae", 2, {"CPU": 6.0}, {"CPU": "train_vqvae.num_workers=2 x ..."})
    assert cluster.shortfall(demand, [{"CPU": 8.0}, {"CPU": 6.0}]) is None
    # 12 CPUs in all, but no node holds a second worker of 6.
    assert cluster.shortfall(demand, [{"CPU": 8.0}, {"CPU": 4.0}]) == (
        "train_vqvae places 2 workers of 6 CPUs each, each on one node; the nodes (8 CPUs, 4 CPUs) hold 1")
    assert "needs 12 CPUs; the Ray cluster has 10" in cluster.shortfall(demand, [{"CPU": 6.0}, {"CPU": 4.0}])


def _sample_on_gpus(tmp_path):
    return section_config(tmp_path, sample={"use_gpu": True, "num_actors": 2})


def test_a_cluster_that_cannot_grow_fails_at_once(ray_local, tmp_path):
    demand = cluster.stage_demand(_sample_on_gpus(tmp_path), "sample")
    with pytest.raises(ValueError, match=r"^sample.use_gpu with sample.num_actors=2 needs 2 GPUs; the Ray cluster "
                                         r"has 0 \(ray.autoscale is false: the cluster cannot grow\)$"):
        cluster.require(demand, RayConfig(autoscale=False))


class WaitingLines(logging.Handler):
    """The stages' "waiting for the autoscaler" lines, and an event set at the first."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "waiting for the autoscaler" in record.getMessage():
            self.lines.append(record.getMessage())
            self.seen.set()


@pytest.fixture
def waiting_lines(caplog):
    caplog.set_level(logging.INFO, logger="vq2")
    handler = WaitingLines()
    logging.getLogger("vq2").addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger("vq2").removeHandler(handler)


def autoscaler_request() -> list[dict]:
    return yaml.safe_load(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) or b"[]")


def test_past_the_deadline_the_stage_fails_naming_what_it_needs_and_what_is_there(ray_local, tmp_path, waiting_lines):
    demand = cluster.stage_demand(_sample_on_gpus(tmp_path), "sample")
    with pytest.raises(ValueError, match=r"^sample.use_gpu with sample.num_actors=2 needs 2 GPUs; the Ray cluster "
                                         r"has 0, still after waiting ray.scale_timeout_s=0.5 s for the autoscaler$"):
        cluster.require(demand, RayConfig(autoscale=True, scale_timeout_s=0.5, scale_poll_s=0.1))
    assert waiting_lines.lines and waiting_lines.lines[0].startswith("sample: waiting for the autoscaler")
    assert autoscaler_request() == []  # withdrawn: the autoscaler may remove what it added


@pytest.fixture
def one_cpu_cluster():
    """A head with one CPU that runs the driver: too small for two encode actors until a node joins. It takes
    the place of the session's local Ray (the test is marked own_ray)."""
    with ray_cluster(head_cpus=1) as (local, _):
        yield local


@pytest.mark.slow
@pytest.mark.own_ray
def test_a_stage_waits_for_the_autoscaler_then_runs_on_the_node_it_adds(tiny_pipeline, one_cpu_cluster,
                                                                        waiting_lines):
    # A new encode output (another batch size) on the session's tiny pipeline, on a cluster that can grow.
    cfg = tiny_pipeline.config(encode={"batch_size": 24},
                               ray={"autoscale": True, "scale_poll_s": 0.2, "scale_timeout_s": 300})
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = run_pipeline(cfg, only="encode")["encode"]
        except BaseException as error:  # noqa: BLE001 - reported to the test thread below
            outcome["error"] = error

    runner = threading.Thread(target=run)
    runner.start()
    try:
        assert waiting_lines.seen.wait(timeout=300), outcome.get("error")
        assert runner.is_alive()
        assert autoscaler_request() == [{"CPU": 1.0}, {"CPU": 1.0}]  # what the stage asked the autoscaler for
        one_cpu_cluster.add_node(num_cpus=1)  # as the autoscaler would
    finally:
        runner.join(timeout=600)
    assert not runner.is_alive() and "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert not result.cached and result.manifest["shards_encoded"] > 0
    assert "needs 2 CPUs; the Ray cluster has 1" in waiting_lines.lines[0]
    assert autoscaler_request() == []
