"""The evaluate stage: config checks, the FID route for few samples, rejection masks, and end to end on Ray."""

import math

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import section_config
from pipeline.config import ConfigError, EvaluateConfig
from pipeline.evaluate import PLOT, SUMMARY, external_inputs, frechet, inception_weights, keep_mask
from pipeline.metrics import fid

NETS = ("inception_v3", "efficientnet_lite0", "classifier")


def _config(tmp_path, **evaluate):
    return section_config(tmp_path, evaluate=evaluate)


def test_config_defaults_and_validation(tmp_path):
    cfg = _config(tmp_path)
    assert cfg.evaluate == EvaluateConfig()
    assert list(cfg.evaluate.feature_nets) == list(NETS) and cfg.evaluate.k == 3
    with pytest.raises(ConfigError, match="evaluate.feature_nets"):
        _config(tmp_path, feature_nets=["resnet50"])
    with pytest.raises(ConfigError, match="sweep values"):
        _config(tmp_path, sweep=[1.0, 0.0])
    with pytest.raises(ConfigError, match="evaluate.unknown"):
        _config(tmp_path, unknown=1)
    assert _config(tmp_path, sweep_by="threshold", sweep=[0.0, 0.5]).evaluate.sweep == [0.0, 0.5]


def test_missing_inception_weights_is_a_clear_error(tmp_path):
    cfg = _config(tmp_path, inception_weights="weights/fid.pt")
    assert cfg.evaluate.inception_weights.startswith("/")  # made absolute, like every local path of the config
    with pytest.raises(FileNotFoundError, match="evaluate.inception_weights: no file at"):
        inception_weights(cfg)
    with pytest.raises(FileNotFoundError, match="evaluate.inception_weights"):
        external_inputs(cfg)
    # Not used when the Inception net is not configured; present weights are fingerprinted by content.
    assert inception_weights(_config(tmp_path, inception_weights="missing.pt", feature_nets=["classifier"])) is None
    weights = tmp_path / "fid.pt"
    weights.write_bytes(b"weights")
    fingerprints, _ = external_inputs(_config(tmp_path, inception_weights=str(weights)))
    assert set(fingerprints) == {"inception_weights"}


@pytest.mark.parametrize("n1, n2, dims", [(8, 12, 64), (30, 5, 40), (50, 60, 16)])
def test_low_rank_fid_matches_sqrtm(n1, n2, dims):
    rng = np.random.default_rng(n1 + n2)
    a = rng.normal(size=(n1, dims))
    b = rng.normal(loc=0.3, size=(n2, dims)) @ rng.normal(size=(dims, dims)) * 0.5
    assert frechet(a, b) == pytest.approx(fid(a, b), rel=1e-6, abs=1e-8)
    assert frechet(a, a) == pytest.approx(0.0, abs=1e-8)


def test_keep_mask_per_class_and_threshold():
    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.3])
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert keep_mask(scores, labels, "keep_fraction", 1.0).all()
    assert keep_mask(scores, labels, "keep_fraction", 0.5).tolist() == [True, False, True, True, False, True]
    assert keep_mask(scores, labels, "keep_fraction", 0.01).sum() == 2  # at least one per class
    assert keep_mask(scores, labels, "threshold", 0.5).tolist() == [True, False, True, True, False, False]


SWEEP = [1.0, 0.5, 0.25]
TINY_EVALUATE = {"max_real_images": None, "batch_size": 16, "sweep": SWEEP, "is_splits": 2,
                 "cas_steps": 15, "cas_batch_size": 16, "num_actors": 2}


@pytest.mark.slow
def test_evaluate_end_to_end(tiny_pipeline, tmp_path):
    from pipeline.runner import run_pipeline

    cfg = tiny_pipeline.config(evaluate=TINY_EVALUATE)
    run_pipeline(cfg, only="train_prior")
    run_pipeline(cfg, only="sample")
    # A configured weights file that is missing fails before any work, naming the key (the runner may wrap it).
    with pytest.raises(Exception, match="evaluate.inception_weights: no file at") as failure:
        run_pipeline(tiny_pipeline.config(evaluate=TINY_EVALUATE | {"inception_weights": str(tmp_path / "no.pt")}),
                     only="evaluate")
    assert isinstance(failure.value, FileNotFoundError) or isinstance(failure.value.__cause__, FileNotFoundError)
    result = run_pipeline(cfg, only="evaluate")["evaluate"]
    manifest = result.manifest
    metrics = manifest["metrics"]
    expected = {"real_images", "samples", "accepted_samples", "recon_mse", "vqvae_val_mse",
                "top_train_nll_bits", "top_val_nll_bits", "bottom_train_nll_bits", "bottom_val_nll_bits",
                "classifier_val_top1", "classifier_val_top5", "cas_top1", "cas_top5", "cas_real_top1", "cas_real_top5"}
    for net in NETS:
        expected |= {f"fid_{net}", f"fid_star_{net}", f"fid_recon_{net}", f"precision_{net}", f"recall_{net}"}
    expected |= {"is_efficientnet_lite0", "is_classifier", "is_real_efficientnet_lite0", "is_real_classifier"}
    assert expected <= set(metrics), expected - set(metrics)
    assert manifest["not_computed"] == []
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["real_images"] == 32 and metrics["samples"] == 24 and metrics["accepted_samples"] == 16
    assert 0 <= metrics["precision_inception_v3"] <= 1 and 0 <= metrics["cas_top1"] <= metrics["cas_top5"] <= 1

    sweep = manifest["sweep"]
    assert [p["keep_fraction"] for p in sweep] == SWEEP and [p["samples"] for p in sweep] == [24, 16, 8]
    for point in sweep:
        assert all(point[k] is not None and math.isfinite(point[k]) for k in point)
    # Keeping fewer samples changes the numbers.
    assert sweep[0]["fid_inception_v3"] != sweep[2]["fid_inception_v3"]
    assert sweep[0]["is_classifier"] != sweep[2]["is_classifier"]
    # The sweep point with the sample stage's own keep fraction (0.5) is the headline set.
    assert sweep[1]["fid_inception_v3"] == pytest.approx(metrics["fid_inception_v3"])

    assert (result.location / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (result.location / SUMMARY).read_json()
    assert summary["metrics"] == metrics and len(summary["sweep"]) == len(SWEEP)

    client = MlflowClient(tiny_pipeline.tracking_uri)
    run = client.get_run(manifest["run_id"])
    for name in expected:
        assert run.data.metrics[name] == pytest.approx(metrics[name]), name
    history = client.get_metric_history(run.info.run_id, "sweep_fid_inception_v3")
    assert sorted(m.step for m in history) == list(range(len(SWEEP)))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {PLOT, SUMMARY, "manifest.json"} <= artifacts


def test_real_images_are_those_of_the_sampled_classes(tiny_pipeline):
    """A dataset grown under policy.on_new_data=encode may have classes the models never saw: the real
    images for FID and CAS are those of the first `num_classes` (the sampled) classes only."""
    import torch

    from pipeline.dataset import Dataset
    from pipeline.evaluate import _load, plan_real
    from pipeline.runner import run_pipeline

    results = run_pipeline(tiny_pipeline.config(), only="encode")
    dataset = Dataset.open(results["shard"].location)
    section = EvaluateConfig(max_real_images=None, batch_size=5)
    every = plan_real(dataset, results["encode"], section, None, None, num_classes=len(dataset.classes))
    known = plan_real(dataset, results["encode"], section, None, None, num_classes=3)
    label_of = {name: index for index, name in enumerate(dataset.classes)}
    keys = [key for task in known for key in task["keys"]]
    assert {label_of[key.split("/")[0]] for key in keys} == {0, 1, 2}
    assert len(keys) == sum(label_of[key.split("/")[0]] < 3 for task in every for key in task["keys"])
    assert all(len(task["keys"]) <= 5 for task in known)

    images, labels = _load([{"uri": task["shard"], "keys": task["keys"]} for task in every], None, None, 3)
    assert len(images) == len(labels) == len(keys) and int(labels.max()) == 2
    assert images.dtype == torch.uint8


def test_only_the_sampled_classes_are_compared(caplog):
    """A dataset grown under policy.on_new_data=encode with a new class: evaluate warns and compares the
    sampled (first) classes; a sample of classes the dataset orders differently is refused."""
    from pipeline.dataset import Dataset
    from pipeline.evaluate import sampled_classes
    from pipeline.storage import Location

    grown = Dataset(Location("/nowhere/shard/abc"), {"classes": ["a", "b", "c", "new"]})
    assert sampled_classes(grown, ["a", "b", "c"]) == 3
    assert "real images of the new classes ['new'] are left out" in caplog.text
    with pytest.raises(RuntimeError, match="the sampled classes are not the first 2 classes of dataset"):
        sampled_classes(grown, ["b", "a"])
