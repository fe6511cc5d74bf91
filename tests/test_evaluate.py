"""The evaluate stage: config checks, the FID route for few samples, rejection masks, and end to end on Ray."""

import math

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import section_config
from pipeline.config import ConfigError, EvaluateConfig
from pipeline.evaluate import (PLOT, SUMMARY, Features, external_inputs, frechet, headline_lines, inception_weights,
                               keep_mask, real_inception_score)
from pipeline.metrics import fid, inception_score

NETS = ("inception_v3", "efficientnet_lite0", "classifier")


def _config(tmp_path, **evaluate):
    return section_config(tmp_path, evaluate=evaluate)



def test_the_real_images_inception_score_is_taken_at_the_samples_count():
    # The score falls with the count: samples drawn from the very distribution of the real images scored far
    # below the real images' score over the whole split, from the count alone.
    rng = np.random.default_rng(0)

    def confident(n):  # one-hot-like logits over 10 equally likely classes
        labels = rng.integers(0, 10, n)
        return Features(np.arange(n).astype(str).astype(object), labels, np.zeros((n, 1), np.float32),
                        np.eye(10, dtype=np.float32)[labels] * 20)

    real, samples = confident(2000), confident(40)
    section = EvaluateConfig()
    sample_score = inception_score(samples.logits, section.is_splits)[0]
    whole_split = inception_score(real.logits, section.is_splits)[0]
    score, count = real_inception_score(real, len(samples), section)
    assert count == 40 and abs(score - sample_score) < 1.0 < whole_split - sample_score
    assert real_inception_score(real, 0, section) == (whole_split, 2000)  # no samples: the whole split

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
    # A configured digest is checked before any work, against the configured file or the packaged one.
    wrong = "0" * 64
    with pytest.raises(ValueError, match=f"evaluate.inception_sha256: .*fid.pt has sha256 .*, expected {wrong}"):
        external_inputs(_config(tmp_path, inception_weights=str(weights), inception_sha256=wrong))
    with pytest.raises(ValueError, match="default_1.pt has sha256"):
        external_inputs(_config(tmp_path, inception_sha256=wrong))
    with pytest.raises(ConfigError, match="evaluate.inception_sha256"):
        _config(tmp_path, inception_sha256="not-a-digest")


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


def test_the_sweep_compares_equal_counts_of_each_class():
    """FID grows as the count falls: every keep fraction is subsampled to the same count of each class,
    the fewest any fraction keeps, so the sweep measures the rejection and not the count."""
    from pipeline.evaluate import equal_count_selections

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    scores = rng.uniform(size=60)
    values = [1.0, 0.75, 0.5, 0.25]
    selections = equal_count_selections(scores, labels, "keep_fraction", values, seed=1)
    assert [len(rows) for rows in selections] == [15, 15, 15, 15]  # ceil(0.25 * 20) = 5 of each class
    for rows, value in zip(selections, values):
        assert np.bincount(labels[rows]).tolist() == [5, 5, 5]
        assert keep_mask(scores, labels, "keep_fraction", value)[rows].all()  # only rows that value keeps
    assert selections[3].tolist() == np.flatnonzero(keep_mask(scores, labels, "keep_fraction", 0.25)).tolist()
    # Thresholds keep different counts of each class: each point gets the fewest of each class.
    by_threshold = equal_count_selections(scores, labels, "threshold", [0.0, 0.5], seed=1)
    fewest = [int(((scores >= 0.5) & (labels == c)).sum()) for c in range(3)]
    assert [np.bincount(labels[rows], minlength=3).tolist() for rows in by_threshold] == [fewest, fewest]


def _features(rng, n, dim, shift=0.0, classes=4):
    from pipeline.evaluate import Features

    labels = np.arange(n) % classes
    logits = np.eye(classes)[labels] * 5 + rng.normal(size=(n, classes))
    return Features(np.array([f"k{i:05d}" for i in range(n)], dtype=object), labels,
                    rng.normal(loc=shift, size=(n, dim)), logits)


def _classifier_sets(rng, dim: int, real: int, train: int):
    """One net's real val set, the floors' training set and the reconstructions of both; their Floors; the section."""
    from pipeline.evaluate import Floors

    section = EvaluateConfig(k=3, is_splits=1, seed=0)
    sets = {"real": {"classifier": _features(rng, real, dim)}, "recon": {"classifier": _features(rng, real, dim, 0.2)},
            "train": {"classifier": _features(rng, train, dim)},
            "train_recon": {"classifier": _features(rng, train, dim, 0.2)}}
    return sets, Floors(sets, section), section


def test_each_metric_carries_its_counts_dimension_validity_and_floor():
    from pipeline.evaluate import sample_metrics, validity_notes

    rng, dim = np.random.default_rng(1), 16
    sets, floors, section = _classifier_sets(rng, dim, real=200, train=300)
    good = sample_metrics(_features(rng, 100, dim), "classifier", sets, floors, section)
    bad = sample_metrics(_features(rng, 100, dim, shift=1.0), "classifier", sets, floors, section)
    few = sample_metrics(_features(rng, 10, dim), "classifier", sets, floors, section)
    for name in ("fid_classifier", "fid_star_classifier", "precision_classifier", "recall_classifier"):
        assert (good[f"{name}_n"], good[f"{name}_ref_n"], good[f"{name}_dim"]) == (100, 200, dim)
        assert good[f"{name}_reliable"] == 1.0 and few[f"{name}_reliable"] == 0.0
    # The floor: real training images against the real ones, at the samples' count (and cached per count).
    assert good["fid_classifier_floor"] == bad["fid_classifier_floor"] == floors.fid("classifier", 100)
    assert good["fid_classifier_floor"] == pytest.approx(
        frechet(sets["train"]["classifier"].subsample(100, 5).features, sets["real"]["classifier"].features))
    assert good["fid_classifier"] < 2 * good["fid_classifier_floor"] < bad["fid_classifier"]
    assert few["fid_classifier_floor"] > good["fid_classifier_floor"]  # the floor rises as the count falls
    # FID*'s floor is between reconstructions, as FID* is: the training images' against the real ones'. Real
    # training images against the reconstructions would count the decoder's loss, which FID* leaves out (the
    # old code gave FID*, computed against reconstructions, FID's floor between real images).
    assert good["fid_star_classifier_floor"] == floors.fid_star("classifier", 100) == pytest.approx(
        frechet(sets["train_recon"]["classifier"].subsample(100, 5).features, sets["recon"]["classifier"].features))
    assert good["fid_star_classifier_floor"] != good["fid_classifier_floor"]
    assert good["sample_accuracy"] > 0.9 and good["is_classifier_n"] == 100

    metrics = {k: v for k, v in (few | {"real_images": 200}).items() if v is not None}
    notes = validity_notes(metrics, ["inception_v3", "classifier"], inception_has_logits=False)
    assert any("UNRELIABLE" in n and "fid_classifier (10 vs 200 images, 16-d)" in n for n in notes)
    assert any("Inception Score is not on the Inception network" in n and "is_* are on classifier" in n for n in notes)
    assert validity_notes({k: v for k, v in good.items() if v is not None}, ["classifier"], False) == []


def test_one_real_image_leaves_the_fids_not_computed_instead_of_failing():
    """Sampling a few classes of a small val split can leave one real image of them (the paper-scale run's 20
    photos did): every FID and its floor need two per set, so they are not computed, and the rest still is."""
    from pipeline.evaluate import fid_metrics, sample_metrics

    rng, dim = np.random.default_rng(2), 16
    sets, floors, section = _classifier_sets(rng, dim, real=1, train=30)
    metrics = sample_metrics(_features(rng, 20, dim), "classifier", sets, floors, section)
    assert metrics["fid_classifier"] is None and metrics["fid_star_classifier"] is None
    assert metrics["precision_classifier"] is None and metrics["is_classifier_n"] == 20
    assert floors.fid("classifier", 20) is None
    assert fid_metrics("fid_recon_classifier", sets["real"]["classifier"], sets["recon"]["classifier"], None) == {}


def _parts(sets: dict) -> dict:
    """{set: {net: Features}} as the feature pool's parts, in two pieces each (what merged_sets merges)."""
    parts = {}
    for set_name, by_net in sets.items():
        for net, f in by_net.items():
            halves = [np.arange(len(f))[::-1][i::2] for i in range(2)]  # out of key order, as the pool returns them
            parts[(set_name, net)] = {"keys": [f.keys[h] for h in halves], "labels": [f.labels[h] for h in halves],
                                      "features": [f.features[h] for h in halves], "logits": [f.logits[h] for h in halves]}
    return parts


def test_a_set_without_images_leaves_what_it_takes_part_in_not_computed():
    """Sampled classes with no training images (a class only the val split has) give the floors' sets no
    image at all: the floors are not computed, every other metric is (was: KeyError on the missing set)."""
    from pipeline.evaluate import Floors, merged_sets, sample_metrics

    rng, dim = np.random.default_rng(3), 16
    sets, _, section = _classifier_sets(rng, dim, real=40, train=40)
    merged = merged_sets(_parts({name: sets[name] for name in ("real", "recon")}), ["classifier"])
    assert list(merged["real"]["classifier"].keys) == sorted(sets["real"]["classifier"].keys)
    assert np.array_equal(merged["real"]["classifier"].features, sets["real"]["classifier"].features)
    assert len(merged["train"]["classifier"]) == len(merged["samples"]["classifier"]) == 0
    metrics = sample_metrics(_features(rng, 30, dim), "classifier", merged, Floors(merged, section), section)
    for name in ("fid_classifier", "fid_star_classifier", "precision_classifier", "recall_classifier"):
        assert metrics[name] > 0 and metrics[f"{name}_n"] == 30 and f"{name}_floor" not in metrics


def test_cas_takes_the_models_classes_and_runs_without_real_training_images(ray_local, tmp_path):
    """The pipeline classifier may know more classes than the priors (retrained on a grown dataset, the priors
    registered before): CAS's classifiers have an output for each of the models' classes. With no training
    image of the sampled classes, CAS on the samples is measured and its real-data reference is not computed
    (was: ValueError on 4 classes against 3, then on a task with no images)."""
    import io
    from types import SimpleNamespace

    import webdataset as wds
    from PIL import Image

    from pipeline.evaluate import run_cas
    from pipeline.storage import Location

    path, keys = tmp_path / "samples.tar", []
    with wds.TarWriter(str(path)) as writer:
        for i in range(12):
            png = io.BytesIO()
            Image.new("RGB", (16, 16), (80 * (i % 3), 40, 200 - 60 * (i % 3))).save(png, "PNG")
            keys.append(f"c{i % 3}/sample-{i:03d}")
            writer.write({"__key__": keys[-1], "png": png.getvalue(), "cls": str(i % 3).encode()})
    cfg = section_config(tmp_path, evaluate={"cas_steps": 2, "cas_batch_size": 4})
    classifier = {"classifier_config": {"num_classes": 4, "width": 8, "stages": 2, "blocks_per_stage": 1}}
    ctx = SimpleNamespace(root=Location(str(tmp_path)), upstream={"train_classifier": SimpleNamespace(manifest=classifier)})
    metrics = run_cas(cfg, ctx, [], [{"uri": path.as_posix(), "keys": keys}], {path.as_posix(): keys}, num_classes=3)
    assert 0 <= metrics["cas_top1"] <= 1 and metrics["cas_train_images"] == metrics["cas_test_images"] == 12
    assert metrics["cas_real_top1"] is None and metrics["cas_real_train_images"] is None


def test_the_cas_resnet50_preset_is_resnet50(tmp_path):
    import torch

    from models.classifier import CLASSIFIER_PRESETS, ResNetClassifier

    model = ResNetClassifier(CLASSIFIER_PRESETS["resnet50"](1000)).eval()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision's resnet50()
    assert model.feature_dim == 2048
    with torch.no_grad():
        assert model.blocks(model.stem(torch.zeros(1, 3, 224, 224))).shape == (1, 2048, 7, 7)  # stride 32
    assert _config(tmp_path, cas_preset="resnet50").evaluate.cas_preset == "resnet50"


SWEEP = [1.0, 0.5, 0.25]
TINY_EVALUATE = {"max_real_images": 16, "batch_size": 16, "sweep": SWEEP, "is_splits": 2,
                 "cas_steps": 15, "cas_batch_size": 16, "num_actors": 2,
                 "max_images_per_net": {"efficientnet_lite0": 8}}


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
                "classifier_val_top1", "classifier_val_top5", "cas_top1", "cas_top5", "cas_real_top1", "cas_real_top5",
                "sample_accuracy", "sample_accuracy_accepted"}
    for net in NETS:
        for name in ("fid", "fid_star", "fid_recon", "precision", "recall"):
            expected |= {f"{name}_{net}"} | {f"{name}_{net}_{part}" for part in ("n", "ref_n", "dim", "reliable", "floor")}
    expected |= {"is_efficientnet_lite0", "is_classifier", "is_real_efficientnet_lite0", "is_real_classifier"}
    expected |= {"is_real_efficientnet_lite0_n", "is_real_classifier_n"}
    assert expected <= set(metrics), expected - set(metrics)
    assert manifest["not_computed"] == []
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["real_images"] == 16 and metrics["samples"] == 24 and metrics["accepted_samples"] == 16
    assert metrics["is_real_classifier_n"] == metrics["is_classifier_n"] == 16
    assert 0 <= metrics["precision_inception_v3"] <= 1 and 0 <= metrics["cas_top1"] <= metrics["cas_top5"] <= 1
    # Each metric with the counts it compared: the accepted samples against the real images; the capped net on
    # its 8 of each; all of them too few for their feature dimensions here, and the summary says so.
    assert (metrics["fid_inception_v3_n"], metrics["fid_inception_v3_ref_n"], metrics["fid_inception_v3_dim"]) == (16, 16, 2048)
    assert (metrics["fid_efficientnet_lite0_n"], metrics["fid_efficientnet_lite0_ref_n"]) == (8, 8)
    assert (metrics["fid_recon_classifier_n"], metrics["fid_recon_classifier_ref_n"]) == (16, 16)
    assert metrics["fid_inception_v3_reliable"] == 0.0 and metrics["fid_inception_v3_floor"] > 0
    assert any(note.startswith("UNRELIABLE") and "fid_inception_v3 (16 vs 16 images, 2048-d)" in note
               for note in manifest["notes"])
    assert any("Inception Score is not on the Inception network" in note for note in manifest["notes"])

    sweep = manifest["sweep"]
    # Every point compares as many samples of each class (8 classes, ceil(0.25 * 3) = 1 of each).
    assert [p["keep_fraction"] for p in sweep] == SWEEP and [p["samples"] for p in sweep] == [8, 8, 8]
    assert [p["kept"] for p in sweep] == [24, 16, 8]
    for point in sweep:
        assert all(point[k] is not None and math.isfinite(point[k]) for k in point)
        assert point["fid_inception_v3_n"] == 8 and point["fid_inception_v3_floor"] == sweep[0]["fid_inception_v3_floor"]
        assert "fid_efficientnet_lite0" not in point  # a capped net gives the headline numbers only
    # Keeping fewer samples changes the numbers.
    assert sweep[0]["fid_inception_v3"] != sweep[2]["fid_inception_v3"]
    assert sweep[0]["is_classifier"] != sweep[2]["is_classifier"]

    assert (result.location / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (result.location / SUMMARY).read_json()
    assert summary["metrics"] == metrics and len(summary["sweep"]) == len(SWEEP)
    assert summary["notes"] == manifest["notes"] and summary["sweep_nets"] == ["inception_v3", "classifier"]
    lines = "\n".join(headline_lines(summary))
    assert "fid_classifier" in lines and "floor" in lines and "UNRELIABLE" in lines and "CAS top-1" in lines

    client = MlflowClient(tiny_pipeline.tracking_uri)
    run = client.get_run(manifest["run_id"])
    for name in expected:
        assert run.data.metrics[name] == pytest.approx(metrics[name]), name
    history = client.get_metric_history(run.info.run_id, "sweep_fid_inception_v3")
    assert sorted(m.step for m in history) == list(range(len(SWEEP)))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {PLOT, SUMMARY, "manifest.json"} <= artifacts


@pytest.mark.slow
def test_evaluate_completes_when_rejection_keeps_no_sample(tiny_pipeline):
    """A threshold no sample reaches: the metrics of the accepted samples and CAS are reported as not
    computed, the rest (reconstructions, real-image references) are still measured."""
    from pipeline.runner import run_pipeline

    cfg = tiny_pipeline.config(
        sample={"rejection": {"keep_fraction": None, "threshold": 1.0}},
        evaluate={"feature_nets": ["classifier"], "max_images_per_net": {"classifier": 8}, "max_real_images": 16,
                  "cas_steps": 5, "num_actors": 1})
    result = run_pipeline(cfg)["evaluate"]  # the stages before it are cached when other tests ran first
    metrics = result.manifest["metrics"]
    assert metrics["accepted_samples"] == 0 and metrics["samples"] == 24
    assert {"fid_classifier", "fid_star_classifier"} <= set(result.manifest["not_computed"])
    assert "cas_top1" not in metrics and math.isfinite(metrics["fid_recon_classifier"])


def test_real_images_are_those_of_the_sampled_classes(tiny_pipeline):
    """`sample.classes` may name any classes (here 0 and 2): the real images every comparison takes (FID's
    validation images, the floors' and CAS's training images) are of those classes only."""
    import torch

    from pipeline.dataset import Dataset
    from pipeline.evaluate import _batches, _real_train_sources, plan_real, plan_train, training_codes, training_images
    from pipeline.runner import run_pipeline

    results = run_pipeline(tiny_pipeline.config(), only="encode")
    dataset = Dataset.open(results["shard"].location)
    section = EvaluateConfig(max_real_images=None, batch_size=5)
    every = plan_real(dataset, results["encode"], section, None, None, frozenset(range(len(dataset.classes))))
    sampled = plan_real(dataset, results["encode"], section, None, None, frozenset({0, 2}))
    label_of = {name: index for index, name in enumerate(dataset.classes)}
    keys = [key for task in sampled for key in task["keys"]]
    assert {label_of[key.split("/")[0]] for key in keys} == {0, 2}
    assert len(keys) == sum(label_of[key.split("/")[0]] in (0, 2) for task in every for key in task["keys"])
    assert all(len(task["keys"]) <= 5 for task in sampled)
    images = training_images(dataset, frozenset({0, 2}))
    train_tasks = plan_train(images, section, 1000, training_codes(dataset, results["encode"]))
    train = [key for task in train_tasks for key in task["keys"]]
    cas_train = [key for source in _real_train_sources(images, 1000, 0) for key in source["keys"]]
    assert sorted(train) == sorted(cas_train) and {label_of[key.split("/")[0]] for key in train} == {0, 2}

    batches = list(_batches([{"uri": task["uri"], "keys": task["keys"]} for task in sampled], None, None, 4))
    assert all(len(images) == len(labels) <= 4 for images, labels in batches)
    labels = torch.cat([labels for _, labels in batches])
    assert len(labels) == len(keys) and set(labels.tolist()) == {0, 2}
    assert all(images.dtype == torch.uint8 for images, _ in batches)


def test_a_metric_task_decodes_only_the_images_it_reads(tmp_path):
    """A task reads a few keys of a large shard: the others are skipped before decoding, so a
    corrupt image elsewhere in the tar is not touched (and a whole shard is not decoded for 64 images)."""
    import io

    import webdataset as wds
    from PIL import Image

    from pipeline.evaluate import _batches, read_images
    from pipeline.images import RejectedImage

    path = tmp_path / "shard.tar"
    with wds.TarWriter(str(path)) as writer:
        for i in range(6):
            jpeg = io.BytesIO()
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(jpeg, "JPEG")
            writer.write({"__key__": f"c{i % 2}/img-{i}", "jpg": b"not an image" if i == 3 else jpeg.getvalue(),
                          "cls": str(i % 2).encode()})
    keys, images, labels = read_images(str(path), None, None, keys=["c1/img-5", "c0/img-0"])
    assert keys == ["c1/img-5", "c0/img-0"] and labels.tolist() == [1, 0]
    assert images[:, 0, 4, 4].tolist() == pytest.approx([200, 0], abs=8)
    batches = list(_batches([{"uri": str(path), "keys": ["c0/img-0", "c1/img-1", "c0/img-2", "c0/img-4", "c1/img-5"]}],
                            None, None, 4))
    assert [len(labels) for _, labels in batches] == [4, 1]
    with pytest.raises(RejectedImage, match="not an image"):
        read_images(str(path), None, None)


def test_a_capped_net_and_the_floor_images(tiny_pipeline):
    """A slow net sees the first images of each set's seeded order up to its cap (of the samples, accepted ones
    only); the floors' real images come from the training split, of the sampled classes."""
    from collections import Counter

    from pipeline.dataset import Dataset
    from pipeline.evaluate import plan_real, plan_samples, plan_train, training_codes, training_images
    from pipeline.runner import run_pipeline

    results = run_pipeline(tiny_pipeline.config(), only="encode")
    dataset = Dataset.open(results["shard"].location)
    section = EvaluateConfig(max_real_images=20, batch_size=5, max_images_per_net={"inception_v3": 6})

    def seen(tasks):
        return Counter(net for task in tasks for net in task["nets"] for _ in task["keys"])

    first_three = frozenset({0, 1, 2})
    real = plan_real(dataset, results["encode"], section, None, None, first_three)
    available = plan_real(dataset, results["encode"], EvaluateConfig(max_real_images=None), None, None, first_three)
    count = min(20, sum(len(task["keys"]) for task in available))
    assert count > 6
    assert seen(real) == {"inception_v3": 6, "efficientnet_lite0": count, "classifier": count}
    codes = training_codes(dataset, results["encode"])
    train = plan_train(training_images(dataset, first_three), section, 30, codes)
    train_keys = [key for task in train for key in task["keys"]]
    label_of = {name: index for index, name in enumerate(dataset.classes)}
    assert len(set(train_keys)) == 30 and {label_of[key.split("/")[0]] for key in train_keys} <= {0, 1, 2}
    assert not set(train_keys) & {key for task in real for key in task["keys"]}
    assert all("/train/" in task["uri"] for task in train) and seen(train)["inception_v3"] == 6
    # Each training task decodes its images' reconstructions (FID*'s floor) from its shard's code table.
    assert all(task["codes"] == codes[task["uri"]] for task in train)
    assert {row["shard"] for row in (results["encode"].manifest["files"]["train"])} == {
        f"train/{s['name']}" for s in dataset.manifest["shards"] if s["split"] == "train"}
    assert all(len(task["keys"]) <= 5 for task in real + train)

    keys = [f"c/sample-{i:03d}" for i in range(40)]
    accepted = np.arange(40) % 4 == 0
    samples = plan_samples(keys, [f"tar{i // 16}" for i in range(40)], accepted, section)
    assert seen(samples) == {"inception_v3": 6, "efficientnet_lite0": 40, "classifier": 40}
    on_inception = {key for task in samples if "inception_v3" in task["nets"] for key in task["keys"]}
    assert on_inception <= {key for key, keep in zip(keys, accepted) if keep}
    assert all(len({key_tar for key_tar in [task["uri"]]}) == 1 for task in samples)


def test_only_the_sampled_classes_are_compared(caplog):
    """A dataset grown under policy.on_new_data=encode with a new class: evaluate warns and compares the
    classes the sample stage drew; a sample of classes the dataset orders differently is refused."""
    from pipeline.dataset import Dataset
    from pipeline.evaluate import sampled_labels
    from pipeline.storage import Location

    grown = Dataset(Location("/nowhere/shard/abc"), {"classes": ["a", "b", "c", "new"]})
    assert sampled_labels(grown, {"classes": ["a", "b", "c"], "sampled_labels": [0, 2]}) == {0, 2}
    assert "real images of the new classes ['new'] are left out" in caplog.text
    with pytest.raises(RuntimeError, match="the sampled classes are not the first 2 classes of dataset"):
        sampled_labels(grown, {"classes": ["b", "a"], "sampled_labels": [0, 1]})


# CAS in a process of its own, on real tars: once to warm up (lazy imports, first allocations: a 500 MB
# peak), then on a few images, then on many more. Each run's peak is its own (the kernel's high-water
# mark is reset before it), and glibc's mmap threshold is fixed, so freed blocks go back to the kernel
# instead of a dynamic threshold keeping them on the heap (that left +-100 MB of noise between runs,
# and a flaky failure in CI). The classifier and its activations are the same in both runs, so the
# growth is what holding the images costs.
CAS_MEMORY_SCRIPT = r"""
import io, json, sys
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.evaluate import cas_task

folder = Path(sys.argv[1])
size = 128


def tar(name, count):
    path = folder / f"{name}.tar"
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    with wds.TarWriter(str(path)) as writer:
        for i in range(count):
            pixels = np.stack([np.add.outer(ramp, ramp * (i % 7)), np.full((size, size), i % 256)] * 2)[:3]
            jpeg = io.BytesIO()
            Image.fromarray(pixels.transpose(1, 2, 0).astype(np.uint8)).save(jpeg, "JPEG", quality=90)
            writer.write({"__key__": f"c{i % 2}/{name}-{i:05d}", "jpg": jpeg.getvalue(), "cls": str(i % 2).encode()})
    return path.as_posix()


def status(field):
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def peak_of(count):
    images = tar(f"images{count}", count)
    keys = [f"c{i % 2}/images{count}-{i:05d}" for i in range(count)]
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = status("VmRSS")
    scores = cas_task([{"uri": images}], [{"uri": images, "keys": keys}], 2,
                      {"num_classes": 2, "width": 8, "stages": 2, "blocks_per_stage": 1},
                      {"steps": 2, "batch_size": 32, "lr": 1e-3, "seed": 0}, None, None, False, 1)
    assert scores["train_images"] == scores["test_images"] == count, scores
    return status("VmHWM") - before


peak_of(40)
small = peak_of(41)
large = peak_of(600)
print("RESULT " + json.dumps({"growth": large - small, "decoded": 2 * 600 * 3 * size * size}))
"""


def test_cas_holds_a_batch_of_images_not_the_whole_task(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", CAS_MEMORY_SCRIPT, str(tmp_path)], cwd=Path(__file__).parents[1],
                          env=os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["decoded"] > 55e6  # train and test images of the second run, decoded
    # Measured: -0.3 to +1.4 MB; holding the decoded training images instead of the DiskImages file: +27 MB.
    assert result["growth"] < result["decoded"] / 4, result
