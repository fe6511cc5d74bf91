"""The whole pipeline as two overlapping jobs submitted to a real Ray head, on the real S3 server with a real
MLflow server, read back through MLflow, then found complete by a third invocation."""

import math
import re
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.job_submission import JobStatus, JobSubmissionClient

from conftest import BIN, alarming_lines
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
    # test_evaluate.py covers the Inception and EfficientNet features and CAS; the classifier's features are fast.
    "evaluate.feature_nets=[classifier]", "evaluate.max_real_images=16", "evaluate.sweep=[1.0,0.5]",
    "evaluate.cas_steps=0",
]


@pytest.mark.slow
def test_two_jobs_submitted_at_once_to_a_ray_head_run_the_whole_pipeline_once(ray_head, s3_env, mlflow_server):
    """A nightly job overlapping a manual one on the same cluster: both succeed, each stage is run by one of them
    while the other waits for its manifest, and there is one set of outputs."""
    address, temp = ray_head
    corpus = Location(s3_env.uri("e2e/corpus"))
    demo_data.synthetic(corpus, 12, 4, size=(32, 32), classes=4, with_bad_files=True)
    overrides = [f"storage.root={s3_env.uri('e2e/root')}", f"dataset.source={corpus.uri}",
                 f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=e2e", "storage.lease_poll_s=0.5",
                 *TINY_JOB]
    job_ids = ["vq2-e2e-nightly", "vq2-e2e-manual"]
    for job_id in job_ids:
        submitted = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--no-wait", "--address", address, "--submission-id", job_id,
             "--working-dir", ".", "--", "python", "-m", "jobs.submit", "--config", "configs/tiny.yaml", *overrides],
            cwd=REPO, capture_output=True, text=True, timeout=300)
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    jobs = JobSubmissionClient(address)
    deadline = time.monotonic() + 1200
    while not all(jobs.get_job_status(job_id).is_terminal() for job_id in job_ids):
        assert time.monotonic() < deadline, "the jobs did not end in 20 minutes"
        time.sleep(1)
    logs = [jobs.get_job_logs(job_id) for job_id in job_ids]
    for job_id, text in zip(job_ids, logs):
        assert jobs.get_job_status(job_id) == JobStatus.SUCCEEDED, text[-5000:]
        assert not alarming_lines(text), "\n\n".join(alarming_lines(text))  # a string: pytest cuts a list's repr
    # Each job checked the cluster for the stages still to make when it started: all of them for the first,
    # the rest for a job that starts after the other one has made the first stages.
    preflights = [re.search(r"preflight: the cluster is ready for (.+?) \(", text) for text in logs]
    assert all(preflights), "a job ran no preflight"
    checked = [match.group(1).split(", ") for match in preflights]
    assert STAGES in checked and all(stages == STAGES[len(STAGES) - len(stages):] for stages in checked), checked

    # The working directory went up without the venv, the git folder or local outputs.
    (package,) = [p for p in (temp / "session_latest/runtime_resources/working_dir_files").iterdir() if p.is_dir()]
    assert (package / "jobs/submit.py").is_file()
    assert not {".venv", ".git", "runs", "data"} & {entry.name for entry in package.iterdir()}

    cfg = load_config(REPO / "configs/tiny.yaml", overrides)
    rows = pipeline_status(cfg)
    assert [row["state"] for row in rows] == ["complete"] * len(STAGES)
    assert all(row["output"].startswith("s3://") for row in rows)
    root = Location(cfg.storage.root)
    for row in rows:  # one set of outputs, made by one job while the other waited for it
        assert (root / row["stage"]).list_folders() == [row["fingerprint"]], row["stage"]
        made = [text.count(f"{row['stage']}: running into") for text in logs]
        assert sorted(made) == [0, 1], (row["stage"], made)
        assert all(f"{row['stage']}: {'done' if count else 'cached'} {row['output']}" in text
                   for count, text in zip(made, logs))
    # Ray Train kept its checkpoints on the S3 server, under each training stage's own prefix.
    keys = [o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3_env.bucket, Prefix="e2e/root/")["Contents"]]
    for stage in ("train_vqvae", "train_classifier", "train_prior"):
        assert any(key.startswith(f"e2e/root/{stage}/") and "/ray_train/checkpoint_" in key for key in keys), stage
    assert not [key for key in keys if key.endswith("/lease.json")]  # every lease was released

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert {run.info.status for run in runs} == {"FINISHED"} and len(runs) == 2 * (1 + len(STAGES))
    parents = {r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert len(parents) == 2
    stages = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("cached") == "false"}  # the runs that made
    assert sorted(stages) == sorted(STAGES) and {r.data.tags["mlflow.parentRunId"] for r in stages.values()} <= parents
    fingerprints = {row["stage"]: row["fingerprint"] for row in rows}
    for name, run in stages.items():
        assert run.data.tags["fingerprint"] == fingerprints[name] and run.data.tags["input.code"], name
        assert run.data.params, name  # the stage's flattened config
    headline = {"train_vqvae": "val_mse", "train_prior": "top_val_nll_bits", "sample": "acceptance_rate",
                "evaluate": "fid_classifier", "train_classifier": "val_top1", "encode": "val_recon_mse"}
    for stage, metric in headline.items():
        assert math.isfinite(stages[stage].data.metrics[metric]), (stage, metric)
    assert {"samples.png"} <= {a.path for a in client.list_artifacts(stages["sample"].info.run_id)}

    # A third invocation, here, finds every stage complete, says which run made it, and starts no Ray.
    again = run_pipeline(cfg)
    assert list(again) == STAGES and all(r.cached for r in again.values())
    assert {name: r.manifest["run_id"] for name, r in again.items()} == {n: r.info.run_id for n, r in stages.items()}
