"""MLflow tracking: one parent run per invocation, one nested run per stage; never fatal to the data."""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis

from pipeline.config import PipelineConfig
from pipeline.storage import Location

log = logging.getLogger("vq2")
MAX_PARAM_LENGTH = 6000


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


def tracking_uri(cfg: PipelineConfig) -> str:
    """Config, then MLFLOW_TRACKING_URI, then a sqlite store under a local storage root."""
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
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


class Tracker:
    """MLflow calls for one pipeline invocation. The first failure (server down) turns tracking off for
    the rest of the invocation: it is logged, recorded in `failures`, and the data work goes on."""

    def __init__(self, cfg: PipelineConfig):
        # Without these, an unreachable server holds each call for minutes of retries with backoff.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(cfg.mlflow.request_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.mlflow.request_timeout_s))
        if cfg.storage.endpoint_url:
            # A local store with artifacts under an S3 root: MLflow's own S3 client needs the endpoint.
            os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", cfg.storage.endpoint_url)
        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        self.failures: list[str] = []
        self.client = MlflowClient(self.uri)
        self.experiment_id: str | None = None
        self.parent_id: str | None = None

    @property
    def online(self) -> bool:
        return not self.failures

    def call(self, what: str, method: str, *args, **kwargs) -> Any:
        """Call an MlflowClient method; on failure log a warning, record it and return None."""
        if not self.online:
            return None
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any tracking failure must not stop the pipeline
            message = f"{what}: {type(error).__name__}: {str(error)[:300]}"
            log.warning("MLflow tracking failed, continuing without it (%s)", message)
            self.failures.append(message)
            return None

    def _experiment(self) -> str | None:
        name = self.cfg.mlflow.experiment or f"vq2-{self.cfg.name}"
        found = self.call("get experiment", "get_experiment_by_name", name)
        if found is not None:
            return found.experiment_id
        if not self.online:
            return None
        # A server stores artifacts where it was told to; a local store keeps them under the storage root.
        artifacts = None if _is_server(self.uri) else f"{Location.from_config(self.cfg.storage).uri}/mlflow/artifacts"
        if artifacts and "://" not in artifacts:
            artifacts = Path(artifacts).as_uri()
        return self.call("create experiment", "create_experiment", name, artifact_location=artifacts)

    def start_pipeline(self, command: str, resolved_config: str) -> str | None:
        """Open the parent run of this invocation and attach the resolved config."""
        self.experiment_id = self._experiment()
        if self.experiment_id is None:
            return None
        tags = {
            "mlflow.runName": f"{self.cfg.name}: {command}",
            "command": command,
            "code_version": code_version(),
        }
        run = self.call("start pipeline run", "create_run", self.experiment_id, tags=tags)
        self.parent_id = run.info.run_id if run else None
        if self.parent_id:
            self.call("log config", "log_text", self.parent_id, resolved_config, "config.yaml")
        return self.parent_id

    def start_stage(self, stage: str, fingerprint: str, inputs: dict[str, str], params: dict[str, str]):
        """Open the nested run of one stage; `params` are its flattened config section."""
        run = None
        if self.parent_id:
            tags = {
                "mlflow.runName": stage,
                "mlflow.parentRunId": self.parent_id,
                "stage": stage,
                "fingerprint": fingerprint,
                "code_version": code_version(),
            } | {f"input.{name}": value for name, value in inputs.items()}
            run = self.call(f"start {stage} run", "create_run", self.experiment_id, tags=tags)
        stage_run = StageRun(self, run.info.run_id if run else None)
        stage_run.log_batch(params=[Param(key, value[:MAX_PARAM_LENGTH]) for key, value in params.items()])
        return stage_run

    def finish_pipeline(self, status: str) -> None:
        if self.parent_id:
            self.call("finish pipeline run", "set_terminated", self.parent_id, status)


class StageRun:
    """A stage's nested run; every method is a no-op once tracking is offline."""

    def __init__(self, tracker: Tracker, run_id: str | None):
        self.tracker, self.run_id = tracker, run_id

    def log_batch(self, metrics: list[Metric] = (), params: list[Param] = (), tags: list[RunTag] = ()) -> None:
        if self.run_id:
            self.tracker.call("log batch", "log_batch", self.run_id, list(metrics), list(params), list(tags))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = get_current_time_millis()
        self.log_batch(metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.log_batch(tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_dict(self, obj: dict, artifact_file: str) -> None:
        if self.run_id:
            self.tracker.call(f"log {artifact_file}", "log_dict", self.run_id, obj, artifact_file)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if self.run_id:
            self.tracker.call(f"log {local_path}", "log_artifact", self.run_id, local_path, artifact_path)

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        """Log in-memory bytes (a PNG, say) as the artifact `dir/name`."""
        if not self.run_id:
            return
        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.log_artifact(str(path), folder or None)

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self.tracker.call("finish stage run", "set_terminated", self.run_id, status)
