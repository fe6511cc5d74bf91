"""The classifier stage (Ray Train, 2 workers) on a tiny synthetic corpus, and the in-memory trainer used by CAS."""

import pytest
import torch
from mlflow.tracking import MlflowClient
from ray.train import Checkpoint

from conftest import TINY_UPSTREAM, section_config
from models.classifier import ClassifierConfig
from pipeline import demo_data, training
from pipeline.checkpoints import load_model
from pipeline.config import ConfigError
from pipeline.runner import run_pipeline
from pipeline.train_classifier import (
    MODEL_FILE, classification_accuracy_score, evaluate_classifier, fit_classifier,
)

# The session's tiny pipeline: 8 classes x 24 train images at 64 a shard, 3 train shards; 8 x 4 val images,
# one val shard, so the second worker has no val shard of its own (its share of the validation sums is zero).
VAL_PER_CLASS, CLASSES = 4, 8


@pytest.mark.slow
def test_two_workers_train_the_classifier_above_chance(tiny_pipeline):
    result = run_pipeline(tiny_pipeline.config(), only="train_classifier")["train_classifier"]
    assert result.cached  # trained by the session fixture, reused here
    manifest = result.manifest
    steps = TINY_UPSTREAM["train_classifier"]["steps"]
    assert manifest["steps"] == steps and manifest["classes"] == sorted(demo_data.SYNTHETIC_CLASSES)
    assert manifest["metrics"]["val_images"] == CLASSES * VAL_PER_CLASS  # every val image, scored once
    val = manifest["val"]
    assert val["top1"] > 2 / CLASSES, val  # chance is 1/8
    assert val["top5"] >= val["top1"]

    model, extra = load_model(result.location / MODEL_FILE, "classifier")
    assert extra["step"] == steps and extra["image_size"] == 32 and extra["val"] == val
    # channels_last: true in the tiny config: the ranks trained NHWC weights (save_model builds the model file's
    # model anew, in the default layout, so the layout shows in the Ray Train checkpoint)
    trained = training.read_checkpoint_state(Checkpoint(manifest["checkpoint"]))["model"]
    convolutions = [w for w in trained.values() if w.dim() == 4]
    assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions)
    assert not all(w.is_contiguous() for w in convolutions)  # 1x1 kernels are both; the 3x3 ones only NHWC
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, CLASSES)

    client = MlflowClient(tiny_pipeline.tracking_uri)
    run = client.get_run(manifest["run_id"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == list(range(10, steps + 1, 10))
    top1 = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_top1")}
    assert sorted(top1) == [30, 60] and top1[60] == pytest.approx(val["top1"])
    for name in ("train_accuracy", "val_top5", "val_loss", "lr", "images_per_s", "wall_time_s"):
        assert name in run.data.metrics
    assert run.data.tags["model_uri"] == (result.location / MODEL_FILE).uri


def test_classifier_config_section(tmp_path):
    def config(**train_classifier):
        return section_config(tmp_path, train_classifier=train_classifier)

    cfg = config(model={"width": 8}, val_samples=100)
    assert cfg.train_classifier.model == {"width": 8} and cfg.train_classifier.val_samples == 100
    with pytest.raises(ConfigError, match="num_classes comes from the dataset"):
        config(model={"num_classes": 3})
    with pytest.raises(ConfigError, match="unknown model key"):
        config(model={"depth": 3})


def coloured_blobs(count: int, classes: int, seed: int):
    """uint8 images whose class sets the colour of a noisy square: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % classes
    palette = torch.tensor([[220, 40, 40], [40, 220, 40], [40, 40, 220], [220, 220, 40]], dtype=torch.float)
    images = torch.rand(count, 3, 16, 16, generator=g) * 80
    for i, label in enumerate(labels):
        y, x = torch.randint(0, 8, (2,), generator=g).tolist()
        images[i, :, y : y + 8, x : x + 8] = palette[label].view(3, 1, 1) + torch.randn(3, 8, 8, generator=g) * 10
    return images.clamp(0, 255).to(torch.uint8), labels


def test_in_memory_classifier_and_cas():
    train_images, train_labels = coloured_blobs(128, 4, seed=0)
    test_images, test_labels = coloured_blobs(64, 4, seed=1)
    small = ClassifierConfig(num_classes=4, width=8, stages=2, blocks_per_stage=1)
    model = fit_classifier(train_images, train_labels, 4, small, steps=40, batch_size=32, seed=3)
    scores = evaluate_classifier(model, test_images, test_labels)
    assert scores["top1"] > 0.9 and scores["top5"] == 1.0  # k capped at 4 classes
    # Deterministic for a seed; the CAS helper trains on one set and tests on the other.
    cas = classification_accuracy_score(train_images, train_labels, test_images, test_labels, 4, small,
                                        steps=40, batch_size=32, seed=3)
    assert cas == scores
    with pytest.raises(ValueError, match="labels must lie in"):
        fit_classifier(train_images, train_labels + 4, 4, small, steps=1)
