"""The whole pipeline as one job against the real S3 server and a real MLflow server, read back through MLflow."""

import math

import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY_UPSTREAM, deep_merge
from pipeline import demo_data
from pipeline.config import parse_config
from pipeline.runner import pipeline_status, run_pipeline
from pipeline.storage import Location

STAGES = ["shard", "train_vqvae", "encode", "train_classifier", "train_prior", "sample", "evaluate"]


@pytest.mark.slow
def test_whole_pipeline_on_s3_with_an_mlflow_server(ray_local, s3_env, mlflow_server, tmp_path):
    corpus = Location(s3_env.uri("e2e/corpus"))
    demo_data.synthetic(corpus, 12, 4, size=(32, 32), classes=4, with_bad_files=True)
    tree = deep_merge(TINY_UPSTREAM, {
        "storage": {"root": s3_env.uri("e2e/root")},
        "dataset": {"source": corpus.uri, "shard_size": 24},
        "mlflow": {"tracking_uri": mlflow_server, "experiment": "e2e", "request_retries": 1},
        "train_vqvae": {"steps": 20, "checkpoint_every": 20, "validate_every": 20},
        "train_classifier": {"steps": 20, "checkpoint_every": 20, "validate_every": 20},
        "train_prior": {"steps": 20, "checkpoint_every": 20, "validate_every": 20, "sample_grid": 2},
        "sample": {"samples_per_class": 4},
        # test_evaluate.py covers the Inception and EfficientNet features; the classifier's are fast.
        "evaluate": {"feature_nets": ["classifier"], "max_real_images": 16, "sweep": [1.0, 0.5], "cas_steps": 20},
    })
    cfg = parse_config(tree, "e2e.yaml")
    results = run_pipeline(cfg)
    assert list(results) == STAGES and not any(r.cached for r in results.values())
    assert all(r.location.uri.startswith("s3://") for r in results.values())
    assert [row["state"] for row in pipeline_status(cfg)] == ["complete"] * len(STAGES)
    # Ray Train kept its checkpoints on the S3 server, under each training stage's own prefix.
    keys = [o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3_env.bucket, Prefix="e2e/root/")["Contents"]]
    for stage in ("train_vqvae", "train_classifier"):
        assert any(key.startswith(f"e2e/root/{stage}/") and "/ray_train/checkpoint_" in key for key in keys), stage
    assert any("/train_prior/" in key and "/top/ray_train/checkpoint_" in key for key in keys)

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    stages = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert sorted(stages) == sorted(STAGES)
    for name, run in stages.items():
        assert run.info.status == "FINISHED" and run.data.tags["fingerprint"] == results[name].fingerprint
        assert run.data.params, name  # the stage's flattened config
    headline = {"train_vqvae": "val_mse", "train_prior": "top_val_nll_bits", "sample": "acceptance_rate",
                "evaluate": "fid_classifier", "train_classifier": "val_top1", "encode": "val_recon_mse"}
    for stage, metric in headline.items():
        assert math.isfinite(stages[stage].data.metrics[metric]), (stage, metric)
    assert {"samples.png"} <= {a.path for a in client.list_artifacts(stages["sample"].info.run_id)}

    # A second invocation reuses every stage and says which run made it.
    again = run_pipeline(cfg)
    assert all(r.cached for r in again.values())
