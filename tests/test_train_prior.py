"""Stage 2 with Ray Train: the top and bottom priors learn, are tracked, and resume after a worker dies."""

import math

import pytest
from mlflow.tracking import MlflowClient

from conftest import section_config
from pipeline.checkpoints import load_model
from pipeline.config import ConfigError
from pipeline.runner import run_pipeline


@pytest.mark.slow
def test_priors_learn_below_the_uniform_baseline(tiny_pipeline):
    cfg = tiny_pipeline.config()
    result = run_pipeline(cfg, only="train_prior")["train_prior"]
    manifest = result.manifest
    uniform = math.log2(64)  # the tiny codebooks
    for level in ("top", "bottom"):
        assert manifest["nll_bits"][f"{level}_val_nll_bits"] < uniform - 0.3, manifest["nll_bits"]
        assert manifest["nll_bits"][f"{level}_train_nll_bits"] < uniform - 0.3
    assert manifest["levels"]["top"]["steps"] == 30

    top, _ = load_model(result.location / manifest["levels"]["top"]["model"], "prior")
    bottom, extra = load_model(result.location / manifest["levels"]["bottom"]["model"], "prior")
    assert top.cfg.grid == (4, 4) and top.cfg.num_classes == 8 and len(top.attention) > 0
    assert bottom.cfg.grid == (8, 8) and bottom.cfg.condition_grids == ((4, 4),)
    assert extra["level"] == "bottom"

    client = MlflowClient(tiny_pipeline.tracking_uri)
    run = client.get_run(manifest["run_id"])
    for name in ("top_val_nll_bits", "top_train_nll_bits", "bottom_val_nll_bits", "top_train_loss_bits",
                 "bottom_images_per_s"):
        assert name in run.data.metrics
    grids = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/top_step_0000015.png", "samples/bottom_step_0000030.png"} <= grids


@pytest.mark.slow
def test_a_rerun_keeps_a_finished_level_and_a_killed_worker_resumes_from_its_checkpoint(
        tiny_pipeline, tmp_path, monkeypatch):
    from pipeline.runner import pipeline_status
    from pipeline.storage import Location
    from pipeline.train_prior import MODEL_FILE

    cfg = tiny_pipeline.config(train_prior={"seed": 7, "steps": 20, "max_failures": 1, "sample_grid": 0})
    # A crashed run that had finished the top level left its model file; here it is the session's top
    # prior (30 steps), copied in to spare a fit: the stage keeps a finished level whatever made it.
    session = run_pipeline(tiny_pipeline.config(), only="train_prior")["train_prior"]
    output = Location(next(row["output"] for row in pipeline_status(cfg) if row["stage"] == "train_prior"))
    (output / "top" / MODEL_FILE).write_bytes((session.location / session.manifest["levels"]["top"]["model"]).read_bytes())

    marker = tmp_path / "killed"
    monkeypatch.setenv("VQ2_FAULT_INJECT", f"train_prior.bottom:15:1:{marker}")
    manifest = run_pipeline(cfg, only="train_prior")["train_prior"].manifest
    assert manifest["levels"]["top"]["steps"] == 30  # kept, not trained again for this config's 20 steps
    assert marker.exists()
    assert manifest["levels"]["top"]["metrics"]["resumed_from"] == 0
    assert manifest["levels"]["bottom"]["metrics"]["resumed_from"] == 10
    assert manifest["levels"]["bottom"]["steps"] == 20


def test_derived_prior_settings_are_not_configurable(tmp_path):
    def config(models):
        return section_config(tmp_path, train_prior={"models": models})

    with pytest.raises(ConfigError, match="train_prior.models: .*grid.* come from the code tables"):
        config({"top": {"grid": [8, 8]}})
    with pytest.raises(ConfigError, match="unknown model key"):
        config({"bottom": {"layers": 3}})
