"""The whole pipeline as one job submitted to a real Ray head, on the real S3 server with a real MLflow server,
read back through MLflow, then found complete by a second invocation."""

import math
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.job_submission import JobStatus, JobSubmissionClient

from conftest import BIN
from pipeline import demo_data
from pipeline.config import load_config
from pipeline.runner import pipeline_status, run_pipeline
from pipeline.storage import Location

REPO = Path(__file__).resolve().parents[1]
STAGES = ["shard", "train_vqvae", "encode", "train_classifier", "train_prior", "sample", "evaluate"]
TINY_JOB = [  # configs/tiny.yaml cut to the fewest steps and processes that still exercise every stage
    "dataset.shard_size=24", "mlflow.request_retries=1", "encode.num_actors=1", "sample.num_actors=1",
    "evaluate.num_actors=1", "train_vqvae.num_workers=1", "train_classifier.num_workers=1",
    "train_prior.num_workers=1",
    "train_vqvae.steps=10", "train_vqvae.checkpoint_every=10", "train_vqvae.validate_every=10",
    "train_vqvae.warmup_steps=0", "train_vqvae.batch_size=16", "train_vqvae.val_samples=16",
    "train_classifier.steps=10", "train_classifier.checkpoint_every=10", "train_classifier.validate_every=10",
    "train_classifier.batch_size=16",
    "train_prior.steps=10", "train_prior.checkpoint_every=10", "train_prior.validate_every=10",
    "train_prior.warmup_steps=0", "train_prior.batch_size=16", "train_prior.val_samples=32",
    "train_prior.sample_grid=2",
    "sample.samples_per_class=4", "sample.batch_size=8",
    # test_evaluate.py covers the Inception and EfficientNet features; the classifier's are fast.
    "evaluate.feature_nets=[classifier]", "evaluate.max_real_images=16", "evaluate.sweep=[1.0,0.5]",
    "evaluate.cas_steps=10",
]


@pytest.mark.slow
def test_a_job_submitted_to_a_ray_head_runs_the_whole_pipeline(ray_head, s3_env, mlflow_server):
    address, temp = ray_head
    corpus = Location(s3_env.uri("e2e/corpus"))
    demo_data.synthetic(corpus, 12, 4, size=(32, 32), classes=4, with_bad_files=True)
    overrides = [f"storage.root={s3_env.uri('e2e/root')}", f"dataset.source={corpus.uri}",
                 f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=e2e", *TINY_JOB]
    submitted = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", "vq2-e2e", "--working-dir", ".",
         "--", "python", "-m", "jobs.submit", "--config", "configs/tiny.yaml", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=1200)
    jobs = JobSubmissionClient(address)
    logs = jobs.get_job_logs("vq2-e2e")
    assert jobs.get_job_status("vq2-e2e") == JobStatus.SUCCEEDED, submitted.stdout[-3000:] + logs[-5000:]
    assert f"preflight: the cluster is ready for {', '.join(STAGES)}" in logs

    # The working directory went up without the venv, the git folder or local outputs.
    (package,) = [p for p in (temp / "session_latest/runtime_resources/working_dir_files").iterdir() if p.is_dir()]
    assert (package / "jobs/submit.py").is_file()
    assert not {".venv", ".git", "runs", "data"} & {entry.name for entry in package.iterdir()}

    cfg = load_config(REPO / "configs/tiny.yaml", overrides)
    rows = pipeline_status(cfg)
    assert [row["state"] for row in rows] == ["complete"] * len(STAGES)
    assert all(row["output"].startswith("s3://") for row in rows)
    # Ray Train kept its checkpoints on the S3 server, under each training stage's own prefix.
    keys = [o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3_env.bucket, Prefix="e2e/root/")["Contents"]]
    for stage in ("train_vqvae", "train_classifier"):
        assert any(key.startswith(f"e2e/root/{stage}/") and "/ray_train/checkpoint_" in key for key in keys), stage
    assert any("/train_prior/" in key and "/top/ray_train/checkpoint_" in key for key in keys)
    assert not [key for key in keys if key.endswith("/lease.json")]  # every lease was released

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED"
    stages = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(stages) == sorted(STAGES)
    fingerprints = {row["stage"]: row["fingerprint"] for row in rows}
    for name, run in stages.items():
        assert run.info.status == "FINISHED" and run.data.tags["cached"] == "false", name
        assert run.data.tags["fingerprint"] == fingerprints[name] and run.data.tags["input.code"], name
        assert run.data.params, name  # the stage's flattened config
    headline = {"train_vqvae": "val_mse", "train_prior": "top_val_nll_bits", "sample": "acceptance_rate",
                "evaluate": "fid_classifier", "train_classifier": "val_top1", "encode": "val_recon_mse"}
    for stage, metric in headline.items():
        assert math.isfinite(stages[stage].data.metrics[metric]), (stage, metric)
    assert {"samples.png"} <= {a.path for a in client.list_artifacts(stages["sample"].info.run_id)}

    # A second invocation, here, finds every stage complete, says which run made it, and starts no Ray.
    again = run_pipeline(cfg)
    assert list(again) == STAGES and all(r.cached for r in again.values())
    assert {name: r.manifest["run_id"] for name, r in again.items()} == {n: r.info.run_id for n, r in stages.items()}
