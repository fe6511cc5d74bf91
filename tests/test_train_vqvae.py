"""Stage 1 with Ray Train: 2-worker DDP on the shards, checkpoints, tracking, bad configs (a crashed stage resumed
by a rerun: test_operations.py)."""

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import demo_data
from pipeline.checkpoints import load_model
from pipeline.config import parse_config
from pipeline.runner import StageFailed, run_pipeline
from pipeline.storage import Location
from pipeline.train_vqvae import MODEL_FILE


@pytest.mark.slow
def test_two_workers_train_checkpoint_and_track(tiny_pipeline):
    # The session's tiny pipeline trained this VQ-VAE: 2 workers on 3 train shards, 40 steps.
    results = run_pipeline(tiny_pipeline.config(), only="train_vqvae")
    assert results["train_vqvae"].cached  # a rerun reuses it
    assert len(results["shard"].location.list_files()) > 0
    manifest = results["train_vqvae"].manifest
    assert manifest["steps"] == 40 and manifest["grids"] == [[4, 4], [8, 8]]
    assert manifest["metrics"]["codebook_rank_divergence"] == 0.0  # both ranks hold the same codebooks

    model, extra = load_model(results["train_vqvae"].location / MODEL_FILE, "vqvae")
    assert extra["step"] == 40
    codes = model.encode(torch.zeros(2, 3, 32, 32))
    assert [tuple(c.shape) for c in codes] == [(2, 4, 4), (2, 8, 8)]

    client = MlflowClient(tiny_pipeline.tracking_uri)
    run = client.get_run(manifest["run_id"])
    assert len(client.get_metric_history(run.info.run_id, "recon_loss")) == 4  # every log_every steps
    val = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_mse")}
    assert sorted(val) == [0, 20, 40] and val[40] < 0.9 * val[0], val  # it learns
    for name in ("perplexity_level0", "perplexity_level1", "codes_in_use_level1", "images_per_s", "val_mse", "lr"):
        assert name in run.data.metrics
    assert run.data.tags["checkpoint"] == manifest["checkpoint"]
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "reconstructions")]
    assert grids == [f"reconstructions/step_{step:07d}.png" for step in (0, 20, 40)]


def test_bad_configs_fail_fast(ray_local, tmp_path):
    corpus = Location(str(tmp_path / "corpus"))
    demo_data.synthetic(corpus, 24, 4, size=(32, 32))
    cfg = parse_config({
        "storage": {"root": str(tmp_path / "root")},
        "dataset": {"source": corpus.uri, "image_size": 32, "shard_size": 64},
        "ray": {"num_workers": 2},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "train-vqvae-tests",
                   "request_retries": 0},
        "train_vqvae": {"num_workers": 8, "batch_size": 16, "steps": 30, "lr": 3e-3, "checkpoint_every": 10,
                        "validate_every": 15, "log_every": 5, "loader_workers": 1, "shuffle_buffer": 64,
                        "val_samples": 32},
    }, "test.yaml")
    with pytest.raises(RuntimeError, match="shard output .* is not complete"):
        run_pipeline(cfg, only="train_vqvae")  # no dataset yet
    run_pipeline(cfg, only="shard")
    with pytest.raises(StageFailed, match=r"train_vqvae.num_workers=8 .* needs 8 CPUs; the Ray cluster has 2"):
        run_pipeline(cfg, only="train_vqvae")
