"""The MLflow Model Registry: training stages register their models; later stages can take one by URI.

A registered version is an MLflow pyfunc model whose one data file is the stage's weights-only model file
(pipeline/checkpoints.py) and whose loader is `pipeline.mlflow_model`, installed code: loading it, through
the pipeline or `mlflow.pyfunc.load_model`, never unpickles code. Each version is linked to the stage run
that trained it (the run's logged model, and the version's run) and tagged with the stage's fingerprint and
the file's sha256. A stage that takes a model by URI (`sample.vqvae: models:/vq2-vqvae@champion`) resolves
it when its fingerprint is computed, so the model's identity (the file's sha256) is part of that
fingerprint, and refuses a downloaded file whose digest differs from the one registered.

Registering goes through the tracking queue (pipeline/tracking.py), like every MLflow write of a stage;
resolving and downloading a model a stage needs cannot wait for an outage to pass, so it calls MLflow
directly and a failure fails the stage, naming the URI.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.config import REGISTERED_MODEL_URI, PipelineConfig, redact_uri
from pipeline.storage import Location
from pipeline.tracking import StageRun, experiment_name, tracking_uri

# mlflow is imported in the functions that call it, as in pipeline/tracking.py: the stage modules import this
# one, and their Ray workers and actors that register or resolve nothing should not pay mlflow's import.
if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger("vq2")

LOADER_MODULE = "pipeline.mlflow_model"
DATA_FOLDER = "data"  # where mlflow.pyfunc.save_model puts the model file inside the logged model
FINGERPRINT_TAG, DIGEST_TAG, STAGE_TAG, FILE_TAG = "fingerprint", "weights_sha256", "stage", "model_file"
MODEL_ID_TAG = "logged_model_id"  # not every registry store returns a version's model_id


def model_name(cfg: PipelineConfig, kind: str, level: str | None = None) -> str:
    """The registered model of a model kind (a prior: of its level), per mlflow.model_names."""
    base = f"vq2-prior-{level}" if kind == "prior" else f"vq2-{kind}"
    return f"{experiment_name(cfg)}.{base}" if cfg.mlflow.model_names == "per_experiment" else base


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class _Registration:
    """What the queued calls of one registration have done: a retried call goes on from there."""

    model_id: str | None = None
    logged: bool = False
    version: str | None = None


def register(ctx, cfg: PipelineConfig, kind: str, model_file: Location, model_config,
             level: str | None = None, image_size: int | None = None) -> None:
    """Log `model_file` (written by save_model) as an MLflow model of the stage's run (`ctx.tracking`) and
    register it as a new version of `model_name(cfg, kind, level)`, linked to the run and tagged with the
    stage's fingerprint."""
    stage_run: StageRun = ctx.tracking
    if not cfg.mlflow.register_models or stage_run.tracker is None:
        return
    fingerprint, stage = ctx.fingerprint, ctx.name
    from mlflow.entities import LoggedModelOutput
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from pipeline.mlflow_model import signature

    tracker = stage_run.tracker
    name = model_name(cfg, kind, level)
    model_signature, example = signature(kind, model_config, image_size)
    state = _Registration()
    tags = {FINGERPRINT_TAG: fingerprint, STAGE_TAG: stage, FILE_TAG: model_file.uri} | ({"level": level} if level else {})

    def log_model(run_id: str) -> None:
        client = tracker.client
        if state.model_id is None:
            logged = client.create_logged_model(tracker.experiment_id, name=kind if level is None else f"prior-{level}",
                                                source_run_id=run_id, tags=tags)
            state.model_id = logged.model_id
        logged = client.get_logged_model(state.model_id)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / model_file.name
            local.write_bytes(model_file.read_bytes())
            tags[DIGEST_TAG] = file_digest(local)
            import mlflow.pyfunc

            folder = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                folder, loader_module=LOADER_MODULE, data_path=str(local), signature=model_signature,
                input_example=example, metadata={"vq2_kind": kind, DIGEST_TAG: tags[DIGEST_TAG]},
                mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id, model_id=state.model_id,
                                   model_uuid=state.model_id),
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"vq2=={metadata.version('vq2')}"],
            )
            client.log_model_artifacts(state.model_id, str(folder))
        client.set_logged_model_tags(state.model_id, {DIGEST_TAG: tags[DIGEST_TAG]})
        client.finalize_logged_model(state.model_id, "READY")
        client.log_outputs(run_id, [LoggedModelOutput(state.model_id, step=0)])
        state.logged = True

    def register_version(run_id: str) -> None:
        if state.version is not None:
            return
        if not state.logged:
            raise MlflowException(f"model {name} was not logged", error_code="RESOURCE_DOES_NOT_EXIST")
        client = tracker.client
        try:
            client.create_registered_model(name, description="vq2: registered by the pipeline's training stages")
        except MlflowException as error:
            if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        # The logged model's own location as the source, not models:/<id>: a local (SQLite) registry resolves
        # that URI through MLflow's global tracking URI, not this client's.
        source = client.get_logged_model(state.model_id).artifact_location
        version = client.create_model_version(name, source, run_id=run_id,
                                              tags=tags | {MODEL_ID_TAG: state.model_id},
                                              model_id=state.model_id, await_creation_for=0)
        state.version = version.version
        log.info("%s: registered %s version %s", stage, name, version.version)

    stage_run.queue(f"log model {name}", log_model, {"call": "log_model", "model": name, "file": model_file.uri})
    stage_run.queue(f"register model {name}", register_version, {"call": "create_model_version", "model": name})


# --- taking a registered model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisteredVersion:
    """One version of a registered vq2 model, as a models:/ URI resolved it."""

    uri: str
    name: str
    version: str
    run_id: str | None
    model_id: str
    fingerprint: str  # of the stage that trained it
    weights_sha256: str
    artifact: str  # the model file in MLflow's artifact store


def client_for(cfg: PipelineConfig) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    return MlflowClient(uri, registry_uri=uri)


def resolve(cfg: PipelineConfig, uri: str) -> RegisteredVersion:
    """The version a models:/<name>@<alias> or models:/<name>/<version> URI names now; only versions that vq2
    registered (they carry the model file's digest) are accepted."""
    from mlflow.exceptions import MlflowException

    match = REGISTERED_MODEL_URI.fullmatch(uri)
    if match is None:
        raise ValueError(f"{uri!r} is not models:/<name>@<alias> or models:/<name>/<version>")
    client = client_for(cfg)
    try:
        if match["alias"]:
            found = client.get_model_version_by_alias(match["name"], match["alias"])
        else:
            found = client.get_model_version(match["name"], match["version"])
    except MlflowException as error:
        raise LookupError(f"{uri}: not in the Model Registry of {redact_uri(tracking_uri(cfg))} ({error.message})") from None
    digest, model_file = found.tags.get(DIGEST_TAG), found.tags.get(FILE_TAG)
    model_id = found.model_id or found.tags.get(MODEL_ID_TAG)
    if not digest or not model_file or not model_id:
        raise ValueError(f"{uri} (version {found.version}): not registered by vq2 (no {DIGEST_TAG} and {FILE_TAG} "
                         "tags); only vq2's weights-only models are loaded")
    artifact_root = client.get_logged_model(model_id).artifact_location
    return RegisteredVersion(uri, found.name, found.version, found.run_id, model_id,
                             found.tags.get(FINGERPRINT_TAG, ""), digest,
                             f"{artifact_root}/{DATA_FOLDER}/{model_file.rsplit('/', 1)[-1]}")


def fetch(cfg: PipelineConfig, registered: RegisteredVersion, destination: Location) -> Location:
    """Copy a registered model file to `destination` after checking its sha256 against the registered one."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=registered.artifact, dst_path=tmp,
                                                         tracking_uri=tracking_uri(cfg)))
        found = file_digest(local)
        if found != registered.weights_sha256:
            raise ValueError(f"{registered.uri} (version {registered.version}): the model file {registered.artifact} "
                             f"has sha256 {found}, the registered version says {registered.weights_sha256}: refused "
                             "(changed after it was registered)")
        destination.write_bytes(local.read_bytes())
    return destination


def promote(uri: str, experiment: str, run_id: str, alias: str) -> list[tuple[str, str]]:
    """Set `alias` on every model version registered by the stages of pipeline run `run_id` (the parent run, or
    a stage run) of `experiment`, and of the earlier runs whose outputs it reused; [(name, version)]."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment {experiment!r}")
    run = client.get_run(run_id)
    parent = run.data.tags.get("mlflow.parentRunId", run_id)
    stages = client.search_runs([found.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    producers = {stage.data.tags.get("produced_by_run") or stage.info.run_id for stage in stages} or {run_id}
    promoted = []
    for producer in sorted(producers):
        for version in client.search_model_versions(f"run_id = '{producer}'"):
            client.set_registered_model_alias(version.name, alias, version.version)
            promoted.append((version.name, version.version))
    if not promoted:
        raise LookupError(f"run {run_id} of experiment {experiment!r} registered no models (its training stages "
                          "ran with mlflow.register_models: false, or it trained nothing)")
    return sorted(promoted)
