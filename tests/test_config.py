"""Config loading, validation errors, overrides and fingerprints."""

import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, fingerprint, flatten, load_config, parse_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


MINIMAL = "storage: {root: runs/x}\ndataset: {source: data/x}\n"
MINIMAL_TREE = {"storage": {"root": "runs/x"}, "dataset": {"source": "data/x"}}


@pytest.mark.parametrize("name", ["tiny.yaml", "fashion.yaml", "imagenet256.yaml", "ffhq1024.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.name == name.removesuffix(".yaml")
    assert cfg.dataset.shard_size > 0


def test_paper_settings():
    assert load_config(CONFIGS / "imagenet256.yaml").dataset.image_size == 256
    assert load_config(CONFIGS / "ffhq1024.yaml").dataset.image_size == 1024


def test_the_quality_run_measures_at_valid_counts():
    cfg = load_config(CONFIGS / "fashion.yaml")
    # More Inception images a set than its 2,048 feature dimensions; 10,000 accepted samples for the classifier's.
    assert cfg.evaluate.max_images_per_net["inception_v3"] > 2048
    assert cfg.evaluate.max_real_images == 10_000
    assert cfg.sample.samples_per_class * 10 * cfg.sample.rejection.keep_fraction == 10_000


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path):
    path = write(tmp_path, MINIMAL + "ray: {num_workers: 2, num_worker: 3}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert f"{path}: ray.num_worker: unknown key" in message
    assert "num_workers" in message and "max_retries" in message


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"pipeline.yaml: trainer: unknown key; expected one of: .*dataset"):
        load_config(write(tmp_path, MINIMAL + "trainer: {steps: 3}\n"))


def test_wrong_type_names_file_key_and_expected_type(tmp_path):
    path = write(tmp_path, "storage: {root: runs/x}\ndataset: {source: data/x, shard_size: lots}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert f"{path}: dataset.shard_size: expected: a valid integer" in str(error.value)
    assert "'lots'" in str(error.value)


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match=r"pipeline.yaml: dataset.source: required key is missing"):
        load_config(write(tmp_path, "storage: {root: runs/x}\ndataset: {shard_size: 3}\n"))


def test_out_of_range_value(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset.jpeg_quality: expected: less than or equal to 100"):
        load_config(write(tmp_path, MINIMAL), ["dataset.jpeg_quality=101"])


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        ["dataset.shard_size=17", "dataset.reencode=false", "ray.address=auto", "dataset.image_size=null"],
    )
    assert cfg.dataset.shard_size == 17 and cfg.dataset.reencode is False
    assert cfg.ray.address == "auto" and cfg.dataset.image_size is None


def test_bad_override_names_the_override(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, MINIMAL), ["ray.num_workers=two", "mlflow.uri=http://x"])
    message = str(error.value)
    assert "override 'ray.num_workers=two': ray.num_workers: expected: a valid integer" in message
    assert "override 'mlflow.uri=http://x': mlflow.uri: unknown key" in message


def test_override_without_value_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(write(tmp_path, MINIMAL), ["dataset.shard_size"])


@pytest.mark.parametrize("override, expected", [
    ("dataset.splits=[train", r"while parsing a flow sequence; expected ',' or '\]'"),
    ("mlflow.experiment=@nightly", "while scanning for the next token; found character '@' that cannot start any token"),
    # YAML drops a comment: the run went under the name 'vq2', with no word said.
    ("mlflow.experiment=vq2 #2", r"a '#' after a space starts a YAML comment.*\(mlflow.experiment='...'\)"),
    ("dataset.shard_size=500 # smaller", "a '#' after a space starts a YAML comment"),
    ("mlflow.experiment=#2", "a '#' after a space starts a YAML comment"),
    ("train_vqvae.model={beta: 1, beta: 2}", "line 1: beta: expected: each key once in its section"),
])
def test_an_override_that_is_not_one_yaml_value_is_a_config_error(tmp_path, override, expected):
    with pytest.raises(ConfigError, match=rf"^override {re.escape(repr(override))}: not a YAML value: {expected}"):
        load_config(write(tmp_path, MINIMAL), [override])


def test_a_hash_quoted_or_within_a_word_stays_in_an_override(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["mlflow.experiment='vq2 #2'", "dataset.source=data/x#2"])
    assert cfg.mlflow.experiment == "vq2 #2" and cfg.dataset.source.endswith("data/x#2")


@pytest.mark.parametrize("text, line, first, key", [
    (MINIMAL + "train_vqvae:\n  steps: 50000\n  num_workers: 4\ntrain_vqvae:\n  steps: 10\n", 6, 3, "train_vqvae"),
    ("storage: {root: runs/x}\ndataset:\n  source: data/x\n  shard_size: 5\n  shard_size: 6\n", 5, 4, "dataset.shard_size"),
    (MINIMAL + "train_prior:\n  models:\n    top: {channels: 64, channels: 32}\n", 5, 5, "train_prior.models.top.channels"),
])
def test_a_key_given_twice_in_a_file_is_an_error(tmp_path, text, line, first, key):
    # YAML keeps the last silently: the first train_vqvae section's 50,000 steps and 4 workers were lost.
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: line {line}: {re.escape(key)}: expected: each key "
                                          rf"once in its section \(it is also at line {first};"):
        load_config(path)


def test_unreadable_yaml_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="pipeline.yaml: cannot read config"):
        load_config(write(tmp_path, "storage: [unclosed\n"))


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.storage.root == str(tmp_path / "runs/x")
    assert cfg.dataset.source == str(tmp_path / "data/x")
    s3 = parse_config({"storage": {"root": "s3://b/p"}, "dataset": {"source": "s3://b/src"}}, "inline")
    assert s3.storage.root == "s3://b/p"


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    base = fingerprint(cfg.dataset, {"listing": "abc", "other": "def"}, 1)
    assert base == fingerprint(cfg.dataset, {"other": "def", "listing": "abc"}, 1)
    assert len(base) == 16 and int(base, 16) >= 0
    changed = load_config(write(tmp_path, MINIMAL), ["dataset.shard_size=5"])
    assert fingerprint(changed.dataset, {"listing": "abc", "other": "def"}, 1) != base
    assert fingerprint(cfg.dataset, {"listing": "abd", "other": "def"}, 1) != base
    assert fingerprint(cfg.dataset, {"listing": "abc", "other": "def"}, 2) != base
    # Settings outside the stage's section do not change its fingerprint.
    other = load_config(write(tmp_path, MINIMAL), ["ray.num_workers=7", "mlflow.experiment=x"])
    assert fingerprint(other.dataset, {"listing": "abc", "other": "def"}, 1) == base


def test_keys_that_change_how_a_stage_runs_not_what_it_makes_leave_its_fingerprint(tmp_path):
    """More actors or another log cadence reuse the outputs; every other key of the section makes new ones."""
    cfg = load_config(write(tmp_path, MINIMAL))
    operational = ["encode.num_actors=5", "sample.num_actors=5", "evaluate.num_actors=5",
                   "train_vqvae.log_every=3", "train_prior.max_failures=0", "train_classifier.log_every=7"]
    scaled = load_config(write(tmp_path, MINIMAL), operational)
    for section in ("encode", "sample", "evaluate", "train_vqvae", "train_prior", "train_classifier"):
        assert fingerprint(getattr(scaled, section), {}, 1) == fingerprint(getattr(cfg, section), {}, 1), section
    for override in ("encode.batch_size=7", "sample.batch_size=7", "evaluate.batch_size=7", "train_vqvae.num_workers=3",
                     "train_prior.checkpoint_every=7", "train_classifier.loader_workers=1"):
        section = override.split(".")[0]
        changed = load_config(write(tmp_path, MINIMAL), [override])
        assert fingerprint(getattr(changed, section), {}, 1) != fingerprint(getattr(cfg, section), {}, 1), override
    assert scaled.encode.num_actors == 5 and flatten(scaled.encode)["num_actors"] == "5"  # still run and logged


def test_flatten_gives_dotted_string_params(tmp_path):
    flat = flatten(load_config(write(tmp_path, MINIMAL)).dataset, "dataset.")
    assert flat["dataset.shard_size"] == "1000"
    assert flat["dataset.splits"] == '["train", "val"]'
    assert flat["dataset.listing"] == "null"


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    from jobs.cli import main

    assert main(["shard", "--config", str(write(tmp_path, MINIMAL)), "dataset.shard_size=many"]) == 2
    error = capsys.readouterr().err
    assert "override 'dataset.shard_size=many': dataset.shard_size: expected: a valid integer" in error
    assert "Traceback" not in error
    assert main(["status", "--config", str(write(tmp_path, MINIMAL)), "dataset.splits=[train"]) == 2
    error = capsys.readouterr().err
    assert "override 'dataset.splits=[train': not a YAML value" in error and "Traceback" not in error


@pytest.mark.parametrize(
    "key, uri, expected",
    [
        ("dataset.source", "s3:/bucket/corpus", r"a local path or a URI like s3://bucket/prefix \('://' is missing\)"),
        ("storage.root", "s3://", "a URI with a bucket, s3://bucket/prefix"),
        ("dataset.source", "s3:///corpus", "a URI with a bucket, s3://bucket/prefix"),
        ("dataset.listing", "s4://bucket/listing.txt", "a URI of a known scheme .*; 's4' is not one"),
        ("storage.root", "file://", "a URI with a path after '://'"),
        # Stage leases work on file and S3 only: memory:// failed at the first stage, after the preflight passed.
        ("storage.root", "memory://vq2/runs", r"a local path, file:///absolute/path or s3://bucket/prefix .*"
                                              r"memory:// is not one"),
        ("storage.root", "ftp://host/runs", "ftp:// is not one"),
        # Relative to each process's working folder, unlike a plain relative path.
        ("storage.root", "file://runs/x", r"file:///absolute/path \(three slashes\) or a plain local path"),
        ("dataset.source", "file://data/x", r"file:///absolute/path \(three slashes\) or a plain local path"),
        # Taken for a file in the working folder, they failed when a stage opened them.
        ("sample.rejection.classifier", "efficientnet-lite0", r"'dataset', 'efficientnet_lite0', a registered model "
                                                              r".*; 'efficientnet-lite0' is none of these"),
        ("sample.rejection.classifier", "s3:/bucket/c.pt", r"\('://' is missing\)"),
        ("evaluate.inception_weights", "inception", r"or null .*; 'inception' is none of these"),
        ("evaluate.inception_weights", "s3:/bucket/w.pt", r"\('://' is missing\)"),
    ],
)
def test_malformed_storage_uris_name_file_key_and_expectation(tmp_path, key, uri, expected):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as error:
        load_config(path, [f"{key}={uri}"])
    assert f"override '{key}={uri}': {key}: expected: " in str(error.value)
    assert re.search(expected, str(error.value)) and f"(got '{uri}')" in str(error.value)
    *sections, name = key.split(".")
    tree = node = {"storage": {"root": "runs/x"}, "dataset": {"source": "data/x"}}
    for section in sections:
        node = node.setdefault(section, {})
    node[name] = uri
    with pytest.raises(ConfigError, match=rf"pipeline.yaml: {key}: expected: .*\(got '{uri}'\)"):
        load_config(write(tmp_path, yaml.safe_dump(tree)))


def test_well_formed_storage_uris_pass():
    cfg = parse_config({"storage": {"root": "s3://bucket/runs", "retry": {"attempts": 3}},
                        "dataset": {"source": "memory://corpus", "listing": "file:///srv/listing.txt"}}, "inline")
    assert (cfg.storage.root, cfg.dataset.source, cfg.dataset.listing) == (
        "s3://bucket/runs", "memory://corpus", "file:///srv/listing.txt")
    assert cfg.storage.retry.attempts == 3 and cfg.storage.retry.backoff_s == 0.2
    for classifier in ("dataset", "efficientnet_lite0", "models:/vq2-classifier@champion", "s3://b/c.pt"):
        sample = {"rejection": {"classifier": classifier}}
        assert parse_config({**MINIMAL_TREE, "sample": sample}, "inline").sample.rejection.classifier == classifier
    local = parse_config({**MINIMAL_TREE, "sample": {"rejection": {"classifier": "ckpt/c.pt"}},
                          "evaluate": {"inception_weights": "pt_inception.pt"}}, "inline")
    assert local.sample.rejection.classifier.startswith("/") and local.evaluate.inception_weights.startswith("/")


@pytest.mark.parametrize(
    "key, uri, redacted",
    [
        ("storage.endpoint_url", "https://AKIAEXAMPLE:wJalrSECRET@s3.internal:9000",
         "https://AKIAEXAMPLE:***@s3.internal:9000"),
        ("mlflow.tracking_uri", "postgresql://vq2:wJalrSECRET@db.internal/mlflow", "postgresql://vq2:***@db.internal/mlflow"),
        ("storage.root", "s3://AKIAEXAMPLE:wJalrSECRET@bucket/runs", "s3://AKIAEXAMPLE:***@bucket/runs"),
        ("dataset.source", "https://me:wJalrSECRET@images.example.com/corpus", "https://me:***@images.example.com/corpus"),
        # urlsplit raises on a '[' (an IPv6 host to it) and ends the host at a '#': both were accepted as they were.
        ("mlflow.tracking_uri", "postgresql://alice:wJalr[SECRET@db/mlflow", "postgresql://alice:***@db/mlflow"),
        ("mlflow.tracking_uri", "postgresql://alice:wJalr#SECRET@db/mlflow", "postgresql://alice:***@db/mlflow"),
    ],
)
def test_a_uri_with_a_password_is_refused_without_repeating_it(tmp_path, key, uri, redacted):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, MINIMAL), [f"{key}={uri}"])
    message = str(error.value)
    assert f"override '{key}=" in message and f": {key}: expected: a URI without a password (got '{redacted}')" in message
    assert "credentials come from the environment" in message and "wJalrSECRET" not in message
    section, name = key.split(".")
    tree = {"storage": {"root": "runs/x"}, "dataset": {"source": "data/x"}, section: {name: uri}}
    if section == "storage":
        tree["storage"].setdefault("root", "runs/x")
    with pytest.raises(ConfigError, match=rf"pipeline.yaml: {re.escape(key)}: expected: a URI without a password"):
        load_config(write(tmp_path, yaml.safe_dump(tree)))


def test_redact_uri_hides_only_a_password():
    from pipeline.config import redact_uri

    assert redact_uri("https://user:pass@host:9000/path?q=1") == "https://user:***@host:9000/path?q=1"
    assert redact_uri("postgresql://alice:p]a[ss@db/mlflow") == "postgresql://alice:***@db/mlflow"
    assert redact_uri("http://u:p@[::1]:80/x") == "http://u:***@[::1]:80/x"
    for clean in ("s3://bucket/runs", "https://user@host/x", "https://user@host:9000/x", "/local/path",
                  "sqlite:////tmp/mlflow.db", "auto", "models:/vq2@champion"):
        assert redact_uri(clean) == clean


@pytest.mark.parametrize("override, key, expected", [
    ("train_vqvae.model={hidden_channels: abc}", "train_vqvae.model", "hidden_channels: a valid integer"),
    ("train_prior.models.top.channels=64.5", "train_prior.models", "top.channels: a valid integer"),
    ("train_classifier.model={dropout: high}", "train_classifier.model", "dropout: a valid number"),
])
def test_model_overrides_must_have_the_model_config_types(tmp_path, override, key, expected):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, MINIMAL), [override])
    assert f"override {override!r}: {key}: expected: {expected}" in str(error.value)


@pytest.mark.parametrize("text, override, expected", [
    # The misspelt key is in the file; the override only sets another key under the same field.
    ("train_prior:\n  models:\n    bottom: {conditon_channels: 48}\n", "train_prior.models.top.num_layers=8",
     "{path}: train_prior.models: expected: unknown model key(s) bottom.conditon_channels"),
    ("train_prior:\n  models:\n    bottom: {conditon_channels: 48}\n", "train_prior.models.bottom.num_layerz=8",
     "{path} and override 'train_prior.models.bottom.num_layerz=8': train_prior.models: expected: unknown model "
     "key(s) bottom.conditon_channels, bottom.num_layerz"),
    ("train_classifier:\n  model: {num_classes: 3}\n", "train_classifier.model.dropout=0.1",
     "{path}: train_classifier.model: expected: num_classes comes from the dataset"),
    ("evaluate:\n  sweep: [1.0, 2.0]\n", "evaluate.num_actors=4", "{path}: evaluate: expected: sweep values [2.0]"),
    ("evaluate:\n  sweep: [0.5]\n", "evaluate.sweep=[2]", "override 'evaluate.sweep=[2]': evaluate: expected: sweep"),
    ("", "trainer.steps=3", "override 'trainer.steps=3': trainer: unknown key"),
])
def test_an_error_is_blamed_on_what_set_the_offending_key(tmp_path, text, override, expected):
    path = write(tmp_path, MINIMAL + text)
    with pytest.raises(ConfigError) as error:
        load_config(path, [override])
    assert expected.format(path=path) in str(error.value)


def test_model_overrides_are_stored_as_their_types_so_one_value_is_one_fingerprint(tmp_path):
    path = write(tmp_path, MINIMAL)
    as_int, as_float = (load_config(path, [f"train_vqvae.model={{beta: {v}}}", f"train_prior.models.top.channels={c}"])
                        for v, c in (("1", "64"), ("1.0", "64.0")))
    assert as_float.train_vqvae.model == {"beta": 1.0} and type(as_int.train_vqvae.model["beta"]) is float
    assert as_float.train_prior.models == {"top": {"channels": 64}}
    for section in ("train_vqvae", "train_prior"):
        assert fingerprint(getattr(as_int, section), {}, 1) == fingerprint(getattr(as_float, section), {}, 1)


def test_the_same_feature_nets_in_another_order_are_one_fingerprint(tmp_path):
    path = write(tmp_path, MINIMAL)
    listed, reordered = (load_config(path, [f"evaluate.feature_nets=[{nets}]"])
                         for nets in ("inception_v3, classifier", "classifier, inception_v3"))
    assert reordered.evaluate.feature_nets == ["inception_v3", "classifier"]
    assert fingerprint(listed.evaluate, {}, 1) == fingerprint(reordered.evaluate, {}, 1)


def test_prior_settings_name_levels_of_the_vqvae(tmp_path):
    path = write(tmp_path, MINIMAL)
    for override, key in (("train_prior.models={Top: {channels: 64}}", "train_prior.models.Top"),
                          ("train_prior.level_batch_size={middle: 8}", "train_prior.level_batch_size.middle")):
        with pytest.raises(ConfigError) as error:
            load_config(path, [override])
        assert (f"override {override!r}: {key}: expected: a level of the VQ-VAE (train_vqvae.preset and "
                "train_vqvae.model.levels): top, bottom") in str(error.value)
    three = load_config(path, ["train_vqvae.model={levels: 3}", "train_prior.level_batch_size={middle: 8}"])
    assert three.train_prior.level_batch("middle") == 8
