"""Transient storage faults are retried, never rejected: a fault-injecting proxy (tests/fault_proxy.py) in front
of the S3 server answers a seeded share of requests with 503 SlowDown or 403 ExpiredToken or resets the
connection, and every stage finishes with exactly what a run without faults makes."""

import io

import pyarrow.parquet as pq
import pytest
from fault_proxy import KINDS, FaultProxy
from mlflow.tracking import MlflowClient

from pipeline import demo_data
from pipeline.config import parse_config
from pipeline.encode import read_split
from pipeline.faults import RetryPolicy, StorageUnavailable, is_transient, with_retries
from pipeline.runner import StageFailed, run_pipeline
from pipeline.sample import read_samples
from pipeline.storage import MANIFEST, Location

# Patient enough for a faulty request's `repeats` failures on each of a call's requests; quick in tests.
RETRY = {"attempts": 16, "backoff_s": 0.001, "max_backoff_s": 0.01}
SHARE, REPEATS, SEED = 0.3, 3, 7


@pytest.fixture
def fault_proxy(s3_env):
    """Starts FaultProxy(S3 endpoint, **settings) on demand; every proxy started is stopped after the test."""
    started: list[FaultProxy] = []

    def start(**settings) -> FaultProxy:
        started.append(FaultProxy(s3_env.endpoint, **settings).start())
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_every_storage_call_outlasts_each_fault_kind(s3_env, fault_proxy, kind):
    proxy = fault_proxy(share=1.0, repeats=2, kinds=(kind,))
    root = Location(s3_env.uri(f"faults/calls-{kind}"), proxy.endpoint, retry=RetryPolicy(**RETRY))
    payload = bytes(range(256)) * 40
    (root / "a/b.bin").write_bytes(payload)
    (root / "a/c/d.json").write_json({"x": 1})
    assert (root / "a/b.bin").exists() and not (root / "a/missing").exists()
    assert (root / "a/b.bin").size() == len(payload)
    assert (root / "a/b.bin").read_bytes() == payload
    assert (root / "a/b.bin").read_bytes(limit=10) == payload[:11]
    with (root / "a/b.bin").open_read() as stream:
        stream.seek(1000)
        assert stream.read(24) + stream.read() == payload[1000:]
    assert root.list_files() == {"a/b.bin": len(payload), "a/c/d.json": len(b'{\n "x": 1\n}')}
    assert (root / "a").list_folders() == ["c"]
    (root / "a").remove()
    assert root.list_files() == {}
    assert proxy.injected[kind] > 0


def test_one_attempt_is_one_request(s3_env, fault_proxy):
    """botocore's and s3fs's own retries are off: the policy's attempts are the only ones."""
    Location(s3_env.uri("faults/single/f")).write_bytes(b"data")
    proxy = fault_proxy(share=1.0, repeats=1, kinds=("slowdown",))
    target = Location(s3_env.uri("faults/single/f"), proxy.endpoint, retry=RetryPolicy(attempts=1))
    with pytest.raises(StorageUnavailable, match=f"read {target.uri}: failed 1 time.*Service Unavailable"):
        target.read_bytes()
    assert proxy.injected == {"slowdown": 1} and proxy.forwarded == 0


def test_a_missing_file_is_an_answer_not_retried(s3_env, fault_proxy):
    proxy = fault_proxy()
    for attempts in (1, 5):
        missing = Location(s3_env.uri("faults/nothing-here"), proxy.endpoint, retry=RetryPolicy(attempts=attempts))
        with pytest.raises(FileNotFoundError):
            missing.read_bytes()
        if attempts == 1:
            one_attempt = proxy.forwarded
    assert proxy.forwarded == 2 * one_attempt and not proxy.injected


def _shard_config(root: str, source: str, tracking_uri: str, endpoint: str | None = None, **storage):
    return parse_config({
        "storage": {"root": root, "endpoint_url": endpoint} | storage,
        "dataset": {"source": source, "image_size": 32, "shard_size": 8},
        "ray": {"num_workers": 2, "max_retries": 0},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "faults", "request_retries": 0},
    }, "faults-test.yaml")


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture
def s3_corpus(s3_env) -> str:
    """3 classes x (5 train + 2 val) images and the bad files, on the S3 server (the same bytes every time)."""
    source = Location(s3_env.uri("faults/corpus"))
    demo_data.synthetic(source, per_class=5, val_per_class=2, size=(40, 36), classes=3, with_bad_files=True)
    return source.uri


def _index_rows(result) -> list[dict]:
    return pq.read_table(io.BytesIO((result.location / "index.parquet").read_bytes())).to_pylist()


def test_shard_with_transient_faults_makes_what_a_clean_run_makes(ray_local, s3_env, s3_corpus, fault_proxy,
                                                                   tracking_uri):
    clean = run_pipeline(_shard_config(s3_env.uri("faults/clean"), s3_corpus, tracking_uri), only="shard")["shard"]
    proxy = fault_proxy(share=SHARE, repeats=REPEATS, seed=SEED)
    cfg = _shard_config(s3_env.uri("faults/faulty"), s3_corpus, tracking_uri, proxy.endpoint, retry=RETRY)
    faulty = run_pipeline(cfg, only="shard")["shard"]

    assert set(proxy.injected) == set(KINDS), proxy.injected  # image reads, listings and writes were hit
    assert faulty.fingerprint == clean.fingerprint
    assert faulty.manifest["rejected"] == clean.manifest["rejected"]  # the bad files only, same reasons
    assert {item["path"].rsplit("/", 1)[1] for item in clean.manifest["rejected"]} == set(demo_data.REJECTED_BAD_FILES)
    assert faulty.manifest["shards"] == clean.manifest["shards"]  # byte for byte (sha256)
    assert faulty.manifest["counts"] == clean.manifest["counts"]
    assert _index_rows(faulty) == _index_rows(clean)


def test_a_persistent_fault_fails_the_shard_stage_and_rejects_nothing(ray_local, s3_env, s3_corpus, fault_proxy,
                                                                       tracking_uri):
    image = "train/square/train-000002.jpg"  # in the third train shard (shard_order), after two are written
    proxy = fault_proxy(persistent=(f"/faults/corpus/{image}",), kinds=("slowdown", "expired_token"))
    cfg = _shard_config(s3_env.uri("faults/outage"), s3_corpus, tracking_uri, proxy.endpoint,
                        retry={"attempts": 3, "backoff_s": 0.001, "max_backoff_s": 0.01})
    with pytest.raises(StageFailed) as failure:
        run_pipeline(cfg, only="shard")
    message = str(failure.value)
    assert "stage shard failed" in message and "StorageUnavailable" in message
    assert f"{s3_corpus}/{image}: failed 3 time(s)" in message
    assert sum(proxy.injected.values()) >= 3
    written = Location(s3_env.uri("faults/outage"), s3_env.endpoint).list_files()
    assert written and not [key for key in written if key.endswith(MANIFEST)]
    records = [Location(s3_env.uri(f"faults/outage/{key}"), s3_env.endpoint).read_json()
               for key in written if key.rsplit("/", 1)[1].startswith("shard-") and key.endswith(".json")]
    assert not [record for record in records if image in record["inputs"]]  # its shard was never written


def _copy_output(result, root: Location) -> None:
    """A finished stage output copied onto another storage root (fingerprints do not depend on the root), so
    that only the stage under test runs there; Ray Train's checkpoints are left behind."""
    target = root / result.name / result.fingerprint
    for key in result.location.list_files():
        if "ray_train" not in key.split("/"):
            (target / key).write_bytes((result.location / key).read_bytes())


@pytest.mark.slow
def test_encode_and_sample_with_transient_faults_make_what_clean_runs_make(tiny_pipeline, s3_env, fault_proxy,
                                                                          tmp_path):
    # The runs' MLflow artifacts stay local (by default they would go under the faulty storage root).
    MlflowClient(tiny_pipeline.tracking_uri).create_experiment("faults", artifact_location=str(tmp_path))
    clean = run_pipeline(tiny_pipeline.config(), only="train_prior")  # cached when test_train_prior ran first
    clean |= run_pipeline(tiny_pipeline.config(), only="sample")  # the reference; test_sample reuses it
    root = Location(s3_env.uri("faults/pipeline"))
    for stage in ("shard", "train_vqvae", "train_classifier", "train_prior"):
        _copy_output(clean[stage], root)
    proxy = fault_proxy(share=SHARE, repeats=REPEATS, seed=SEED)
    cfg = tiny_pipeline.config(storage={"root": root.uri, "endpoint_url": proxy.endpoint, "retry": RETRY},
                               mlflow={"experiment": "faults"})

    encoded = run_pipeline(cfg, only="encode")["encode"]
    assert not encoded.cached and encoded.fingerprint == clean["encode"].fingerprint
    assert encoded.location.uri == f"{root.uri}/encode/{encoded.fingerprint}"
    for split in ("train", "val"):
        assert read_split(encoded, split)[1].equals(read_split(clean["encode"], split)[1])
    in_encode = sum(proxy.injected.values())
    assert in_encode > 0

    sampled = run_pipeline(cfg, only="sample")["sample"]
    reference = clean["sample"]
    assert not sampled.cached and sampled.fingerprint == reference.fingerprint
    assert sampled.manifest["lowest_accepted_scores"] == reference.manifest["lowest_accepted_scores"]
    assert read_samples(sampled.location, sampled.manifest["batches"], 2).equals(
        read_samples(reference.location, reference.manifest["batches"], 2))
    assert sum(proxy.injected.values()) > in_encode and set(proxy.injected) == set(KINDS), proxy.injected


@pytest.mark.parametrize("error", [ValueError("Protocol not known: nosuch"), ImportError("Please install gcsfs"),
                                   TypeError("bad argument"), KeyError("key"), NotImplementedError("no")])
def test_an_error_of_the_program_or_its_config_is_raised_at_once_not_retried(error):
    calls = []

    def call():
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        with_retries(call, RetryPolicy(attempts=8, backoff_s=0), "read x")
    assert calls == [1] and not is_transient(error)


def test_storage_errors_that_can_pass_stay_transient():
    # An expired token reads like a bad signature (PermissionError); a full disk, a reset or a timeout are OSErrors.
    for error in (PermissionError("signature"), OSError(28, "No space left on device"), ConnectionResetError(),
                  TimeoutError()):
        assert is_transient(error), error


def test_a_location_of_an_unknown_protocol_is_refused_at_once():
    # Was retried 8 times (half a minute of waits) and reported as "failed 8 time(s) with transient errors".
    with pytest.raises(ValueError, match="Protocol not known: nosuch"):
        Location("nosuch://bucket/x", retry=RetryPolicy(attempts=8, backoff_s=0)).read_bytes()
