"""MLflow tracking against the default local store and a real MLflow server: outages, restarts, stops, dead runs."""

import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
import types

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from conftest import BIN, start_mlflow_server, stop
from fault_proxy import FaultProxy
from jobs.cli import main as vq2
from pipeline import demo_data, runner
from pipeline.config import parse_config, to_yaml
from pipeline.lease import read_lease
from pipeline.runner import run_pipeline, run_stage
from pipeline.storage import MANIFEST, Location
from pipeline.tracking import HEARTBEAT_PERIOD_TAG, HEARTBEAT_TAG, Tracker


def make_config(root, tracking_uri=None, name="track", **mlflow_settings):
    mlflow = {"tracking_uri": tracking_uri, "experiment": f"exp-{name}", "request_retries": 0,
              "retry_initial_s": 0.2, "retry_max_s": 1.0, "flush_timeout_s": 3} | mlflow_settings
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
    return tracker, parent.run_id, stage.run_id  # known once MLflow created the runs (later, after an outage)


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
    assert tracker.outages == tracker.refused == []
    assert tracker.uri == f"sqlite:///{root}/mlflow/mlflow.db"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]  # no ./mlruns or ./mlflow.db
    client = MlflowClient(tracker.uri)
    assert client.get_experiment_by_name("exp-local").artifact_location == f"file://{root}/mlflow/artifacts"
    check_runs(client, "exp-local", parent_id, stage_id, tmp_path)


def test_the_stage_modules_import_without_mlflow():
    """Every process that runs a stage's code imports the stage's module (Ray Train's controller and every rank,
    each actor of a pool); mlflow's import, 1.5 to 3 s of CPU, is left to the processes that track. A rank that
    does not track logs its metrics and tags to a StageRun without a tracker, which must not import it either."""
    import sys

    modules = [module.__name__ for module in runner.stages().values()]
    done = subprocess.run([sys.executable, "-c", f"import importlib, sys\nfor name in {modules!r}:\n"
                           "    importlib.import_module(name)\n"
                           "from pipeline.tracking import StageRun\n"
                           "StageRun(None, None).log_metrics({'loss': 0.5}, step=10)\n"
                           "StageRun(None, None).set_tags({'epoch': 1})\n"
                           "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(modules) == 7 and done.stdout.strip() == "[]", done.stdout[-500:]


def test_tracking_uri_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/elsewhere.db")
    assert Tracker(make_config(tmp_path / "root")).uri == f"sqlite:///{tmp_path}/elsewhere.db"


def test_remote_root_needs_a_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="set mlflow.tracking_uri"):
        Tracker(make_config("s3://bucket/root"))


def test_real_server_runs_params_metrics_artifacts(mlflow_server, s3_server, tmp_path):
    tracker, parent_id, stage_id = track_one_stage(make_config(tmp_path / "root", mlflow_server, name="server"))
    assert tracker.outages == tracker.refused == []
    check_runs(MlflowClient(mlflow_server), "exp-server", parent_id, stage_id, tmp_path)
    # The server put the artifacts on the S3 server, not on this machine's disk.
    listed = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="mlflow-artifacts/")
    assert any(item["Key"].endswith(f"{stage_id}/artifacts/manifest.json") for item in listed.get("Contents", []))


class Relay:
    """A TCP relay to a real server. `cut()` makes the server unreachable, as a network cut would (open
    connections are closed, new ones are closed on arrival), `restore()` reconnects it. `on_request(path)`
    is called with the path of each request that passes."""

    def __init__(self, target: str, on_request=None):
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.on_request = on_request
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self.up = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            try:
                if not self.up:
                    raise ConnectionRefusedError
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            self.connections += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        try:
            while data := source.recv(65536):
                if requests and self.on_request and data[:8].split(b" ")[0] in (b"GET", b"POST", b"PUT"):
                    self.on_request(data.split(b" ", 2)[1].decode())
                sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()

    def cut(self) -> None:
        self.up = False
        for connection in self.connections:
            connection.close()
        self.connections = []

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.listener.close()
        self.cut()


def statuses(client: MlflowClient, experiment: str) -> dict[str, str]:
    """runName -> status of every run in the experiment."""
    found = client.get_experiment_by_name(experiment)
    return {run.data.tags["mlflow.runName"]: run.info.status for run in client.search_runs([found.experiment_id])}


def test_an_outage_queues_calls_and_delivers_them_in_order_when_the_server_is_back(mlflow_server, tmp_path):
    relay = Relay(mlflow_server)
    tracker = Tracker(make_config(tmp_path / "root", relay.uri, name="outage"))
    tracker.start_pipeline("run", "x: 1\n")
    stage = tracker.start_stage("shard", "0123456789abcdef", {}, {"dataset.shard_size": "5"})
    assert stage.run_id and tracker.outages == []
    relay.cut()
    started = time.monotonic()
    for step in range(1, 4):
        stage.log_metrics({"loss": 1.0 / step}, step=step)  # queued, not raised, not waited for
    stage.log_dict({"a": 1}, "manifest.json")
    assert time.monotonic() - started < 5
    assert len(tracker.outages) == 1 and len(tracker.backlog()) == 4
    relay.restore()
    stage.finish()
    tracker.finish_pipeline("FINISHED")
    assert tracker.backlog() == []
    client = MlflowClient(mlflow_server)
    history = client.get_metric_history(stage.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert statuses(client, "exp-outage") == {"outage: run": "FINISHED", "shard": "FINISHED"}


def test_a_flush_tries_once_more_at_its_deadline_when_the_backoff_runs_past_it(mlflow_server, tmp_path):
    relay = Relay(mlflow_server)
    tracker = Tracker(make_config(tmp_path / "root", relay.uri, name="late", retry_initial_s=600))
    tracker.start_pipeline("run", "x: 1\n")
    relay.cut()
    tracker.parent.log_metrics({"loss": 0.5})  # fails: the next try is 600 s away
    relay.restore()
    assert tracker.flush(timeout_s=1.0)
    assert MlflowClient(mlflow_server).get_run(tracker.parent.run_id).data.metrics == {"loss": 0.5}


def test_a_call_that_fails_by_itself_is_dropped_and_the_calls_behind_it_go_out(tmp_path, caplog):
    tracker = Tracker(make_config(tmp_path / "root", name="broken"))
    tracker.start_pipeline("run", "x: 1\n")
    stage = tracker.start_stage("shard", "0123456789abcdef", {}, {})

    def broken(run_id: str) -> None:
        raise ValueError("a defect in the call's own code")

    stage.queue("broken call", broken, {"call": "broken"})
    stage.log_metrics({"loss": 0.5})
    stage.finish()
    tracker.finish_pipeline("FINISHED")
    assert tracker.backlog() == [] and tracker.outages == []
    assert tracker.refused == ["broken call: ValueError: a defect in the call's own code"]
    assert "tracking call broken call failed; not retried" in caplog.text and "ValueError" in caplog.text
    run = MlflowClient(tracker.uri).get_run(stage.run_id)
    assert run.data.metrics == {"loss": 0.5} and run.info.status == "FINISHED"


def test_a_refused_token_mid_run_queues_the_calls_and_delivers_them(mlflow_server, tmp_path, caplog):
    """A 401 or 403 (a token that expired and is renewed) is an outage, not a wrong call: every call it refused is
    kept and delivered once the server takes the token again, none dropped."""
    proxy = FaultProxy(mlflow_server, share=1.0, repeats=1, kinds=("unauthorized", "expired_token")).start()
    try:
        # Every request fails once: each of the run's dozen calls waits out a backoff before it goes through.
        cfg = make_config(tmp_path / "root", proxy.endpoint, name="token", retry_max_s=0.2, flush_timeout_s=60)
        tracker, parent, stage = track_one_stage(cfg)
    finally:
        proxy.stop()
    assert set(proxy.injected) == {"unauthorized", "expired_token"}
    assert tracker.refused == [] and tracker.backlog() == [] and "not retried" not in caplog.text
    check_runs(MlflowClient(mlflow_server), "exp-token", parent, stage, tmp_path)


def test_a_call_forbidden_while_the_token_is_good_is_refused_and_holds_back_nothing(mlflow_server, tmp_path, caplog):
    """A 403 to one call while the server takes the token for a plain read (a registered model another user owns,
    under MLflow's basic auth): the call is refused and not retried, and every call behind it is delivered (was:
    kept at the head of the queue as an outage, it held back every later call of the run, and each stage's flush
    waited out its timeout)."""
    proxy = FaultProxy(mlflow_server, kinds=("expired_token",), persistent=("/model-versions/create",)).start()
    try:
        cfg = make_config(tmp_path / "root", proxy.endpoint, name="forbidden", retry_max_s=0.2, flush_timeout_s=30)
        tracker = Tracker(cfg)
        tracker.start_pipeline("run", "x: 1\n")
        stage = tracker.start_stage("train_vqvae", "0123456789abcdef", {}, {"a": "1"})
        stage.queue("register vq2-forbidden", lambda run_id: tracker.client.create_model_version(
            "vq2-forbidden", "runs:/x/model", run_id=run_id), {"call": "create_model_version"})
        stage.log_metrics({"loss": 0.5})
        stage.finish()
        tracker.finish_pipeline("FINISHED")
    finally:
        proxy.stop()
    assert proxy.injected["expired_token"] == 2  # asked, then once more after the token passed a plain read
    assert len(tracker.refused) == 1 and tracker.refused[0].startswith("register vq2-forbidden: CallForbidden: ")
    assert "MLflow refused register vq2-forbidden" in caplog.text and "unreachable" not in caplog.text
    assert tracker.backlog() == [] and tracker.outages == []
    run = MlflowClient(mlflow_server).get_run(stage.run_id)
    assert run.data.metrics == {"loss": 0.5} and run.info.status == "FINISHED"


def test_a_server_down_until_the_end_leaves_the_calls_listed_and_costs_bounded_time(mlflow_server, tmp_path):
    relay = Relay(mlflow_server)
    tracker = Tracker(make_config(tmp_path / "root", relay.uri, name="down"))
    tracker.start_pipeline("run", "x: 1\n")
    stage = tracker.start_stage("shard", "0123456789abcdef", {}, {"dataset.shard_size": "5"})
    relay.close()  # the server is gone from here on
    started = time.monotonic()
    stage.log_metrics({"images_per_s": 1.0})
    stage.finish()
    tracker.finish_pipeline("FINISHED")
    assert time.monotonic() - started < 15  # flush_timeout_s = 3, then it gives up
    calls = [record["call"] for record in tracker.backlog()]
    assert calls == ["log_batch", "set_terminated", "set_terminated"]
    assert tracker.backlog()[0]["metrics"][0][:2] == ["images_per_s", 1.0] and tracker.backlog()[0]["run_id"]
    # What reached the server before the cut is there.
    assert MlflowClient(mlflow_server).get_run(stage.run_id).data.params == {"dataset.shard_size": "5"}


def test_a_run_that_lost_its_lease_leaves_the_tracking_backlog_to_the_run_that_holds_it(tmp_path, monkeypatch):
    """A stalled run whose lease another run took over does not replay the backlog files under the output: the
    new holder's workers left them for its driver (was: read, deleted and delivered by the wrong process, or
    lost with it while MLflow was down)."""
    from pipeline.lease import LeaseLost
    from pipeline.tracking import BACKLOG

    monkeypatch.setattr(runner, "code_digest", lambda module: "c0de")
    monkeypatch.setattr(runner, "ensure_ray", lambda cfg: None)
    monkeypatch.setattr(runner.cluster, "require", lambda demand, ray_cfg: None)
    monkeypatch.setattr(runner, "cluster_size", lambda: 1)
    held, stage_lease = {}, runner.stage_lease

    @contextlib.contextmanager
    def kept_stage_lease(*args, **kwargs):
        with stage_lease(*args, **kwargs) as lease:
            held["lease"] = lease
            yield lease

    monkeypatch.setattr(runner, "stage_lease", kept_stage_lease)
    cfg = parse_config({"storage": {"root": str(tmp_path / "root"), "lease_ttl_s": 0.6}, "dataset": {"source": "/x"},
                        "mlflow": {"experiment": "exp-lease", "system_metrics_s": 0}}, "lease.yaml")
    other = [{"call": "log_batch", "run_id": "the-other-run", "metrics": [["loss", 0.25, 1700000000000, 500]],
              "params": [], "tags": []}]

    def run(cfg, ctx):
        (ctx.output / "part.bin").write_bytes(b"x")
        # While this run stalls, another takes its expired lease over, and that run's rank 0 spills a backlog.
        (ctx.output / "lease.json").write_json({"owner": "other:1:x", "expires": time.time() + 600, "ttl_s": 600,
                                               "host": "other", "pid": 1})
        (ctx.output / BACKLOG / "other.json").write_json(other)
        deadline = time.monotonic() + 30
        while held["lease"].lost is None:  # the renewer's next beat sees the takeover
            assert time.monotonic() < deadline
            time.sleep(0.02)
        held["output"] = ctx.output
        return {"rows": 1}

    tracker = Tracker(cfg)
    tracker.start_pipeline("run", "x: 1\n")
    stage = types.SimpleNamespace(NAME="encode", SECTION="encode", FORMAT_VERSION=1, UPSTREAM=(), run=run,
                                  __name__="fake_encode")
    with pytest.raises(LeaseLost, match="taken over by other:1:x"):
        run_stage(stage, cfg, tracker, {})
    tracker.finish_pipeline("FAILED")
    assert (held["output"] / BACKLOG / "other.json").read_json() == other
    assert tracker.refused == [] and runner.read_manifest(held["output"]) is None


def test_a_stage_whose_run_was_created_late_names_that_run_in_its_manifest(tmp_path, monkeypatch):
    """MLflow is down when a stage starts and back before its final flush: the run exists by the time the manifest
    is written, so the manifest (and a later cached run's produced_by_run tag) names it."""
    monkeypatch.setattr(runner, "code_digest", lambda module: "c0de")
    monkeypatch.setattr(runner, "ensure_ray", lambda cfg: None)
    monkeypatch.setattr(runner.cluster, "require", lambda demand, ray_cfg: None)
    monkeypatch.setattr(runner, "cluster_size", lambda: 1)
    cfg = make_config(tmp_path / "root", name="late-run", system_metrics_s=0)
    tracker = Tracker(cfg)
    tracker.start_pipeline("run", "x: 1\n")
    create_run, down = tracker.client.create_run, [True]

    def flaky_create_run(*args, **kwargs):
        if down[0]:
            raise ConnectionError("MLflow is down")
        return create_run(*args, **kwargs)

    def run(cfg, ctx):
        (ctx.output / "part.bin").write_bytes(b"x")
        down[0] = False  # the server is back while the stage finishes
        return {"rows": 1}

    monkeypatch.setattr(tracker.client, "create_run", flaky_create_run)
    stage = types.SimpleNamespace(NAME="encode", SECTION="encode", FORMAT_VERSION=1, UPSTREAM=(), run=run,
                                  __name__="fake_encode")
    made = run_stage(stage, cfg, tracker, {})
    assert made.manifest["run_id"] and made.manifest["tracking_backlog"] == []
    assert MlflowClient(tracker.uri).get_run(made.manifest["run_id"]).data.tags["stage"] == "encode"
    assert (made.location / MANIFEST).read_json()["run_id"] == made.manifest["run_id"]
    assert run_stage(stage, cfg, tracker, {}).cached
    tracker.finish_pipeline("FINISHED")
    client = MlflowClient(tracker.uri)
    (cached,) = client.search_runs([tracker.experiment_id], "tags.cached = 'true'")
    assert cached.data.tags["produced_by_run"] == made.manifest["run_id"]


def everything_logged(client: MlflowClient, folder) -> str:
    """The params, tags and artifacts of every run in the store, as one text."""
    texts = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            texts += [*run.data.params.values(), *run.data.tags.values()]
            for artifact in client.list_artifacts(run.info.run_id):
                texts.append(open(client.download_artifacts(run.info.run_id, artifact.path, str(folder))).read())
    return "\n".join(texts)


def test_a_password_in_a_config_uri_reaches_no_param_artifact_or_log_line(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)  # a Tracker sets it from storage.endpoint_url
    root, secret = tmp_path / "root", "wJalrSECRET"
    config = tmp_path / "creds.yaml"
    config.write_text(yaml.safe_dump({"storage": {"root": str(root)}, "dataset": {"source": str(tmp_path / "none")},
                                      "mlflow": {"experiment": "exp-creds"}}))
    override = f"storage.endpoint_url=https://AKIAEXAMPLE:{secret}@s3.internal:9000"
    code = vq2(["encode", "--config", str(config), override])
    err = capsys.readouterr().err
    (tmp_path / "artifacts").mkdir()
    assert secret not in everything_logged(MlflowClient(f"sqlite:///{root}/mlflow/mlflow.db"), tmp_path / "artifacts")
    assert code == 2 and "storage.endpoint_url: expected: a URI without a password" in err
    assert secret not in err and secret not in caplog.text


def test_a_tracking_uri_from_the_environment_is_printed_without_its_password(tmp_path, monkeypatch):
    from jobs.cli import _where_to_look

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://vq2:wJalrSECRET@db.internal/mlflow")
    lines = _where_to_look(make_config(tmp_path / "root", name="env-uri"), {})
    assert "postgresql://vq2:***@db.internal/mlflow" in lines and "wJalrSECRET" not in lines


def test_runs_left_running_by_a_dead_process_are_ended_failed_by_the_next_one(tmp_path):
    cfg = make_config(tmp_path / "root", name="reap", heartbeat_s=10)
    client = MlflowClient(Tracker(cfg).uri)
    experiment = client.create_experiment("exp-reap", artifact_location=(tmp_path / "artifacts").as_uri())
    stale = str(int(time.time()) - 31)  # three periods of 10 s without a heartbeat
    dead = client.create_run(experiment, tags={HEARTBEAT_TAG: stale, HEARTBEAT_PERIOD_TAG: "10"}).info.run_id
    alive = client.create_run(experiment, tags={HEARTBEAT_TAG: str(int(time.time())), HEARTBEAT_PERIOD_TAG: "10"})
    foreign = client.create_run(experiment)  # not ours: no heartbeat tag
    tracker = Tracker(cfg)
    tracker.start_pipeline("run", "x: 1\n")
    tracker.finish_pipeline("FINISHED")
    assert client.get_run(dead).info.status == "FAILED"
    assert "no heartbeat since" in client.get_run(dead).data.tags["vq2.ended_by"]
    assert client.get_run(alive.info.run_id).info.status == client.get_run(foreign.info.run_id).info.status == "RUNNING"


@pytest.mark.slow
def test_server_stopped_and_restarted_mid_stage_every_record_arrives(ray_local, s3_server, tmp_path):
    """The real server process is stopped when the shard stage starts its work and started again at once;
    the stage goes on, and its records reach the restarted server."""
    folder = tmp_path / "server"
    folder.mkdir()
    uri, server = start_mlflow_server(folder, s3_server)
    port = int(uri.rsplit(":", 1)[1])
    restarted = []
    log_batches = []

    def on_request(path: str) -> None:
        if path.endswith("/runs/log-batch"):
            log_batches.append(path)
            if len(log_batches) == 2:  # the stage's params, then its "cached=false" tags: the work starts
                stop(server)
                threading.Thread(target=lambda: restarted.append(start_mlflow_server(folder, s3_server, port))).start()

    relay = Relay(uri, on_request)
    corpus = Location(str(tmp_path / "corpus"))
    demo_data.synthetic(corpus, per_class=6, val_per_class=2, size=(40, 40), classes=3)
    cfg = make_config(tmp_path / "root", relay.uri, name="restart", flush_timeout_s=120)
    cfg = cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"source": corpus.uri, "shard_size": 8})})
    try:
        result = run_pipeline(cfg, only="shard")["shard"]
        assert restarted, "the server was never stopped: the relay saw no stage work"
        assert result.manifest["tracking_backlog"] == []
        client = MlflowClient(uri)
        assert statuses(client, "exp-restart") == {"restart: run": "FINISHED", "shard": "FINISHED"}
        run = client.get_run(result.manifest["run_id"])
        assert run.data.metrics["accepted"] == 24 and "wall_time_s" in run.data.metrics
        assert run.data.tags["cached"] == "false"
    finally:
        relay.close()
        for _, process in restarted:
            stop(process)
        stop(server)


@pytest.mark.slow
def test_sigterm_ends_the_stage_and_the_pipeline_killed(ray_local, mlflow_server, tmp_path):
    corpus = Location(str(tmp_path / "corpus"))
    demo_data.synthetic(corpus, per_class=60, val_per_class=0, size=(300, 260), classes=4)
    cfg = make_config(tmp_path / "root", mlflow_server, name="sigterm")
    tree = json.loads(cfg.model_dump_json()) | {"name": "sigterm"}
    tree["dataset"] |= {"source": corpus.uri, "splits": ["train"], "shard_size": 4}
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(to_yaml(parse_config(tree, "sigterm.yaml")))
    address = ray.get_runtime_context().gcs_address  # the driver joins this test's Ray
    command = [str(BIN / "vq2"), "run", "--config", str(config_file), "--until", "shard", f"ray.address={address}",
               "ray.num_workers=1"]
    with open(tmp_path / "driver.log", "wb") as log:
        driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    shards = Location(str(tmp_path / "root/shard"))
    deadline = time.monotonic() + 120
    try:
        while not any(key.endswith(".json") and "shard-" in key for key in shards.list_files()):
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no shard finished in 120 s"
            time.sleep(0.05)
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=60) == 143, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        driver.kill()
        driver.wait()
    log_text = (tmp_path / "driver.log").read_text()
    assert "Traceback" not in log_text and "stopped by SIGTERM" in log_text
    assert statuses(MlflowClient(mlflow_server), "exp-sigterm") == {"sigterm: run": "KILLED", "shard": "KILLED"}
    (output,) = [shards / name for name in shards.list_folders()]
    assert not (output / MANIFEST).exists() and read_lease(output) is None  # unfinished, and free for a rerun
