"""The shard stage end to end on a local Ray: file:// and s3://, bad inputs, determinism, resume, growth."""

import io
import os
import re
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import webdataset as wds
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import BIN, free_port
from jobs.cli import main as vq2
from pipeline import demo_data
from pipeline import shard as shard_stage
from pipeline.config import parse_config, to_yaml
from pipeline.dataset import Dataset, verify
from pipeline.lease import LEASE
from pipeline.runner import StageFailed, run_pipeline
from pipeline.storage import MANIFEST, Location

CLASSES = 4
PER_CLASS, VAL_PER_CLASS = 12, 3
GOOD = CLASSES * (PER_CLASS + VAL_PER_CLASS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Location:
    """4 classes x 15 synthetic images plus the bad files, in ImageNet layout."""
    out = Location(str(tmp_path_factory.mktemp("corpus")))
    demo_data.synthetic(out, PER_CLASS, VAL_PER_CLASS, size=(48, 40), classes=CLASSES, with_bad_files=True)
    return out


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One sqlite store for the module: creating one costs seconds, and the default store has its own test."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def make_config(root, source, tracking_uri, **dataset):
    tree = {
        "storage": {"root": str(root)},
        "dataset": {"source": str(source), "image_size": 32, "shard_size": 10} | dataset,
        "ray": {"num_workers": 2, "max_retries": 2},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "shard-tests", "request_retries": 0},
    }
    return parse_config(tree, "test.yaml")


def snapshot(location: Location) -> dict[str, tuple[int, int]]:
    """Each file under a local folder with its size and modification time (to prove nothing was written)."""
    return {key: (size, os.stat(f"{location.path}/{key}").st_mtime_ns) for key, size in location.list_files().items()}


def check_dataset(result, inputs: int, rejected_paths: set[str]) -> dict:
    manifest = result.manifest
    counts = manifest["counts"]
    assert counts["inputs"] == inputs
    assert counts["accepted"] + counts["rejected"] == counts["inputs"]
    assert {item["path"] for item in manifest["rejected"]} == rejected_paths
    assert all(item["reason"] for item in manifest["rejected"])
    assert verify(result.location) == []
    return manifest


BAD_REJECTED = {f"train/circle/{name}" for name in demo_data.REJECTED_BAD_FILES}


def test_local_end_to_end_with_bad_files(ray_local, corpus, tracking_uri, tmp_path):
    cfg = make_config(tmp_path / "root", corpus.path, tracking_uri)
    result = run_pipeline(cfg, only="shard")["shard"]
    assert not result.cached
    assert result.location.uri == f"{tmp_path}/root/shard/{result.fingerprint}"
    manifest = check_dataset(result, GOOD + len(demo_data.bad_files(8, 8)), BAD_REJECTED)
    reasons = {item["path"].rsplit("/", 1)[1]: item["reason"] for item in manifest["rejected"]}
    assert reasons["bomb.png"].startswith("decompression bomb")
    assert reasons["zero-byte.jpg"] == "empty file"
    assert reasons["notes.txt"] == "not an image"
    assert reasons["bad name \u00e9.png"].startswith("unsafe name")
    converted = 4  # cmyk, grey16, grey, alpha
    assert manifest["counts"]["accepted"] == GOOD + converted
    assert manifest["splits"] == {"train": CLASSES * PER_CLASS + converted, "val": CLASSES * VAL_PER_CLASS}
    assert manifest["classes"] == ["circle", "hstripes", "square", "triangle"]

    # Read back as WebDataset: every sample is a 32x32 RGB JPEG with its class index.
    dataset = Dataset.open(result.location)
    urls = [shard.path for shard in dataset.shards("train")]
    assert [url.rsplit("/", 1)[1] for url in urls] == [f"shard-{i:06d}.tar" for i in range(len(urls))]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == manifest["splits"]["train"]
    for sample in samples:
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert (image.mode, image.size) == ("RGB", (32, 32))
        label_name = sample["__key__"].split("/")[0]
        assert manifest["classes"][int(sample["cls"])] == label_name
    index = pq.read_table(io.BytesIO((result.location / "index.parquet").read_bytes()))
    assert index.num_rows == manifest["counts"]["accepted"]
    # Every shard mixes the classes (the listing's class-by-class order gave each shard one class).
    for url in urls:
        labels = [int(sample["cls"]) for sample in wds.WebDataset([url], shardshuffle=False)]
        assert len(set(labels)) >= 3, (url, labels)

    # MLflow: a parent run and the stage's nested run, with params, tags, metrics and the manifest.
    client = MlflowClient(tracking_uri)
    run = client.get_run(manifest["run_id"])
    assert run.data.tags["fingerprint"] == result.fingerprint and run.data.tags["cached"] == "false"
    assert run.data.params["dataset.shard_size"] == "10"
    assert run.data.metrics["accepted"] == manifest["counts"]["accepted"]
    assert run.data.metrics["images_per_s"] > 0
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert "config.yaml" in [item.path for item in client.list_artifacts(parent.info.run_id)]
    assert "manifest.json" in [item.path for item in client.list_artifacts(run.info.run_id)]


def test_deterministic_and_rerun_writes_nothing(ray_local, corpus, tracking_uri, tmp_path):
    first = run_pipeline(make_config(tmp_path / "a", corpus.path, tracking_uri), only="shard")["shard"]
    before = snapshot(first.location.parent.parent)
    again = run_pipeline(make_config(tmp_path / "a", corpus.path, tracking_uri), only="shard")["shard"]
    assert again.cached and again.manifest["run_id"] == first.manifest["run_id"]
    assert snapshot(first.location.parent.parent) == before
    cached_run = MlflowClient(tracking_uri).search_runs(
        [MlflowClient(tracking_uri).get_experiment_by_name("shard-tests").experiment_id],
        "tags.cached = 'true'",
    )
    assert any(run.data.tags["produced_by_run"] == first.manifest["run_id"] for run in cached_run)

    # Another root, another run: the same keys in the same shards, byte for byte.
    other = run_pipeline(make_config(tmp_path / "b", corpus.path, tracking_uri), only="shard")["shard"]
    assert other.fingerprint == first.fingerprint
    assert other.manifest["shards"] == first.manifest["shards"]


def test_crash_resume_writes_only_missing_shards(ray_local, corpus, tracking_uri, tmp_path):
    cfg = make_config(tmp_path / "root", corpus.path, tracking_uri)
    complete = run_pipeline(cfg, only="shard")["shard"]
    out = complete.location
    # A crash: the manifest never written, two shards never written, one tar written without its record.
    for key in (MANIFEST, "index.parquet", "train/shard-000001.tar", "train/shard-000001.json"):
        (out / key).fs.rm((out / key).path)
    (out / "val/shard-000000.json").fs.rm((out / "val/shard-000000.json").path)
    survivors = snapshot(out)
    resumed = run_pipeline(cfg, only="shard")["shard"]
    assert not resumed.cached and resumed.fingerprint == complete.fingerprint
    after = snapshot(out)
    rewritten = {key for key in after if survivors.get(key) != after[key]}
    assert rewritten == {
        MANIFEST, "index.parquet", "classes.json",
        "train/shard-000001.tar", "train/shard-000001.json", "val/shard-000000.tar", "val/shard-000000.json",
    }  # fmt: skip
    assert resumed.manifest["shards"] == complete.manifest["shards"]
    assert resumed.manifest["counts"] == complete.manifest["counts"]
    assert verify(out) == []


def test_growth_is_append_only(ray_local, tracking_uri, tmp_path):
    source = Location(str(tmp_path / "corpus"))
    demo_data.synthetic(source, per_class=10, val_per_class=2, size=(40, 40), classes=3)
    cfg = make_config(tmp_path / "root", source.path, tracking_uri)
    v1 = run_pipeline(cfg, only="shard")["shard"]
    v1_files = snapshot(v1.location)
    v1_index = pq.read_table(io.BytesIO((v1.location / "index.parquet").read_bytes())).to_pylist()

    # The corpus grows: 5 more images in each old class and a new class.
    demo_data.synthetic(source, per_class=5, val_per_class=1, size=(40, 40), classes=4, first_index=10)
    v2 = run_pipeline(cfg, only="shard")["shard"]
    assert v2.fingerprint != v1.fingerprint and v2.manifest["base"] == v1.fingerprint
    assert snapshot(v1.location) == v1_files  # the old version is untouched
    old_shards = v2.manifest["shards"][: len(v1.manifest["shards"])]
    assert old_shards == v1.manifest["shards"]  # kept, still pointing at v1's folder
    new_shards = v2.manifest["shards"][len(v1.manifest["shards"]) :]
    assert new_shards and all(shard["dataset"] == v2.fingerprint for shard in new_shards)
    last_v1 = {s["split"]: s["name"] for s in v1.manifest["shards"]}
    assert all(s["name"] > last_v1.get(s["split"], "") for s in new_shards)
    assert v2.manifest["classes"][:3] == v1.manifest["classes"]  # labels never move
    assert v2.manifest["classes"][3] == "hstripes"
    v2_index = pq.read_table(io.BytesIO((v2.location / "index.parquet").read_bytes())).to_pylist()
    assert v2_index[: len(v1_index)] == v1_index  # every old key in its old shard
    assert len(v2_index) == 3 * 12 + 3 * 6 + 6
    check_dataset(v2, len(v2_index), set())
    assert set(Location(v2.location.uri).list_files()) == {
        MANIFEST, "index.parquet", "classes.json", *(f"{s['split']}/{s['name'][:-4]}.{e}" for s in new_shards for e in ("tar", "json"))
    }  # fmt: skip

    # Versions of another shard format (1: listing order, one class a shard) are never grown from: the next
    # version shards the whole corpus again, in the current order.
    for version in (v1, v2):
        (version.location / MANIFEST).write_json((version.location / MANIFEST).read_json() | {"format_version": 1})
    demo_data.synthetic(source, per_class=1, val_per_class=1, size=(40, 40), classes=4, first_index=15)
    v3 = run_pipeline(cfg, only="shard")["shard"]
    assert v3.manifest["base"] is None and all(s["dataset"] == v3.fingerprint for s in v3.manifest["shards"])
    assert v3.manifest["counts"]["accepted"] == len(v2_index) + 4 * 2


def test_a_shard_whose_every_input_was_rejected_is_left_to_no_reader(ray_local, tracking_uri, tmp_path):
    # A growth of one corrupt file makes a shard of no sample. A trainer's rank dealt only that shard waited
    # forever for a batch, and the other ranks in their all-reduce until the collective timed out.
    source = Location(str(tmp_path / "corpus"))
    demo_data.synthetic(source, per_class=4, val_per_class=2, size=(40, 40), classes=2)
    cfg = make_config(tmp_path / "root", source.path, tracking_uri)
    v1 = run_pipeline(cfg, only="shard")["shard"]
    (tmp_path / "corpus" / "train" / v1.manifest["classes"][0] / "broken.jpg").write_bytes(b"not an image")
    v2 = Dataset.open(run_pipeline(cfg, only="shard")["shard"].location)
    empty = [s for s in v2.manifest["shards"] if s["samples"] == 0]
    assert len(empty) == 1 and v2.manifest["counts"]["rejected"] == 1
    assert v2.shard_location(empty[0]) not in v2.shards("train")
    assert v2.shards("train") == [location for location, _ in v2.shard_sizes("train")]
    assert sum(samples for _, samples in v2.shard_sizes("train")) == 2 * 4


def _image(path: Path, color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), color).save(path)


def _pixel(dataset: Dataset, split: str, key: str) -> tuple[int, int, int]:
    """The centre pixel of one stored sample."""
    samples = wds.WebDataset([shard.path for shard in dataset.shards(split)], shardshuffle=False)
    data = next(sample["jpg"] for sample in samples if sample["__key__"] == key)
    return Image.open(io.BytesIO(data)).convert("RGB").getpixel((16, 16))


def test_growth_when_a_key_now_comes_from_another_file(ray_local, tracking_uri, tmp_path):
    """x.png was a duplicate of x.jpg's key a/x; with x.jpg gone a/x is x.png, another image, so the shard that
    holds x.jpg's a/x cannot be kept: the next version is sharded from scratch, with x.png as a/x."""
    source = tmp_path / "corpus"
    for name in ("train/a/x.jpg", "train/a/y.jpg", "val/a/v.jpg"):
        _image(source / name)
    _image(source / "train/a/x.png", (0, 0, 255))
    cfg = make_config(tmp_path / "root", source, tracking_uri)
    v1 = run_pipeline(cfg, only="shard")["shard"]
    assert [item["path"] for item in v1.manifest["rejected"]] == ["train/a/x.png"]
    (source / "train/a/x.jpg").unlink()
    v2 = run_pipeline(cfg, only="shard")["shard"]
    assert v2.manifest["base"] is None
    check_dataset(v2, 3, set())
    red, _, blue = _pixel(Dataset.open(v2.location), "train", "a/x")
    assert blue > 200 and red < 50


def test_growth_reads_a_file_that_is_no_longer_a_duplicate(ray_local, tracking_uri, tmp_path):
    """A rejection of the listing (a duplicate key) is decided again by the new listing; one of reading a file
    (not an image) is kept while the file is listed, and the file is not read again."""
    source = tmp_path / "corpus"
    (source / "train/a").mkdir(parents=True)
    (source / "train/a/x.jpg").write_bytes(b"not a jpeg")
    (source / "train/a/z.jpg").write_bytes(b"not a jpeg either")
    _image(source / "train/a/x.png", (0, 0, 255))
    _image(source / "train/a/y.jpg")
    _image(source / "val/a/v.jpg")
    cfg = make_config(tmp_path / "root", source, tracking_uri)
    v1 = run_pipeline(cfg, only="shard")["shard"]
    assert {item["path"] for item in v1.manifest["rejected"]} == {"train/a/x.jpg", "train/a/x.png", "train/a/z.jpg"}
    (source / "train/a/x.jpg").unlink()
    v2 = run_pipeline(cfg, only="shard")["shard"]
    assert v2.manifest["base"] == v1.fingerprint
    assert v2.manifest["shards"][: len(v1.manifest["shards"])] == v1.manifest["shards"]
    check_dataset(v2, 4, {"train/a/z.jpg"})
    assert v2.manifest["rejected"][0]["reason"] == "not an image"
    red, _, blue = _pixel(Dataset.open(v2.location), "train", "a/x")
    assert blue > 200 and red < 50


def _bmp_bytes(color, size=(40, 40)) -> bytes:
    """An image whose file size depends only on its size, not on its colours: a change in place of the same size."""
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="BMP")
    return out.getvalue()


def _bmp(path: Path, color, size=(40, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_bmp_bytes(color, size))  # truncated and written in place, as an editor or cp would


def _touch_later(path: Path) -> None:
    """A modification time unlike the one before, whatever the filesystem's timestamp resolution."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**10))


@pytest.mark.parametrize("same_size, same_mtime", [(True, False), (False, False), (True, True)],
                         ids=["same size", "other size", "same size and mtime"])
def test_a_sample_changed_in_place_is_sharded_again(ray_local, tracking_uri, tmp_path, same_size, same_mtime):
    """x.bmp is rewritten with another image under the same name: a kept shard would hold the old image, so the
    next version is sharded from scratch (not cached, not grown from v1), with the new image as a/x. Also when
    the rewrite sets the modification time back, as tar -x of a reproducible tar, cp -p or unzip do."""
    source = tmp_path / "corpus"
    for name in ("train/a/x.bmp", "train/a/y.bmp", "val/a/v.bmp"):
        _bmp(source / name, (200, 30, 30))
    cfg = make_config(tmp_path / "root", source, tracking_uri)
    v1 = run_pipeline(cfg, only="shard")["shard"]
    x = source / "train/a/x.bmp"
    before = x.stat()
    _bmp(x, (0, 0, 255), (40, 40) if same_size else (48, 40))
    if same_mtime:
        os.utime(x, ns=(before.st_atime_ns, before.st_mtime_ns))
    else:
        _touch_later(x)
    assert (x.stat().st_size == before.st_size) == same_size
    assert (x.stat().st_mtime_ns == before.st_mtime_ns) == same_mtime
    v2 = run_pipeline(cfg, only="shard")["shard"]
    assert not v2.cached and v2.fingerprint != v1.fingerprint
    assert v2.manifest["base"] is None
    check_dataset(v2, 3, set())
    red, _, blue = _pixel(Dataset.open(v2.location), "train", "a/x")
    assert blue > 200 and red < 50


def test_a_rejected_file_fixed_in_place_is_read_again(ray_local, tracking_uri, tmp_path):
    """A file rejected on reading is not read again while it is listed unchanged; fixed in place (a real image
    under the same name), it is read again, and the version grows from the last one."""
    source = tmp_path / "corpus"
    _bmp(source / "train/a/y.bmp", (200, 30, 30))
    _bmp(source / "val/a/v.bmp", (200, 30, 30))
    (source / "train/a/x.bmp").write_bytes(b"not an image")
    cfg = make_config(tmp_path / "root", source, tracking_uri)
    v1 = run_pipeline(cfg, only="shard")["shard"]
    assert [item["path"] for item in v1.manifest["rejected"]] == ["train/a/x.bmp"]
    _bmp(source / "train/a/x.bmp", (0, 0, 255))
    _touch_later(source / "train/a/x.bmp")
    v2 = run_pipeline(cfg, only="shard")["shard"]
    assert v2.manifest["base"] == v1.fingerprint
    assert v2.manifest["shards"][: len(v1.manifest["shards"])] == v1.manifest["shards"]
    check_dataset(v2, 3, set())
    red, _, blue = _pixel(Dataset.open(v2.location), "train", "a/x")
    assert blue > 200 and red < 50


def _away_while_read(file: Location, execute):
    """The shard stage's `_execute` with `file` gone while the shards are built, after the listing saw it: moved
    away and back locally (its modification time kept), deleted and put again with the same bytes on S3 (its
    ETag kept)."""
    data = file.read_bytes()
    away = f"{file.path}.away"

    def execute_while_away(*args):
        if file.protocol == "file":
            os.rename(file.path, away)
        else:
            file.remove()
        try:
            return execute(*args)
        finally:
            if file.protocol == "file":
                os.rename(away, file.path)
            else:
                file.write_bytes(data)

    return execute_while_away


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_a_file_away_while_read_is_read_again(ray_local, tracking_uri, tmp_path, monkeypatch, request, backend):
    """x.bmp is listed, then not found while its shard is built, then back (on S3 with the same version). Not
    found says nothing of the image: the next version reads it again. w.bmp's rejection (not an image) is about
    its content: carried while w.bmp is unchanged, not read again."""
    if backend == "file":
        source = Location(str(tmp_path / "corpus"))
    else:
        source = Location(request.getfixturevalue("s3_env").uri(f"away-{tmp_path.name}"))
    for name in ("train/a/x.bmp", "train/a/y.bmp", "val/a/v.bmp"):
        (source / name).write_bytes(_bmp_bytes((0, 0, 255)))
    (source / "train/a/w.bmp").write_bytes(b"not an image")
    cfg = make_config(tmp_path / "root", source.uri, tracking_uri)
    with monkeypatch.context() as patch:
        patch.setattr(shard_stage, "_execute", _away_while_read(source / "train/a/x.bmp", shard_stage._execute))
        v1 = run_pipeline(cfg, only="shard")["shard"]
    reasons = {item["path"]: item["reason"] for item in v1.manifest["rejected"]}
    assert reasons.keys() == {"train/a/w.bmp", "train/a/x.bmp"}
    assert reasons["train/a/x.bmp"].startswith("not found: FileNotFoundError")

    (source / "train/a/z.bmp").write_bytes(_bmp_bytes((0, 0, 255)))
    v2 = run_pipeline(cfg, only="shard")["shard"]
    assert v2.manifest["base"] == v1.fingerprint
    check_dataset(v2, 5, {"train/a/w.bmp"})
    new_shards = [s for s in v2.manifest["shards"] if s["dataset"] == v2.fingerprint]
    records = [(v2.location / f"{s['split']}/{s['name'][:-4]}.json").read_json() for s in new_shards]
    assert {path for record in records for path in record["inputs"]} == {"train/a/x.bmp", "train/a/z.bmp"}


def test_a_listed_file_not_there_yet_is_read_once_it_is(ray_local, tracking_uri, tmp_path):
    """A listing file gives no file versions: x.bmp, listed before it was there (an upload not finished), is not
    found; once it is there, the next version (the listing grown by z.bmp) reads it."""
    source = tmp_path / "corpus"
    for name in ("train/a/y.bmp", "val/a/v.bmp"):
        _bmp(source / name, (200, 30, 30))
    listing = tmp_path / "listing.txt"
    listing.write_text("train/a/x.bmp\ntrain/a/y.bmp\nval/a/v.bmp\n")
    cfg = make_config(tmp_path / "root", source, tracking_uri, listing=str(listing))
    v1 = run_pipeline(cfg, only="shard")["shard"]
    assert [(item["path"], item["reason"].split(":")[0]) for item in v1.manifest["rejected"]] == [
        ("train/a/x.bmp", "not found")
    ]
    _bmp(source / "train/a/x.bmp", (0, 0, 255))
    _bmp(source / "train/a/z.bmp", (200, 30, 30))
    listing.write_text(listing.read_text() + "train/a/z.bmp\n")
    v2 = run_pipeline(cfg, only="shard")["shard"]
    assert v2.manifest["base"] == v1.fingerprint
    check_dataset(v2, 4, set())
    red, _, blue = _pixel(Dataset.open(v2.location), "train", "a/x")
    assert blue > 200 and red < 50


def test_verify_accepts_a_class_folder_with_a_dot(ray_local, tracking_uri, tmp_path):
    """A member name is split at the first dot of its base name, as the reader splits it: St.Bernard/1.jpg is
    sample St.Bernard/1, member jpg."""
    source = tmp_path / "corpus"
    _image(source / "train/St.Bernard/1.jpg")
    _image(source / "val/St.Bernard/2.jpg")
    result = run_pipeline(make_config(tmp_path / "root", source, tracking_uri), only="shard")["shard"]
    assert [sample["__key__"] for sample in wds.WebDataset(
        [shard.path for shard in Dataset.open(result.location).shards("train")], shardshuffle=False
    )] == ["St.Bernard/1"]
    assert verify(result.location) == []


def test_verify_finds_damage_and_cli(ray_local, corpus, tracking_uri, tmp_path, capsys):
    result = run_pipeline(make_config(tmp_path / "root", corpus.path, tracking_uri), only="shard")["shard"]
    assert vq2(["verify", result.location.uri]) == 0
    shard = result.location / "train/shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # flip a byte inside the first member's payload
    shard.write_bytes(bytes(data))
    problems = verify(result.location)
    assert any("sha256 differs" in problem for problem in problems)
    assert vq2(["verify", result.location.uri]) == 1
    assert "problems" in capsys.readouterr().out


def test_listing_file_input(ray_local, corpus, tracking_uri, tmp_path):
    listing = tmp_path / "listing.txt"
    wanted = ["train/circle/train-000000.jpg", "val/square/val-000001.jpg"]
    listing.write_text("\n".join(wanted + ["../../etc/passwd", "/abs/x.jpg", "train/circle/missing.jpg"]) + "\n")
    cfg = make_config(tmp_path / "root", corpus.path, tracking_uri, listing=str(listing))
    manifest = run_pipeline(cfg, only="shard")["shard"].manifest
    assert manifest["counts"] == {"inputs": 5, "accepted": 2, "rejected": 3}
    reasons = {item["path"]: item["reason"] for item in manifest["rejected"]}
    assert reasons["../../etc/passwd"] == reasons["/abs/x.jpg"] == "not in <split>/<class>/<file> layout"
    assert reasons["train/circle/missing.jpg"].startswith("not found: FileNotFoundError")


def _no_manifest_under(root) -> bool:
    return not [key for key in Location(str(root)).list_files() if key.endswith(MANIFEST)]


@pytest.mark.parametrize("case", ["missing", "empty", "no val folder", "missing listing"])
def test_a_bad_source_fails_the_stage_naming_it(corpus, tracking_uri, tmp_path, case):
    """A missing, empty or mistyped source would list nothing and make an empty dataset marked complete."""
    source, listing = tmp_path / "corpus", None
    if case == "empty":
        source.mkdir()
    elif case == "no val folder":
        demo_data.synthetic(Location(str(source)), per_class=1, val_per_class=0, size=(32, 32), classes=2)
    elif case == "missing listing":
        source, listing = Path(corpus.path), tmp_path / "listing.txt"
    expected = {
        "missing": f"dataset.source {source}: not found",
        "empty": f"dataset.source {source}: no file in split folder(s) train, val",
        "no val folder": f"dataset.source {source}: no file in split folder(s) val ",
        "missing listing": f"dataset.listing {listing}: not found",
    }[case]
    cfg = make_config(tmp_path / "root", source, tracking_uri, **({"listing": str(listing)} if listing else {}))
    with pytest.raises(StageFailed, match="stage shard failed: SourceError: " + re.escape(expected)):
        run_pipeline(cfg, only="shard")
    assert _no_manifest_under(tmp_path / "root")


def test_a_mistyped_s3_source_fails_the_stage_naming_it(s3_env, tracking_uri, tmp_path):
    source = s3_env.uri("no-such-corpus")
    with pytest.raises(StageFailed, match=re.escape(f"SourceError: dataset.source {source}: not found")):
        run_pipeline(make_config(s3_env.uri("bad-source-root"), source, tracking_uri), only="shard")
    assert not Location(s3_env.uri("bad-source-root")).list_files()


def test_a_listing_under_a_mistyped_source_fails_the_stage(ray_local, corpus, tracking_uri, tmp_path):
    listing = tmp_path / "listing.txt"
    listing.write_text("train/circle/train-000000.jpg\nval/square/val-000001.jpg\n")
    source = f"{corpus.path}-typo"
    cfg = make_config(tmp_path / "root", source, tracking_uri, listing=str(listing))
    expected = f"dataset.source {source}: no usable image in split 'train'; 1 rejected, the first train/circle/"
    with pytest.raises(StageFailed, match=re.escape(expected) + ".*not found"):
        run_pipeline(cfg, only="shard")
    assert _no_manifest_under(tmp_path / "root")


def test_tracking_server_unreachable_does_not_stop_the_stage(ray_local, corpus, tmp_path):
    cfg = make_config(tmp_path / "root", corpus.path, f"http://127.0.0.1:{free_port()}")
    cfg = cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"flush_timeout_s": 1.0})})
    result = run_pipeline(cfg, only="shard")["shard"]
    assert result.manifest["run_id"] is None
    # Everything the stage would have told MLflow is listed: the run's creation, params, tags, metrics.
    calls = [record["call"] for record in result.manifest["tracking_backlog"]]
    assert {"create_experiment", "create_run", "log_batch"} <= set(calls)
    assert verify(result.location) == []


def test_s3_end_to_end_with_real_mlflow_server(ray_local, s3_env, mlflow_server, tmp_path):
    source = Location(s3_env.uri("corpus"))
    demo_data.synthetic(source, per_class=6, val_per_class=2, size=(40, 40), classes=3, with_bad_files=True)
    cfg = make_config(s3_env.uri("root"), source.uri, mlflow_server)
    result = run_pipeline(cfg, only="shard")["shard"]
    assert result.location.uri == s3_env.uri(f"root/shard/{result.fingerprint}")
    check_dataset(result, 3 * 8 + len(demo_data.bad_files(8, 8)), BAD_REJECTED)
    assert result.manifest["tracking_backlog"] == []
    listed = Location(s3_env.uri("root")).list_files()
    assert not [key for key in listed if ".tmp" in key]

    again = run_pipeline(cfg, only="shard")["shard"]
    assert again.cached and Location(s3_env.uri("root")).list_files() == listed

    # An image rewritten in place with other bytes of the same length: the object's ETag tells.
    changed = source / next(path for path in source.list_files() if path.startswith("train/") and path.endswith(".jpg"))
    data = bytearray(changed.read_bytes())
    at = next(i for i in range(len(data) // 2, len(data)) if data[i] not in (0xFE, 0xFF))
    data[at] ^= 0x01
    changed.write_bytes(bytes(data))
    rewritten = run_pipeline(cfg, only="shard")["shard"]
    assert not rewritten.cached and rewritten.manifest["base"] is None

    # Nothing about credentials reaches MLflow.
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.manifest["run_id"])
    recorded = str(run.data.params) + str(run.data.tags)
    recorded += open(
        client.download_artifacts(run.data.tags["mlflow.parentRunId"], "config.yaml", str(tmp_path))
    ).read()
    assert s3_env.secret not in recorded and s3_env.key not in recorded


def is_record(key: str) -> bool:
    """A finished shard's record (`<shard>.json`), not the stage's lease (`lease.json`)."""
    return key.endswith(".json") and not key.endswith(LEASE)


@pytest.mark.slow
def test_driver_killed_mid_run_then_rerun_writes_only_the_rest(ray_local, tracking_uri, tmp_path):
    source = Location(str(tmp_path / "corpus"))
    demo_data.synthetic(source, per_class=60, val_per_class=0, size=(300, 260), classes=4)
    cfg = make_config(tmp_path / "root", source.path, tracking_uri, splits=["train"], shard_size=4)
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(to_yaml(cfg))
    # The driver joins this test's Ray, so killing it leaves no Ray processes behind.
    address = ray.get_runtime_context().gcs_address
    command = [str(BIN / "vq2"), "shard", "--config", str(config_file), f"ray.address={address}", "ray.num_workers=1"]
    with open(tmp_path / "driver.log", "wb") as log:
        driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    shards = Location(str(tmp_path / "root/shard"))
    deadline = time.monotonic() + 120
    try:
        while sum(is_record(key) for key in shards.list_files()) < 3:
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no shard finished in 120 s"
            time.sleep(0.05)
    finally:
        driver.kill()
        driver.wait()
    files = snapshot(shards)
    assert not any(key.endswith(MANIFEST) for key in files)
    # Complete shards (tar and record) must survive as they are; a tar without its record is redone.
    done = [key[: -len(".json")] for key in files if is_record(key)]
    survivors = {key: files[key] for stem in done for key in (f"{stem}.json", f"{stem}.tar")}

    result = run_pipeline(cfg, only="shard")["shard"]
    after = snapshot(result.location)
    assert all(after[key.split("/", 1)[1]] == value for key, value in survivors.items())  # kept, not rewritten
    assert len(result.manifest["shards"]) == 60 and result.manifest["counts"]["accepted"] == 240
    assert verify(result.location) == []
