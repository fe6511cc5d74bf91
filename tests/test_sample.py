"""Sampling at scale on Ray: samples and grids written, rejection keeps its fraction, resume, reproducibility."""

import io

import numpy as np
import pytest
import torch
import webdataset as wds
from mlflow.tracking import MlflowClient
from PIL import Image

from models.sampling import sample_codes
from pipeline.checkpoints import load_model
from pipeline.codes import table_tensors
from pipeline.feature_nets import CLASSIFIER, load_feature_net
from pipeline.runner import run_pipeline
from pipeline.sample import batch_files, read_samples, sample_seed
from pipeline.storage import Location

CLASSES, PER_CLASS = 8, 3


def _priors(cfg):
    result = run_pipeline(cfg, only="train_prior")["train_prior"]
    return [load_model(result.location / result.manifest["levels"][name]["model"], "prior")[0] for name in ("top", "bottom")]


@pytest.mark.slow
def test_samples_grids_and_rejection(tiny_pipeline):
    cfg = tiny_pipeline.config()
    run_pipeline(cfg, only="train_prior")  # cached when test_train_prior ran first
    result = run_pipeline(cfg, only="sample")["sample"]
    manifest = result.manifest
    metrics = manifest["metrics"]
    assert metrics["samples"] == CLASSES * PER_CLASS
    # keep_fraction 0.5 of 3 samples per class keeps ceil(1.5) = 2 of each class.
    assert metrics["accepted"] == CLASSES * 2 and metrics["acceptance_rate"] == pytest.approx(2 / 3)

    table = read_samples(result.location, manifest["batches"], levels=2)
    assert len(set(table.column("key").to_pylist())) == CLASSES * PER_CLASS
    scores, labels = table.column("score").to_numpy(), table.column("label").to_numpy()
    assert manifest["sampled_labels"] == list(range(CLASSES))
    for label in range(CLASSES):
        lowest = manifest["lowest_accepted_scores"][str(label)]
        assert (scores[labels == label] >= lowest).sum() == 2
    # Each score is the classifier's on the PNG the tar holds (the decoder's output clamped and quantised),
    # not on the float image before it: rejection judges the sample that is kept.
    classifier = load_feature_net(CLASSIFIER, run_pipeline(cfg, only="train_classifier")["train_classifier"].location
                                  / "classifier.pt")
    score_of = dict(zip(table.column("key").to_pylist(), scores))
    images = 0
    for uri in manifest["images"]:
        for sample in wds.DataPipeline(wds.SimpleShardList([Location(uri).path]), wds.tarfile_to_samples()):
            png = Image.open(io.BytesIO(sample["png"]))
            assert png.size == (32, 32)
            pixels = torch.from_numpy(np.array(png)).permute(2, 0, 1)[None]
            label = int(sample["cls"])
            with torch.no_grad():
                rescored = classifier.logits(pixels).softmax(-1)[0, label].item()
            assert rescored == pytest.approx(score_of[sample["__key__"]], abs=1e-5), sample["__key__"]
            images += 1
    assert images == CLASSES * PER_CLASS

    # Any sample is reproduced alone from its seed and temperature.
    layout_levels = ["top", "bottom"]
    row = 5
    seed, label = table.column("seed")[row].as_py(), int(labels[row])
    assert seed == sample_seed(cfg.sample.seed, label, int(table.column("key")[row].as_py().rsplit("-", 1)[1]))
    again = sample_codes(_priors(cfg), torch.tensor([label]), [seed], table.column("temperature")[row].as_py())
    _, stored = table_tensors(table.slice(row, 1), _layout(manifest))
    for level, name in enumerate(layout_levels):
        assert torch.equal(again[level], stored[level].long()), name

    client = MlflowClient(tiny_pipeline.tracking_uri)
    run = client.get_run(manifest["run_id"])
    assert run.data.metrics["acceptance_rate"] == pytest.approx(2 / 3)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples.png", "rejection_accepted_vs_rejected.png"} <= artifacts


def _layout(manifest):
    from pipeline.codes import CodesLayout

    return CodesLayout(**manifest["layout"])


@pytest.mark.slow
def test_killed_actor_is_replaced_and_a_crash_resumes(tiny_pipeline, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv("VQ2_FAULT_INJECT", f"sample:1:0:{marker}")
    cfg = tiny_pipeline.config(sample={"seed": 3})
    run_pipeline(cfg, only="train_prior")
    result = run_pipeline(cfg, only="sample")["sample"]
    assert marker.exists()  # the actor sampling batch 1 died; a new one finished it
    assert result.manifest["metrics"]["samples"] == CLASSES * PER_CLASS

    # A crash after batch 0 and 2 were written: the rerun samples batch 1 only.
    monkeypatch.delenv("VQ2_FAULT_INJECT")
    _, lost = batch_files(result.location, 1)
    kept = {b: batch_files(result.location, b)[1] for b in (0, 2)}
    before = {b: kept[b].read_bytes() for b in kept}
    lost.remove()
    (result.location / "manifest.json").remove()
    again = run_pipeline(cfg, only="sample")["sample"]
    assert again.manifest["metrics"]["sampled_batches"] == 1
    assert {b: kept[b].read_bytes() for b in kept} == before
    table = read_samples(again.location, again.manifest["batches"], levels=2)
    assert len(table) == len(set(table.column("key").to_pylist())) == CLASSES * PER_CLASS
    assert np.isfinite(table.column("score").to_numpy()).all()


def test_classes_come_from_the_models_not_the_dataset():
    """Sampling draws the classes the classifier and priors were trained on (the dataset may have grown
    since, under policy.on_new_data=encode); models trained on different class sets are refused."""
    from types import SimpleNamespace

    from pipeline.config import SampleConfig
    from pipeline.sample import plan, trained_classes

    def ctx(prior_classes, names=None):
        levels = {name: {"prior_config": {"num_classes": prior_classes}} for name in ("top", "bottom")}
        prior = {"levels": levels} | ({"classes": names} if names else {})
        return SimpleNamespace(upstream={"train_classifier": SimpleNamespace(manifest={"classes": ["a", "b", "c"]}),
                                         "train_prior": SimpleNamespace(manifest=prior)})

    assert trained_classes(ctx(3)) == ["a", "b", "c"]  # priors trained before they kept class names
    assert trained_classes(ctx(0)) == ["a", "b", "c"]  # unconditional priors
    with pytest.raises(RuntimeError, match="the (top|bottom) prior knows 4 classes, the classifier 3"):
        trained_classes(ctx(4))
    with pytest.raises(ValueError, match=r"sample.classes \[3\] are not indices of the 3 classes the models"):
        plan(SampleConfig(classes=[3]), 3)


def test_a_prior_label_is_the_class_the_prior_was_trained_on_whatever_the_classifier_order():
    """Label i of the priors is class i of their training data. A classifier (registered, or trained on the same
    classes listed otherwise) that orders them differently gave label i its own class i's name, and the rejection
    scored that class: now the names are the priors', each scored at the classifier's column of that name."""
    from types import SimpleNamespace

    from pipeline.config import parse_config
    from pipeline.sample import score_columns, trained_classes

    priors = {"top": (3, ["cat", "dog", "fox"]), "bottom": (3, ["cat", "dog", "fox"])}
    classifier_order = ["dog", "fox", "cat"]
    stages = SimpleNamespace(upstream={})
    classes = trained_classes(stages, classifier_order, priors)
    assert classes == ["cat", "dog", "fox"]
    cfg = parse_config({"storage": {"root": "/r"}, "dataset": {"source": "/s"}}, "inline")
    assert score_columns(cfg, Location("/classifier.pt"), classifier_order, classes) == [2, 0, 1]
    # From the train_prior stage's manifest, the same.
    levels = {name: {"prior_config": {"num_classes": 3}} for name in ("top", "bottom")}
    stages = SimpleNamespace(upstream={"train_prior": SimpleNamespace(manifest={"levels": levels, "classes": classes}),
                                       "train_classifier": SimpleNamespace(manifest={"classes": classifier_order})})
    assert trained_classes(stages) == ["cat", "dog", "fox"]
    with pytest.raises(RuntimeError, match="the priors were trained on different classes"):
        trained_classes(stages, None, {"top": (3, ["cat", "dog", "fox"]), "bottom": (3, ["dog", "cat", "fox"])})


def test_rejection_keeps_its_fraction_exactly_whatever_the_ties():
    """A confident classifier's softmax reaches 1.0 for several samples: the keep fraction still keeps
    exactly its count of each class (the earlier row first); NaN scores rank last; a threshold applies on top."""
    from pipeline.config import RejectionConfig
    from pipeline.sample import accept

    scores = np.array([1.0, 1.0, 1.0, 0.909, np.nan, np.nan, 0.9, 0.8], dtype=np.float32)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    accepted, lowest = accept(scores, labels, RejectionConfig(keep_fraction=0.5))
    assert accepted.tolist() == [True, True, False, False, False, False, True, True]
    assert lowest == {0: 1.0, 1: pytest.approx(0.8)}
    accepted, lowest = accept(scores, labels, RejectionConfig(keep_fraction=0.5, threshold=0.85))
    assert accepted.tolist() == [True, True, False, False, False, False, True, False]
    accepted, lowest = accept(scores, labels, RejectionConfig(threshold=0.95))
    assert accepted.tolist() == [True, True, True, False, False, False, False, False] and lowest[1] is None


def test_rejection_scores_each_class_at_the_column_of_its_name(tmp_path):
    """A classifier file orders its classes its own way: each sampled class is scored at the output column of
    its name, and a classifier that lacks a class of the priors is refused. EfficientNet-Lite0 scores a class at its
    ImageNet-1k index (the sorted WordNet ids), and refuses classes not named by a WordNet id."""
    from conftest import section_config
    from models.classifier import ResNetClassifier, classifier_tiny
    from pipeline.checkpoints import save_model
    from pipeline.feature_nets import EFFICIENTNET_LITE0, IMAGENET_WNIDS
    from pipeline.sample import Scorer, rejection_classifier, score_columns

    torch.manual_seed(0)
    model = ResNetClassifier(classifier_tiny(3)).eval()
    path = tmp_path / "classifier.pt"
    save_model(Location(str(path)), "classifier", model, classes=["c", "a", "b"])
    cfg = section_config(tmp_path, sample={"rejection": {"classifier": str(path)}})
    classifier = rejection_classifier(cfg, ctx=None)
    columns = score_columns(cfg, classifier, ["c", "a", "b"], classes=["a", "b"])
    assert columns == [1, 2]
    images, labels = torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 1, 0])
    expected = model(images).softmax(-1)[torch.arange(4), torch.tensor([1, 2, 2, 1])]
    assert torch.allclose(Scorer(classifier, columns, torch.device("cpu"))(images, labels), expected, atol=1e-6)
    with pytest.raises(ValueError, match="was not trained on 1 of the 2 classes the priors were trained on, first 'z'"):
        score_columns(cfg, classifier, ["c", "a", "b"], classes=["a", "z"])

    wnids = IMAGENET_WNIDS.read_text().split()
    assert len(set(wnids)) == 1000 and wnids == sorted(wnids) and wnids[1] == "n01443537"  # 1: goldfish
    cfg = section_config(tmp_path, sample={"rejection": {"classifier": EFFICIENTNET_LITE0}})
    assert rejection_classifier(cfg, ctx=None) == EFFICIENTNET_LITE0
    assert score_columns(cfg, EFFICIENTNET_LITE0, None, ["n01443537", "n01440764", "n15075141"]) == [1, 0, 999]
    with pytest.raises(ValueError, match="efficientnet_lite0 scores ImageNet-1k classes, but 2 of the 3 classes are "
                                         "not ImageNet-1k classes named by WordNet id .*, first '0', 'cat'"):
        score_columns(cfg, EFFICIENTNET_LITE0, None, ["0", "n01440764", "cat"])


def test_a_classifier_file_enters_the_fingerprint_by_content_and_code(tmp_path):
    """A classifier given by path: its bytes are an input (overwriting the file samples again), and so is
    the code of its kind, which no training stage's fingerprint carries here; a missing file names the key."""
    from conftest import section_config
    from pipeline import code_digest
    from pipeline.sample import external_inputs

    path = tmp_path / "my_classifier.pt"
    path.write_bytes(b"weights v1")
    cfg = section_config(tmp_path, sample={"rejection": {"classifier": str(path)}})
    first, _ = external_inputs(cfg)
    path.write_bytes(b"weights v2")
    second, _ = external_inputs(cfg)
    assert first["classifier_file"] != second["classifier_file"]
    assert first["code.classifier"] == code_digest.code_digest("models.classifier")
    assert external_inputs(section_config(tmp_path))[0] == {}  # the pipeline's own classifier: its stage's fingerprint
    with pytest.raises(FileNotFoundError, match="sample.rejection.classifier: no file at"):
        external_inputs(section_config(tmp_path, sample={"rejection": {"classifier": str(tmp_path / "none.pt")}}))
