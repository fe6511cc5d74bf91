"""MLflow tracking against the default local store and a real MLflow server, and with the server gone."""

import json
import socket
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import parse_config
from pipeline.tracking import Tracker


def make_config(root, tracking_uri=None, name="track"):
    mlflow = {"tracking_uri": tracking_uri, "experiment": f"exp-{name}", "request_retries": 0}
    tree = {"storage": {"root": str(root)}, "dataset": {"source": "/nowhere"}, "mlflow": mlflow}
    return parse_config(tree, f"{name}.yaml")


def track_one_stage(cfg) -> tuple[Tracker, str, str]:
    tracker = Tracker(cfg)
    parent = tracker.start_pipeline("run", "storage: {root: x}\n")
    stage = tracker.start_stage("shard", "0123456789abcdef", {"listing": "fedcba"}, {"dataset.shard_size": "5"})
    stage.log_metrics({"images_per_s": 12.5, "accepted": 7})
    stage.log_dict({"counts": {"accepted": 7}}, "manifest.json")
    stage.finish()
    tracker.finish_pipeline("FINISHED")
    return tracker, parent, stage.run_id


def check_runs(client: MlflowClient, experiment: str, parent_id: str, stage_id: str, tmp_path) -> None:
    found = client.get_experiment_by_name(experiment)
    runs = {run.info.run_id: run for run in client.search_runs([found.experiment_id])}
    assert set(runs) == {parent_id, stage_id}
    parent, stage = runs[parent_id], runs[stage_id]
    assert parent.info.status == stage.info.status == "FINISHED"
    assert stage.data.tags["mlflow.parentRunId"] == parent_id
    assert stage.data.tags["stage"] == "shard"
    assert stage.data.tags["fingerprint"] == "0123456789abcdef"
    assert stage.data.tags["input.listing"] == "fedcba"
    assert stage.data.tags["code_version"]
    assert stage.data.params == {"dataset.shard_size": "5"}
    assert stage.data.metrics == {"images_per_s": 12.5, "accepted": 7.0}
    manifest = client.download_artifacts(stage_id, "manifest.json", str(tmp_path))
    assert json.load(open(manifest)) == {"counts": {"accepted": 7}}
    config = client.download_artifacts(parent_id, "config.yaml", str(tmp_path))
    assert open(config).read() == "storage: {root: x}\n"


def test_local_store_lives_under_the_storage_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    tracker, parent_id, stage_id = track_one_stage(make_config(root, name="local"))
    assert tracker.failures == []
    assert tracker.uri == f"sqlite:///{root}/mlflow/mlflow.db"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]  # no ./mlruns or ./mlflow.db
    client = MlflowClient(tracker.uri)
    assert client.get_experiment_by_name("exp-local").artifact_location == f"file://{root}/mlflow/artifacts"
    check_runs(client, "exp-local", parent_id, stage_id, tmp_path)


def test_tracking_uri_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/elsewhere.db")
    assert Tracker(make_config(tmp_path / "root")).uri == f"sqlite:///{tmp_path}/elsewhere.db"


def test_remote_root_needs_a_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="set mlflow.tracking_uri"):
        Tracker(make_config("s3://bucket/root"))


def test_real_server_runs_params_metrics_artifacts(mlflow_server, s3_server, tmp_path):
    tracker, parent_id, stage_id = track_one_stage(make_config(tmp_path / "root", mlflow_server, name="server"))
    assert tracker.failures == []
    check_runs(MlflowClient(mlflow_server), "exp-server", parent_id, stage_id, tmp_path)
    # The server put the artifacts on the S3 server, not on this machine's disk.
    listed = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="mlflow-artifacts/")
    assert any(item["Key"].endswith(f"{stage_id}/artifacts/manifest.json") for item in listed.get("Contents", []))


class Relay:
    """A TCP relay to a real server; closing it makes the server unreachable, as a network cut would."""

    def __init__(self, target: str):
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.target)
            self.connections += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            connection.close()


def test_server_down_mid_run_is_reported_not_fatal(mlflow_server, tmp_path):
    relay = Relay(mlflow_server)
    tracker = Tracker(make_config(tmp_path / "root", relay.uri, name="down"))
    tracker.start_pipeline("run", "x: 1\n")
    stage = tracker.start_stage("shard", "0123456789abcdef", {}, {"dataset.shard_size": "5"})
    assert tracker.failures == [] and stage.run_id
    relay.close()  # the server is gone from here on
    started = time.monotonic()
    stage.log_metrics({"images_per_s": 1.0})  # reported, not raised
    stage.log_dict({"a": 1}, "manifest.json")
    stage.finish()
    tracker.finish_pipeline("FINISHED")
    assert not tracker.online
    assert len(tracker.failures) == 1 and "log batch" in tracker.failures[0]
    assert time.monotonic() - started < 30  # bounded retries: no minutes of backoff
    # What reached the server before the cut is there.
    assert MlflowClient(mlflow_server).get_run(stage.run_id).data.params == {"dataset.shard_size": "5"}
