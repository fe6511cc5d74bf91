"""The encode stage on real Ray and real storage (a local folder and the SeaweedFS S3 server): row counts,
schema, decodability, caching, crash resume, and schema validation on read."""

import io
import json
import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from pipeline import demo_data
from pipeline.checkpoints import load_model
from pipeline.codes import METADATA_KEY, CodesLayout, CodesSchemaError, codes_table, read_codes, table_tensors, write_codes
from pipeline.config import parse_config
from pipeline.dataset import Dataset
from pipeline.encode import code_files, ray_dataset, read_split
from pipeline.runner import run_pipeline
from pipeline.shard_reader import batch_loader, to_model_range
from pipeline.storage import Location

# 8 classes x 12 train / 4 val images at 20 a shard: 5 train shards, 2 val shards.
PER_CLASS, VAL_PER_CLASS, SHARD_SIZE = 12, 4, 20
ENCODE_BATCH = 8


def make_config(root, corpus: Location, tracking_uri: str, **encode):
    tree = {
        "storage": {"root": str(root)},
        "dataset": {"source": corpus.uri, "image_size": 32, "shard_size": SHARD_SIZE},
        "ray": {"num_workers": 2},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "encode-tests", "request_retries": 0},
        "train_vqvae": {
            "num_workers": 1, "batch_size": 16, "steps": 5, "checkpoint_every": 5, "validate_every": 5,
            "log_every": 5, "loader_workers": 0, "shuffle_buffer": 0, "val_samples": 16,
        },
        "encode": {"num_actors": 2, "batch_size": ENCODE_BATCH} | encode,
    }
    return parse_config(tree, "test.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _ray_session, s3_server):
    """A sharded corpus and a (barely) trained VQ-VAE on a local root, made once for this module."""
    if not ray.is_initialized():  # as the ray_local fixture does, at module scope
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": s3_server.env})
    folder = tmp_path_factory.mktemp("encode")
    corpus = Location(str(folder / "corpus"))
    demo_data.synthetic(corpus, PER_CLASS, VAL_PER_CLASS, size=(32, 32))
    tracking_uri = f"sqlite:///{folder}/mlflow.db"
    cfg = make_config(folder / "root", corpus, tracking_uri)
    run_pipeline(cfg, only="shard")
    results = run_pipeline(cfg, only="train_vqvae")
    return {"folder": folder, "corpus": corpus, "tracking_uri": tracking_uri, "results": results}


@pytest.fixture(scope="module")
def encoded(trained):
    """The encode stage run once on the local root (2 actors)."""
    cfg = make_config(trained["folder"] / "root", trained["corpus"], trained["tracking_uri"])
    return run_pipeline(cfg, only="encode")["encode"]


def expected_schema(layout: CodesLayout) -> pa.Schema:
    (th, tw), (bh, bw) = layout.grids
    return pa.schema([
        pa.field("key", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("top", pa.list_(pa.int16(), th * tw), nullable=False),
        pa.field("bottom", pa.list_(pa.int16(), bh * bw), nullable=False),
    ])


def check_output(result, shard_result, vqvae_result) -> None:
    """Rows per split and per file match the shard manifest; schema, compression and metadata as DESIGN.md."""
    shards = shard_result.manifest["shards"]
    manifest = result.manifest
    assert manifest["splits"] == shard_result.manifest["splits"] == {"train": 8 * PER_CLASS, "val": 8 * VAL_PER_CLASS}
    for split in ("train", "val"):
        files, layout = code_files(result, split)
        split_shards = [s for s in shards if s["split"] == split]
        assert len(files) == len(split_shards)
        assert [e["rows"] for e in manifest["files"][split]] == [s["samples"] for s in split_shards]
        keys = []
        for file in files:
            with file.fs.open(file.path, "rb") as stream:
                parquet = pq.ParquetFile(stream)
                schema = parquet.schema_arrow
                compressions = {parquet.metadata.row_group(0).column(i).compression for i in range(4)}
                table = parquet.read()
            assert schema.remove_metadata() == expected_schema(layout)
            assert compressions == {"ZSTD"}
            meta = json.loads(schema.metadata[METADATA_KEY])
            assert meta["grids"] == [[4, 4], [8, 8]] and meta["codebook_sizes"] == [64, 64]
            assert meta["vqvae_model"] == (vqvae_result.location / "vqvae.pt").uri
            assert meta["vqvae_fingerprint"] == vqvae_result.fingerprint
            keys += table.column("key").to_pylist()
        assert len(keys) == len(set(keys)) == manifest["splits"][split]  # every sample exactly once


@pytest.mark.slow
def test_encode_local_counts_schema_and_tracking(encoded, trained):
    results = trained["results"]
    assert not encoded.cached and encoded.location.uri.startswith(str(trained["folder"]))
    check_output(encoded, results["shard"], results["train_vqvae"])
    manifest = encoded.manifest
    assert manifest["shards_encoded"] == 7 and manifest["shards_resumed"] == 0
    assert manifest["layout"]["vqvae_fingerprint"] == results["train_vqvae"].fingerprint
    assert 0 < manifest["val_recon_mse"] < 4 and manifest["images_per_s"] > 0
    # The reconstruction error of the val split agrees with train_vqvae's own validation (its first 16 images).
    assert manifest["val_recon_mse"] == pytest.approx(results["train_vqvae"].manifest["metrics"]["val_mse"], rel=0.5)

    client = MlflowClient(trained["tracking_uri"])
    run = client.get_run(manifest["run_id"])
    for name in ("encode_images_per_s", "val_recon_mse", "code_usage_level0", "code_usage_level1",
                 "code_perplexity_level0", "code_perplexity_level1"):
        assert name in run.data.metrics, name
    assert 0 < run.data.metrics["code_usage_level1"] <= 1
    assert run.data.metrics["val_recon_mse"] == pytest.approx(manifest["val_recon_mse"])
    pngs = [a.path for a in client.list_artifacts(run.info.run_id, "code_usage")]
    assert pngs == ["code_usage/level0_top.png", "code_usage/level1_bottom.png"]


@pytest.mark.slow
def test_later_stages_read_a_split_with_ray_data(encoded):
    dataset, layout = ray_dataset(encoded, "train")  # what the prior stage streams
    batches = list(dataset.iter_batches(batch_size=32, batch_format="pyarrow"))  # one pass over the split
    assert sum(len(batch) for batch in batches) == 8 * PER_CLASS
    labels, codes = table_tensors(batches[0], layout)
    assert labels.shape == (32,) and [c.dtype for c in codes] == [torch.int16, torch.int16]
    assert [tuple(c.shape) for c in codes] == [(32, 4, 4), (32, 8, 8)]


@pytest.mark.slow
def test_codes_decode_to_the_vqvae_reconstruction(encoded, trained):
    layout, table = read_split(encoded, "val")
    model, _ = load_model(Location(layout.vqvae_model), "vqvae")
    _, codes = table_tensors(table, layout)
    row_of = {key: i for i, key in enumerate(table.column("key").to_pylist())}
    dataset = Dataset.open(trained["results"]["shard"].location)
    checked = 0
    for keys, images, labels in batch_loader(dataset.shards("val"), ENCODE_BATCH, repeat=False):
        x = to_model_range(images)
        expected = model.encode(x)
        rows = torch.tensor([row_of[key] for key in keys])
        stored = [level[rows].long() for level in codes]
        assert torch.equal(table_tensors(table.take(pa.array(rows.numpy())), layout)[0], labels)
        for got, want in zip(stored, expected):
            assert torch.equal(got, want)
        assert torch.allclose(model.decode_codes(stored), model.decode_codes(expected), atol=1e-6)
        checked += len(keys)
    assert checked == len(table) == 8 * VAL_PER_CLASS


@pytest.mark.slow
def test_rerun_is_cached_and_writes_nothing(encoded, trained):
    before = {key: os.stat(os.path.join(encoded.location.path, key)).st_mtime_ns for key in encoded.location.list_files()}
    cfg = make_config(trained["folder"] / "root", trained["corpus"], trained["tracking_uri"])
    again = run_pipeline(cfg, only="encode")["encode"]
    assert again.cached and again.fingerprint == encoded.fingerprint
    after = {key: os.stat(os.path.join(encoded.location.path, key)).st_mtime_ns for key in encoded.location.list_files()}
    assert after == before


@pytest.mark.slow
def test_encode_on_the_s3_server_and_resume_after_a_crash(trained, s3_env):
    # The upstream outputs copied to the S3 root under the same fingerprints: the encode stage reads
    # the tars and the model from S3 and writes its tables there.
    results = trained["results"]
    root = Location(s3_env.uri("encode-test"))
    for stage in ("shard", "train_vqvae"):
        source = results[stage].location
        for key in source.list_files():
            if not key.startswith("ray_train/"):
                (root / stage / results[stage].fingerprint / key).write_bytes((source / key).read_bytes())
    cfg = make_config(root.uri, trained["corpus"], trained["tracking_uri"])
    first = run_pipeline(cfg, only="encode")["encode"]
    assert first.location.uri.startswith("s3://") and not first.cached
    assert first.manifest["layout"]["vqvae_model"].startswith("s3://")
    assert first.manifest["shards_encoded"] == 7

    client, prefix = s3_env.client(), f"encode-test/encode/{first.fingerprint}/"

    def objects() -> dict[str, tuple]:
        found = client.list_objects_v2(Bucket=s3_env.bucket, Prefix=prefix)["Contents"]
        return {o["Key"][len(prefix):]: (o["ETag"], o["LastModified"]) for o in found}

    listed = objects()
    assert sorted(k for k in listed if k.endswith(".parquet")) == sorted(
        e["file"] for split in ("train", "val") for e in first.manifest["files"][split])

    # A crash: one shard's table lost and no manifest yet. The rerun encodes that shard alone.
    lost = first.manifest["files"]["train"][1]["file"]
    (first.location / lost).remove()
    (first.location / "manifest.json").remove()
    time.sleep(1.1)  # S3 LastModified has 1 s resolution: a rewritten object would show a later time
    second = run_pipeline(cfg, only="encode")["encode"]
    assert not second.cached and second.fingerprint == first.fingerprint
    assert second.manifest["shards_encoded"] == 1 and second.manifest["shards_resumed"] == 6
    assert second.manifest["files"] == first.manifest["files"]
    assert second.manifest["val_recon_mse"] == pytest.approx(first.manifest["val_recon_mse"])
    redone = {lost, "stats/" + lost.replace(".parquet", ".json"), "manifest.json"}
    after = objects()
    assert set(after) == set(listed)
    for key in set(listed) - redone:  # nothing else was rewritten
        assert after[key] == listed[key], key
    assert after[lost][1] > listed[lost][1]

    s3_results = run_pipeline(cfg, only="encode")  # cached now; the upstream results as read from S3
    assert s3_results["encode"].cached
    check_output(second, s3_results["shard"], s3_results["train_vqvae"])


# ----------------------------------------------------------------------------------- schema validation

LAYOUT = CodesLayout(grids=[(2, 2), (4, 4)], codebook_sizes=[8, 8], vqvae_model="s3://b/vqvae.pt", vqvae_fingerprint="f")


def _table() -> pa.Table:
    codes = [torch.randint(0, 8, (3, 2, 2)), torch.randint(0, 8, (3, 4, 4))]
    return codes_table(["a/1", "a/2", "b/3"], [0, 0, 1], codes, LAYOUT)


def _write_raw(location: Location, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    location.write_bytes(buffer.getvalue())


def test_code_table_round_trip(tmp_path):
    file = Location(str(tmp_path / "codes.parquet"))
    table = _table()
    write_codes(file, table)
    layout, read = read_codes(file)
    assert layout == LAYOUT and read.equals(table)
    labels, codes = table_tensors(read, layout)
    assert labels.tolist() == [0, 0, 1] and codes[1].dtype == torch.int16 and codes[1].shape == (3, 4, 4)


def test_wrong_schema_or_missing_level_is_rejected(tmp_path):
    table = _table()
    wrong_type = tmp_path / "wrong-type.parquet"
    field = pa.field("label", pa.int64(), nullable=False)
    _write_raw(Location(str(wrong_type)), table.set_column(1, field, table.column("label").cast(pa.int64())))
    with pytest.raises(CodesSchemaError, match=rf"{wrong_type}: column 'label' is int64, expected int32"):
        read_codes(Location(str(wrong_type)))

    missing = tmp_path / "missing-level.parquet"
    _write_raw(Location(str(missing)), table.drop_columns(["bottom"]).replace_schema_metadata(table.schema.metadata))
    with pytest.raises(CodesSchemaError, match=rf"{missing}: missing column 'bottom'"):
        read_codes(Location(str(missing)))

    wrong_length = tmp_path / "wrong-grid.parquet"
    flat = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(3 * 8, np.int16)), 8)
    bad = table.set_column(3, pa.field("bottom", flat.type, nullable=False), flat)
    _write_raw(Location(str(wrong_length)), bad.replace_schema_metadata(table.schema.metadata))
    with pytest.raises(CodesSchemaError, match=rf"{wrong_length}: column 'bottom' is fixed_size_list<\w+: int16>\[8\], expected .*\[16\]"):
        read_codes(Location(str(wrong_length)))

    foreign = tmp_path / "foreign.parquet"
    _write_raw(Location(str(foreign)), table.replace_schema_metadata({}))
    with pytest.raises(CodesSchemaError, match="no vq2.codes metadata"):
        read_codes(Location(str(foreign)))


@pytest.mark.slow
def test_tampered_encode_output_is_rejected_by_code_files(encoded, tmp_path):
    copy = tmp_path / "encode"
    shutil.copytree(encoded.location.path, copy)
    entry = encoded.manifest["files"]["val"][0]
    _, table = read_codes(Location(str(copy / entry["file"])))
    _write_raw(Location(str(copy / entry["file"])),
               table.drop_columns(["top"]).replace_schema_metadata(table.schema.metadata))
    assert code_files(Location(str(copy)), "train")[0]  # the other split is untouched
    with pytest.raises(CodesSchemaError, match=rf"{copy / entry['file']}: missing column 'top'"):
        code_files(Location(str(copy)), "val")
