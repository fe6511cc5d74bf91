"""MLflow-native records against the real MLflow server: registered models that load without unpickling code
(and refuse a tampered file), promotion by alias, dataset inputs and system metrics."""

import dataclasses
import io
import json
import pickle
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from jobs.cli import main as vq2
from models.vqvae import VQVAE, vqvae_tiny
from pipeline import registry, sample
from pipeline.code_digest import code_digest
from pipeline.checkpoints import load_model, save_model
from pipeline.config import parse_config
from pipeline.lineage import CONTEXT_TAG, stage_inputs
from pipeline.runner import StageResult
from pipeline.storage import Location
from pipeline.system_metrics import SystemMetrics
from pipeline.tracking import Tracker


def server_config(root, uri, name):
    tree = {"storage": {"root": str(root)}, "dataset": {"source": "/nowhere"},
            "mlflow": {"tracking_uri": uri, "experiment": f"exp-{name}", "request_retries": 0,
                       "model_names": "per_experiment", "flush_timeout_s": 30}}
    return parse_config(tree, f"{name}.yaml")


@contextmanager
def fluent_tracking(uri):
    """MLflow's fluent API pointed at `uri`, then unset again: set_tracking_uri also exports MLFLOW_TRACKING_URI,
    and restoring the default that way would point every later test without a tracking URI at ./mlflow.db."""
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)


class Detonator:
    """Pickled, it runs `open(marker, "w")` when unpickled: what a tampered model file could hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def registered_vqvae(mlflow_server, tmp_path):
    """A tiny VQ-VAE trained by no one, registered as a train_vqvae stage would register it."""
    cfg = server_config(tmp_path / "root", mlflow_server, "registry")
    tracker = Tracker(cfg)
    tracker.start_pipeline("run", "x: 1\n")
    stage = tracker.start_stage("train_vqvae", "0123456789abcdef", {}, {})
    model_file = Location(str(tmp_path / "root" / "vqvae.pt"))
    torch.manual_seed(0)
    model = VQVAE(vqvae_tiny())
    save_model(model_file, "vqvae", model, step=1, image_size=32)
    ctx = SimpleNamespace(tracking=stage, fingerprint="0123456789abcdef", name="train_vqvae")
    registry.register(ctx, cfg, "vqvae", model_file, model.cfg, image_size=32)
    stage.finish()
    tracker.finish_pipeline("FINISHED")
    assert tracker.refused == [] and tracker.backlog() == []
    return cfg, stage.run_id, tracker.parent.run_id, model_file


def test_a_registered_model_is_linked_to_its_run_and_loads_as_weights_only_pyfunc(registered_vqvae, mlflow_server,
                                                                                    tmp_path, capsys):
    cfg, run_id, parent_id, model_file = registered_vqvae
    client = MlflowClient(mlflow_server)
    name = "exp-registry.vq2-vqvae"  # model_names: per_experiment
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert version.run_id == run_id and version.tags["fingerprint"] == "0123456789abcdef"
    assert version.tags["weights_sha256"] == registry.file_digest(Path(model_file.path))
    model_id = version.model_id or version.tags[registry.MODEL_ID_TAG]
    assert version.source == client.get_logged_model(model_id).artifact_location
    assert [output.model_id for output in client.get_run(run_id).outputs.model_outputs] == [model_id]

    uri = f"models:/{name}/{version.version}"
    with fluent_tracking(mlflow_server):
        info = mlflow.models.get_model_info(f"models:/{model_id}")
        assert info.signature.inputs.inputs[0].shape == (-1, 3, -1, -1) and info.saved_input_example_info
        pyfunc = mlflow.pyfunc.load_model(uri)
        assert pyfunc.metadata.flavors["python_function"]["loader_module"] == "pipeline.mlflow_model"
        codes = pyfunc.predict(np.zeros((2, 3, 32, 32), np.float32))
        assert {k: v.shape for k, v in codes.items()} == {"top": (2, 4, 4), "bottom": (2, 8, 8)}

    # `vq2 promote` sets the alias on the models of the pipeline run; a stage takes the model by it.
    assert vq2(["promote", "--experiment", "exp-registry", "--run", parent_id, "--alias", "champion",
                "--tracking-uri", mlflow_server]) == 0
    assert f"{name}@champion" in capsys.readouterr().out
    resolved = registry.resolve(cfg, f"models:/{name}@champion")
    assert resolved.version == version.version and resolved.fingerprint == "0123456789abcdef"
    copy = registry.fetch(cfg, resolved, Location(str(tmp_path / "copy.pt")))
    assert load_model(copy, "vqvae")[1]["image_size"] == 32

    # Sampling with it: the file's digest and the code of its kind are inputs of the sample stage's fingerprint
    # (no train_vqvae fingerprint carries models/vqvae.py here).
    taking = cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"vqvae": f"models:/{name}@champion"})})
    assert sample.external_inputs(taking)[0] == {"registry.vqvae": resolved.weights_sha256[:16],
                                                "code.vqvae": code_digest("models.vqvae")}


def test_a_tampered_registered_model_file_is_refused_and_never_run(registered_vqvae, mlflow_server, s3_server,
                                                                   tmp_path):
    cfg, _, _, _ = registered_vqvae
    name = "exp-registry.vq2-vqvae"
    resolved = registry.resolve(cfg, f"models:/{name}/1")
    # Someone with write access to the artifact store swaps the weights for a pickle that runs code.
    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    torch.save({"kind": "vqvae", "payload": Detonator(str(marker))}, buffer)
    s3 = s3_server.client()
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=s3_server.bucket, Prefix="mlflow-artifacts/")["Contents"]
            if resolved.model_id in item["Key"] and item["Key"].endswith("/data/vqvae.pt")]
    assert len(keys) == 1
    s3.put_object(Bucket=s3_server.bucket, Key=keys[0], Body=buffer.getvalue())

    with pytest.raises(ValueError, match="refused"):
        registry.fetch(cfg, resolved, Location(str(tmp_path / "copy.pt")))
    with fluent_tracking(mlflow_server), pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        mlflow.pyfunc.load_model(f"models:/{name}/1")
    assert not marker.exists()


def test_dataset_inputs_and_system_metrics_reach_the_server(tiny_pipeline, mlflow_server, tmp_path):
    """The encode output of the tiny pipeline as a training input, and system metrics with a node id."""
    from pipeline.runner import read_manifest, stage_address, stages

    cfg = tiny_pipeline.config()
    fingerprints, results = {}, {}
    for name, module in list(stages().items())[:3]:  # shard, train_vqvae, encode
        address = stage_address(module, cfg, fingerprints)
        fingerprints[name] = address.fingerprint
        results[name] = StageResult(name, address.fingerprint, address.location, read_manifest(address.location), True)
    tracker = Tracker(server_config(tmp_path / "root", mlflow_server, "lineage"))
    tracker.start_pipeline("run", "x: 1\n")
    stage = tracker.start_stage("train_prior", "fedcba9876543210", {}, {})
    stage.log_inputs(stage_inputs("train_prior", results, {}, cfg.dataset.source, trains=True))
    with SystemMetrics(stage, interval_s=3600, node="node-a"):
        pass
    stage.finish()
    tracker.finish_pipeline("FINISHED")

    run = MlflowClient(mlflow_server).get_run(stage.run_id)
    inputs = {item.dataset.name: item for item in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["codes", "shards"]
    codes = inputs["codes"].dataset
    assert codes.digest == results["encode"].fingerprint
    assert json.loads(codes.source) == {"uri": results["encode"].location.uri}
    assert json.loads(codes.profile)["splits"] == results["encode"].manifest["splits"]
    columns = {c["name"]: c["type"] for c in json.loads(codes.schema)["mlflow_colspec"]}
    assert columns == {"key": "string", "label": "integer", "top": "array", "bottom": "array"}
    assert inputs["shards"].dataset.digest == results["shard"].fingerprint
    assert {tag.key: tag.value for tag in inputs["codes"].tags} == {CONTEXT_TAG: "training"}
    assert run.data.metrics["system/node-a/cpu_utilization_percentage"] >= 0
    assert run.data.metrics["system/node-a/system_memory_usage_megabytes"] > 0


def test_models_register_in_the_runs_own_local_store(tiny_pipeline):
    """With the default local store (SQLite under the storage root) the registry is that store too, not MLflow's
    default ./mlflow.db: the session's train_vqvae and train_classifier stages registered their models there, each
    version linked to the stage run that trained it."""
    uri = tiny_pipeline.tracking_uri
    client = MlflowClient(uri, registry_uri=uri)
    for name, stage in (("vq2-vqvae", "train_vqvae"), ("vq2-classifier", "train_classifier")):
        versions = client.search_model_versions(f"name = '{name}'")
        assert versions, name
        assert {client.get_run(version.run_id).data.tags["stage"] for version in versions} == {stage}


def test_sampling_refuses_priors_trained_on_another_vqvaes_codes(registered_vqvae, mlflow_server, tmp_path, caplog):
    """Another training of the VQ-VAE preset makes codes of the same grids and codebook size that mean other
    pictures: sampling refuses priors that learned the codes of a VQ-VAE other than the one that decodes (the
    train_prior manifest's layout names it, a prior file records it). The old code only compared the shapes, and
    took the decoding VQ-VAE's fingerprint for the priors'. A prior file from before it was recorded is taken with
    a warning."""
    from models.classifier import ResNetClassifier, classifier_tiny
    from models.prior import CodePrior
    from pipeline.codes import CodesLayout
    from pipeline.config import TrainPriorConfig
    from pipeline.train_prior import prior_configs

    cfg, vqvae_run, _, vqvae_file = registered_vqvae
    client = MlflowClient(mlflow_server)
    (version,) = client.search_model_versions(f"run_id = '{vqvae_run}'")
    vqvae_uri, fingerprint, other = f"models:/{version.name}/{version.version}", "0123456789abcdef", "9999aaaa9999aaaa"
    root, classes = Location(str(tmp_path / "trained")), ["a", "b"]
    vqvae = load_model(vqvae_file, "vqvae")[0]
    grids = vqvae.cfg.grid_shapes(32)
    torch.manual_seed(0)
    priors = {name: CodePrior(config) for name, config in prior_configs(
        TrainPriorConfig(), CodesLayout(grids, [vqvae.cfg.codebook_size] * 2, "unused", "unused"), 2).items()}
    save_model(root / "classifier/classifier.pt", "classifier", ResNetClassifier(classifier_tiny(2)), classes=classes)
    classifier = StageResult("train_classifier", "c", root / "classifier", {"model": "classifier.pt", "classes": classes},
                             True)

    def pipeline_priors(learned_from):
        layout = CodesLayout(grids, [vqvae.cfg.codebook_size] * 2, (root / "vqvae.pt").uri, learned_from)
        for name, model in priors.items():
            save_model(root / f"priors/{name}/prior.pt", "prior", model, level=name, step=1, classes=classes)
        manifest = {"layout": dataclasses.asdict(layout), "classes": classes,
                    "levels": {name: {"model": f"{name}/prior.pt", "prior_config": {"num_classes": 2}} for name in priors}}
        return StageResult("train_prior", "p", root / "priors", manifest, True)

    def registered_priors(**extra):
        """Register the priors as a train_prior run would, their files with `extra`; their URIs, top first."""
        pairing = server_config(tmp_path / "root", mlflow_server, "pairing")
        tracker = Tracker(pairing)
        tracker.start_pipeline("run", "x: 1\n")
        stage = tracker.start_stage("train_prior", "fedcba9876543210", {}, {})
        ctx = SimpleNamespace(tracking=stage, fingerprint="fedcba9876543210", name="train_prior")
        for name, model in priors.items():
            file = root / f"registered-{stage.run_id}/{name}.pt"
            save_model(file, "prior", model, level=name, step=1, classes=classes, **extra)
            registry.register(ctx, pairing, "prior", file, model.cfg, level=name)
        stage.finish()
        tracker.finish_pipeline("FINISHED")
        assert tracker.refused == [] and tracker.backlog() == []
        versions = {v.tags["level"]: v for v in client.search_model_versions(f"run_id = '{stage.run_id}'")}
        return [f"models:/{versions[name].name}/{versions[name].version}" for name in priors]

    def sampling(upstream, **section):
        taking = cfg.model_copy(update={"sample": cfg.sample.model_copy(update=section)})
        tracker = Tracker(taking)
        tracker.start_pipeline("run", "x: 1\n")
        stage = tracker.start_stage("sample", "0011223344556677", {}, {})
        ctx = SimpleNamespace(external=sample.external_inputs(taking)[1], upstream=upstream, tracking=stage,
                              output=Location(str(tmp_path / "sample" / stage.run_id)))
        try:
            return sample.sampling_models(taking, ctx)[1]
        finally:
            stage.finish()
            tracker.finish_pipeline("FINISHED")

    refused = (rf"learned the codes of the VQ-VAE of fingerprint {other}; the samples would be decoded by "
               rf"{vqvae_uri} \(version {version.version}\), fingerprint {fingerprint}")
    # The pipeline's priors, learned from another VQ-VAE's codes, and a registered VQ-VAE: refused.
    upstream = {"train_prior": pipeline_priors(other), "train_classifier": classifier}
    with pytest.raises(ValueError, match=r"the train_prior stage's priors in .*" + refused):
        sampling(upstream, vqvae=vqvae_uri)
    assert sampling({**upstream, "train_prior": pipeline_priors(fingerprint)}, vqvae=vqvae_uri).vqvae_fingerprint == fingerprint

    # Registered priors: their files say whose codes they learned.
    with pytest.raises(ValueError, match=r"models:/exp-pairing.vq2-prior-top/\d+ \(version \d+\) and "
                                         r"models:/exp-pairing.vq2-prior-bottom/\d+ \(version \d+\) " + refused):
        sampling({"train_classifier": classifier}, vqvae=vqvae_uri, priors=registered_priors(vqvae_fingerprint=other))
    matching = registered_priors(vqvae_fingerprint=fingerprint)
    assert sampling({"train_classifier": classifier}, vqvae=vqvae_uri, priors=matching).vqvae_fingerprint == fingerprint
    save_model(root / "vqvae/vqvae.pt", "vqvae", vqvae, step=1, image_size=32)
    pipeline_vqvae = StageResult("train_vqvae", other, root / "vqvae", {"model": "vqvae.pt"}, True)
    with pytest.raises(ValueError, match=rf"fingerprint {fingerprint}; the samples would be decoded by the "
                                         rf"train_vqvae stage's .*vqvae.pt, fingerprint {other}"):
        sampling({"train_vqvae": pipeline_vqvae, "train_classifier": classifier}, priors=matching)
    # A prior file from before they recorded it: the shapes are checked, and the unchecked pairing is said.
    caplog.set_level("WARNING", logger="vq2")
    assert sampling({"train_classifier": classifier}, vqvae=vqvae_uri, priors=registered_priors()).grids == tuple(grids)
    assert "do not record which VQ-VAE's codes they learned" in caplog.text
