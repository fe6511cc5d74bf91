"""The shard stage on a multi-node Ray cluster that loses a worker node mid-run."""

import threading
import time

import pytest

from conftest import ray_cluster
from pipeline import demo_data
from pipeline.config import parse_config
from pipeline.dataset import verify
from pipeline.runner import run_pipeline
from pipeline.storage import Location


@pytest.fixture
def two_node_cluster():
    """A head without CPUs (only the driver) and two 1-CPU worker nodes, in place of the session's local Ray
    (the test is marked own_ray)."""
    with ray_cluster(head_cpus=0, worker_cpus=(1, 1)) as (cluster, workers):
        yield cluster, workers


@pytest.mark.slow
@pytest.mark.own_ray
def test_node_lost_mid_run_loses_nothing(two_node_cluster, tmp_path):
    cluster, workers = two_node_cluster
    source = Location(str(tmp_path / "corpus"))
    demo_data.synthetic(source, per_class=60, val_per_class=0, size=(400, 350), classes=4)
    tree = {
        "storage": {"root": str(tmp_path / "root")},
        "dataset": {"source": source.path, "splits": ["train"], "image_size": 64, "shard_size": 6},
        "ray": {"num_workers": 2, "max_retries": 3},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "cluster"},
    }
    cfg = parse_config(tree, "cluster.yaml")
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = run_pipeline(cfg, only="shard")["shard"]
        except BaseException as error:  # noqa: BLE001 - reported to the test thread below
            outcome["error"] = error

    runner = threading.Thread(target=run)
    runner.start()
    shards = Location(str(tmp_path / "root/shard"))
    deadline = time.monotonic() + 120
    # Wait (polling storage) until a few of the 40 shards are done, then crash a worker node.
    while sum(key.endswith(".json") for key in shards.list_files()) < 3 and runner.is_alive():
        assert time.monotonic() < deadline, "no shard finished in 120 s"
        time.sleep(0.05)
    assert runner.is_alive(), "the stage finished before the node could be removed"
    cluster.remove_node(workers[0], allow_graceful=False)
    runner.join(timeout=300)
    assert not runner.is_alive() and "error" not in outcome, outcome.get("error")

    result = outcome["result"]
    assert result.manifest["counts"] == {"inputs": 240, "accepted": 240, "rejected": 0}
    assert len(result.manifest["shards"]) == 40
    assert verify(result.location) == []
