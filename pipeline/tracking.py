"""MLflow tracking: one parent run per invocation, one nested run per stage; an outage delays records, never loses or stops work.

Every MLflow call goes through `Tracker.submit`. While the tracking server answers, calls run at once.
When one fails for a reason that can pass (the server is down or overloaded, the network is cut), it is
kept, in order, with every later call behind it, and retried after a backoff (doubling, capped); the
data work never waits for MLflow. When the server is back the queue is delivered in order. At the end of
a stage the queue is given `mlflow.flush_timeout_s` to drain, and whatever is still queued is listed in
the stage's manifest; a Ray Train worker writes what it could not deliver under the stage output, and
the driver delivers it (`replay`).

Runs end FINISHED, FAILED or KILLED (`ended_status`). A run whose process died before it could say so
(SIGKILL, a lost node) stops renewing its `vq2.heartbeat` tag; the next invocation ends such runs as
FAILED (`reap_abandoned_runs`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pipeline.config import MlflowConfig, PipelineConfig
from pipeline.storage import Location

# mlflow is imported where a call needs it, not here: every process that runs a stage's code imports this
# module (Ray Train's controller and every rank, each actor of a pool), and importing mlflow costs 1.5 to 3 s
# of CPU a process (most of it its GenAI packages) that the processes which never track need not pay.
if TYPE_CHECKING:
    from mlflow.entities import DatasetInput, LoggedModelInput, Metric, Param, RunTag

log = logging.getLogger("vq2")
MAX_PARAM_LENGTH = 6000
BACKLOG = "tracking_backlog"  # folder under a stage output: calls a worker could not deliver
HEARTBEAT_TAG = "vq2.heartbeat"
HEARTBEAT_PERIOD_TAG = "vq2.heartbeat_s"
ABANDONED_AFTER_PERIODS = 3


class PipelineStopped(BaseException):
    """The process was asked to stop (SIGTERM, as `ray job stop` sends; Ctrl-C): runs end KILLED."""


def ended_status(error: BaseException | None) -> str:
    """The MLflow status of a run that ended with `error` (None: it finished)."""
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, (PipelineStopped, KeyboardInterrupt)) else "FAILED"


def code_version() -> str:
    """The git commit of the code when run from a checkout, else the installed package version."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        if commit:
            return commit
    except (OSError, subprocess.SubprocessError):
        pass
    return metadata.version("vq2")


def experiment_name(cfg: PipelineConfig) -> str:
    """The MLflow experiment of a config: mlflow.experiment, default vq2-<config name>."""
    return cfg.mlflow.experiment or f"vq2-{cfg.name}"


def configured_tracking_uri(cfg: PipelineConfig) -> str | None:
    """The tracking store that config or MLFLOW_TRACKING_URI names; None leaves the default local store."""
    return cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(cfg: PipelineConfig) -> str:
    """Config, then MLFLOW_TRACKING_URI, then a sqlite store under a local storage root."""
    uri = configured_tracking_uri(cfg)
    if uri:
        return uri
    root = Location.from_config(cfg.storage)
    if root.protocol != "file":
        raise ValueError(
            f"storage root {root.uri} is not local: set mlflow.tracking_uri or MLFLOW_TRACKING_URI "
            "to a tracking server (or a sqlite:/// path) for it"
        )
    os.makedirs(f"{root.path}/mlflow", exist_ok=True)
    return f"sqlite:///{root.path}/mlflow/mlflow.db"


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def bound_http_requests(settings: MlflowConfig) -> None:
    """MLflow's HTTP retries and timeout as configured (unless the environment sets them): its defaults (7 retries,
    growing waits) hold each call to an unreachable server for minutes."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.request_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(settings.request_timeout_s))


def credentials_in_uri(uri: str) -> str | None:
    """Why a tracking server's URI is refused, or None: credentials in it, which MLflow repeats in its errors."""
    parsed = urlsplit(uri)
    if parsed.scheme in ("http", "https") and (parsed.username or parsed.password):
        return (f"the MLflow tracking URI for {parsed.hostname} carries credentials: give them in the environment "
                "(MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN), not in the URI")
    return None


def check_credentials(uri: str, timeout_s: float) -> None:
    """One authenticated read on the tracking server at `uri` (an experiment search, which any user may make):
    raises MlflowException with the server's answer when it refuses or fails it."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request_safe

    http_request_safe(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "POST",
                      json={"max_results": 1}, max_retries=0, timeout=timeout_s)


def _http_status(error: Exception) -> int | None:
    from mlflow.exceptions import MlflowException

    return error.get_http_status_code() if isinstance(error, MlflowException) else None


def _transient(error: Exception) -> bool:
    """True for an error that can pass: MLflow down or overloaded (a 5xx, 408, 429), its token refused (401, 403;
    but see Tracker._deliver), the network or the artifact store failing. False when MLflow answered that the
    call itself is wrong (another 4xx) or the call's own code failed (a ValueError, say): retrying cannot help,
    and one such call must not hold back every call behind it."""
    status = _http_status(error)
    if status is not None:
        # A refused token is not a wrong call: one that expired mid-run is renewed (preflight checked it at the
        # start), and calls dropped meanwhile would be lost; kept, they are delivered or listed as undelivered.
        return not (400 <= status < 500 and status not in (401, 403, 408, 429))
    return isinstance(error, OSError) or type(error).__module__.split(".")[0] in ("boto3", "botocore", "s3fs", "urllib3")


class CallForbidden(Exception):
    """MLflow refused a call (401 or 403) while it took the same credentials for a plain read: the call itself
    is not allowed to this user."""


@dataclass
class _Call:
    what: str
    run: Callable[[], Any]
    record: Callable[[], dict]  # what the call carries, for the backlog file and the manifest


class Tracker:
    """The MLflow calls of one process, delivered in order, queued and retried through outages."""

    def __init__(self, cfg: PipelineConfig):
        bound_http_requests(cfg.mlflow)
        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        if cfg.storage.endpoint_url:
            if _is_server(self.uri):
                os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", cfg.storage.endpoint_url)
            else:
                # A local store keeps its artifacts under the storage root, which MLflow's own S3 client reaches at
                # this config's endpoint: set, not defaulted, or a process that tracked another config first would
                # keep sending them to that one's endpoint.
                os.environ["MLFLOW_S3_ENDPOINT_URL"] = cfg.storage.endpoint_url
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.uri, registry_uri=self.uri)  # else the registry is ./mlflow.db
        self.experiment_id: str | None = None
        self.parent: StageRun | None = None
        self.outages: list[str] = []  # the first error of each outage
        self.refused: list[str] = []  # calls MLflow rejected as wrong: logged, not retried
        self._queue: deque[_Call] = deque()
        self._lock = threading.RLock()
        self._retry_at = 0.0
        self._backoff = cfg.mlflow.retry_initial_s
        self._open_runs: list[StageRun] = []
        self._heartbeat_stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # --- delivery -------------------------------------------------------------------------------------

    def submit(self, what: str, run: Callable[[], Any], record: Callable[[], dict]) -> None:
        """Deliver a call now, or queue it behind earlier ones while MLflow is unreachable."""
        with self._lock:
            self._queue.append(_Call(what, run, record))
            self._drain(deadline=None)

    def _drain(self, deadline: float | None) -> bool:
        """Deliver queued calls in order until one fails transiently; with a deadline, keep retrying until
        then. True when nothing is left."""
        delivered_late = 0
        while self._queue:
            now = time.monotonic()
            if self._retry_at > now:
                if deadline is None or now >= deadline:
                    return False
                time.sleep(min(self._retry_at, deadline) - now)  # the last try comes at the deadline, not never
            call = self._queue[0]
            try:
                self._deliver(call)
            except Exception as error:  # noqa: BLE001 - tracking never stops the data work
                message = f"{call.what}: {type(error).__name__}: {str(error)[:300]}"
                if not _transient(error):
                    from mlflow.exceptions import MlflowException

                    if isinstance(error, (MlflowException, CallForbidden)):
                        log.warning("MLflow refused %s; not retried", message)
                    else:
                        log.error("tracking call %s failed; not retried", call.what, exc_info=error)
                    self.refused.append(message)
                    self._queue.popleft()
                    continue
                if self._retry_at == 0.0:
                    log.warning("MLflow unreachable (%s); tracking calls are queued and retried, the work goes on",
                                message)
                    self.outages.append(message)
                self._retry_at = time.monotonic() + self._backoff
                self._backoff = min(2 * self._backoff, self.cfg.mlflow.retry_max_s)
                continue
            self._queue.popleft()
            if self._retry_at:
                delivered_late += 1
                if not self._queue:
                    log.info("MLflow reachable again: %d queued tracking calls delivered", delivered_late)
                    self._retry_at, self._backoff = 0.0, self.cfg.mlflow.retry_initial_s
        return True

    def _deliver(self, call: _Call) -> None:
        """Run a call. A 401 or 403 is an outage (a token that expired) unless the server takes this process's
        credentials for a plain read: then the call is tried once more, in case the token was renewed in between,
        and refused again it is CallForbidden, which no retry changes and which, kept at the head of the queue,
        would hold back every call behind it to the end of the run."""
        try:
            call.run()
        except Exception as error:
            if _http_status(error) not in (401, 403) or not self._credentials_accepted():
                raise
            try:
                call.run()
            except Exception as again:
                if _http_status(again) in (401, 403):
                    raise CallForbidden(str(again)) from again
                raise

    def _credentials_accepted(self) -> bool:
        if not _is_server(self.uri):
            return False
        try:
            check_credentials(self.uri, self.cfg.mlflow.request_timeout_s)
        except Exception:  # noqa: BLE001 - refused or unreachable: an outage, as the call's own error said
            return False
        return True

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait up to `timeout_s` (default mlflow.flush_timeout_s) for the queue to drain; True if it did."""
        timeout_s = self.cfg.mlflow.flush_timeout_s if timeout_s is None else timeout_s
        with self._lock:
            return self._drain(deadline=time.monotonic() + timeout_s)

    def backlog(self) -> list[dict]:
        """What is still queued, as records (run, metrics, params, tags, artifacts, statuses)."""
        with self._lock:
            return [call.record() for call in self._queue]

    def spill(self, folder: Location) -> None:
        """Write the queue under `folder` (a Ray Train worker at its end) for the driver to deliver."""
        records = self.backlog()
        if records:
            (folder / BACKLOG / f"{uuid.uuid4().hex}.json").write_json(records)

    def replay(self, folder: Location) -> None:
        """Queue the calls that workers left under `folder` (metrics, params, tags), then delete the files."""
        from mlflow.entities import Metric, Param, RunTag

        for name in (folder / BACKLOG).list_files():
            file = folder / BACKLOG / name
            for record in file.read_json():
                if record["call"] == "log_batch" and record["run_id"]:
                    StageRun(self, record["run_id"]).log_batch(
                        [Metric(*item) for item in record["metrics"]], [Param(*item) for item in record["params"]],
                        [RunTag(*item) for item in record["tags"]])
                else:
                    log.warning("tracking backlog %s: %s cannot be replayed", file, record["call"])
            file.remove()

    # --- runs -----------------------------------------------------------------------------------------

    def _experiment(self) -> None:
        name = experiment_name(self.cfg)
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            self.experiment_id = found.experiment_id
            return
        # A server stores artifacts where it was told to; a local store keeps them under the storage root.
        artifacts = None if _is_server(self.uri) else f"{Location.from_config(self.cfg.storage).uri}/mlflow/artifacts"
        if artifacts and "://" not in artifacts:
            artifacts = Path(artifacts).as_uri()
        self.experiment_id = self.client.create_experiment(name, artifact_location=artifacts)

    def _run_tags(self) -> dict[str, str]:
        return {"code_version": code_version(), HEARTBEAT_TAG: str(int(time.time())),
                HEARTBEAT_PERIOD_TAG: str(self.cfg.mlflow.heartbeat_s)}

    def start_pipeline(self, command: str, resolved_config: str) -> StageRun:
        """Open the parent run of this invocation, attach the resolved config, and end the runs that an
        earlier invocation left RUNNING when its process died."""
        self.submit("get or create experiment", self._experiment, lambda: {"call": "create_experiment"})
        self.submit("end abandoned runs", self.reap_abandoned_runs, lambda: {"call": "reap_abandoned_runs"})
        tags = {"mlflow.runName": f"{self.cfg.name}: {command}", "command": command}
        self.parent = self._open_run("pipeline", tags)
        self.parent.log_text(resolved_config, "config.yaml")
        self._heartbeat = threading.Thread(target=self._beat, name="mlflow heartbeat", daemon=True)
        self._heartbeat.start()
        return self.parent

    def start_stage(self, stage: str, fingerprint: str, inputs: dict[str, str], params: dict[str, str]) -> StageRun:
        """Open the nested run of one stage; `params` are its flattened config section."""
        from mlflow.entities import Param

        tags = {"mlflow.runName": stage, "stage": stage, "fingerprint": fingerprint}
        tags |= {f"input.{name}": value for name, value in inputs.items()}
        stage_run = self._open_run(stage, tags)
        stage_run.log_batch(params=[Param(key, value[:MAX_PARAM_LENGTH]) for key, value in params.items()])
        return stage_run

    def _open_run(self, what: str, tags: dict[str, str]) -> StageRun:
        from mlflow.exceptions import MlflowException

        stage_run = StageRun(self, None)
        parent = self.parent

        def create() -> None:
            if self.experiment_id is None:
                raise MlflowException("no experiment", error_code="RESOURCE_DOES_NOT_EXIST")
            all_tags = tags | self._run_tags()
            if parent is not None:
                if parent.run_id is None:
                    raise MlflowException("the parent run was not created", error_code="RESOURCE_DOES_NOT_EXIST")
                all_tags["mlflow.parentRunId"] = parent.run_id
            stage_run.run_id = self.client.create_run(self.experiment_id, tags=all_tags).info.run_id

        self.submit(f"start {what} run", create, lambda: {"call": "create_run", "run": what})
        with self._lock:
            self._open_runs.append(stage_run)
        return stage_run

    def _beat(self) -> None:
        while not self._heartbeat_stop.wait(self.cfg.mlflow.heartbeat_s):
            with self._lock:
                open_runs = [run for run in self._open_runs if run.run_id]
            for stage_run in open_runs:
                stage_run.set_tags({HEARTBEAT_TAG: str(int(time.time()))})

    def reap_abandoned_runs(self) -> list[str]:
        """End as FAILED the RUNNING runs of this experiment whose heartbeat stopped (their process died
        without ending them); returns their ids."""
        now = time.time()
        abandoned = []
        for run in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
            beat, period = run.data.tags.get(HEARTBEAT_TAG), run.data.tags.get(HEARTBEAT_PERIOD_TAG)
            if beat is None or period is None or now - float(beat) < ABANDONED_AFTER_PERIODS * float(period):
                continue
            reason = f"ended by a later vq2 invocation: no heartbeat since {time.ctime(float(beat))} (process gone)"
            self.client.set_tag(run.info.run_id, "vq2.ended_by", reason)
            self.client.set_terminated(run.info.run_id, "FAILED", end_time=int(float(beat) * 1000))
            abandoned.append(run.info.run_id)
        if abandoned:
            log.warning("MLflow: ended %d runs left RUNNING by a process that died: %s", len(abandoned),
                        ", ".join(abandoned))
        return abandoned

    def finished(self, stage_run: StageRun) -> None:
        with self._lock:
            if stage_run in self._open_runs:
                self._open_runs.remove(stage_run)

    def finish_pipeline(self, status: str) -> None:
        """End the parent run, stop the heartbeat and give queued calls `mlflow.flush_timeout_s` to go out."""
        if self.parent is not None:
            self.parent.finish(status)
        self._heartbeat_stop.set()
        if not self.flush():
            log.error("MLflow unreachable at the end of the run: %d tracking calls not delivered (%s; failing "
                      "since %s); runs left RUNNING are ended as FAILED by the next invocation", len(self._queue),
                      ", ".join(sorted({record["call"] for record in self.backlog()})), self.outages[-1])


class StageRun:
    """One MLflow run (a stage's, or the pipeline's parent run); its id is known once MLflow created it."""

    def __init__(self, tracker: Tracker | None, run_id: str | None, spill_to: Location | None = None):
        self.tracker, self.run_id = tracker, run_id
        self.spill_to = spill_to  # a Ray Train worker's stage output: where `close` leaves what is undelivered
        self.system_metrics = None  # a Ray Train rank 0's SystemMetrics (pipeline/system_metrics.py), stopped by close

    def _submit(self, what: str, call: Callable[[str], Any], record: dict) -> None:
        if self.tracker is None:
            return
        from mlflow.exceptions import MlflowException

        def run() -> None:
            if self.run_id is None:
                raise MlflowException(f"the run of {what} was never created", error_code="RESOURCE_DOES_NOT_EXIST")
            call(self.run_id)

        self.tracker.submit(what, run, lambda: record | {"run_id": self.run_id})

    def log_batch(self, metrics: list[Metric] = (), params: list[Param] = (), tags: list[RunTag] = ()) -> None:
        metrics, params, tags = list(metrics), list(params), list(tags)
        record = {"call": "log_batch", "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
                  "params": [[p.key, p.value] for p in params], "tags": [[t.key, t.value] for t in tags]}
        self._submit("log batch", lambda run_id: self.tracker.client.log_batch(run_id, metrics, params, tags), record)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        if self.tracker is None:  # a rank that does not track: before mlflow's import, which it need not pay
            return
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        self.log_batch(metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.tracker is None:
            return
        from mlflow.entities import RunTag

        self.log_batch(tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_inputs(self, datasets: list[DatasetInput] = (), models: list[LoggedModelInput] = ()) -> None:
        """The datasets (and logged models) this run read: MLflow's lineage view of the run."""
        datasets, models = list(datasets), list(models)
        record = {"call": "log_inputs", "datasets": [[d.dataset.name, d.dataset.digest, d.dataset.source]
                                                     for d in datasets], "models": [m.model_id for m in models]}
        self._submit("log inputs", lambda run_id: self.tracker.client.log_inputs(run_id, datasets, models), record)

    def queue(self, what: str, call: Callable[[str], Any], record: dict) -> None:
        """Any other MLflow call about this run (`call(run_id)`), delivered in order through the tracker's queue;
        a call queued again after a failure must be safe to repeat."""
        self._submit(what, call, record)

    def log_dict(self, obj: dict, artifact_file: str) -> None:
        self.log_bytes(json.dumps(obj, indent=1, sort_keys=True).encode(), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.log_bytes(text.encode(), artifact_file)

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        """Log in-memory bytes (a PNG, say) as the artifact `dir/name`."""
        folder, _, name = artifact_file.rpartition("/")

        def upload(run_id: str) -> None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / name
                path.write_bytes(data)
                self.tracker.client.log_artifact(run_id, str(path), folder or None)

        self._submit(f"log {artifact_file}", upload, {"call": "log_artifact", "artifact": artifact_file,
                                                      "bytes": len(data)})

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with this status (FINISHED, FAILED or KILLED)."""
        if self.tracker is None:
            return
        self.tracker.finished(self)
        self._submit("end run", lambda run_id: self.tracker.client.set_terminated(run_id, status),
                     {"call": "set_terminated", "status": status})

    def close(self) -> None:
        """A Ray Train worker at its end: wait for queued calls, and leave what is undelivered under `spill_to`."""
        if self.tracker is None:
            return
        if self.system_metrics is not None:
            self.system_metrics.__exit__(None, None, None)
        if not self.tracker.flush() and self.spill_to is not None:
            self.tracker.spill(self.spill_to)
