"""The encode stage on real Ray and real storage (a local folder and the SeaweedFS S3 server): row counts,
schema, decodability, caching, crash resume, and schema validation on read."""

import dataclasses
import io
import json
import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import encode
from pipeline.checkpoints import load_model
from pipeline.codes import METADATA_KEY, CodesLayout, CodesSchemaError, codes_table, read_codes, table_tensors, write_codes
from pipeline.dataset import Dataset
from pipeline.encode import code_files, ray_dataset, read_split
from pipeline.config import to_yaml
from pipeline.runner import StageResult, run_pipeline, run_stage
from pipeline.shard_reader import batch_loader, to_model_range
from pipeline.storage import Location
from pipeline.tracking import Tracker, ended_status

# The session's tiny pipeline: 8 classes x 24 train / 4 val images at 64 a shard, 3 train shards and 1 val shard.
PER_CLASS, VAL_PER_CLASS, SHARDS = 24, 4, 4
DECODE_BATCH = 8


@pytest.fixture(scope="module")
def trained(tiny_pipeline) -> dict:
    """The shard and train_vqvae results of the session's tiny pipeline (reused, not retrained)."""
    return run_pipeline(tiny_pipeline.config(), only="train_vqvae")


@pytest.fixture(scope="module")
def encoded(tiny_pipeline):
    """The encode stage of the tiny pipeline (2 actors, on its local root)."""
    return run_pipeline(tiny_pipeline.config(), only="encode")["encode"]


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
def test_encode_local_counts_schema_and_tracking(encoded, trained, tiny_pipeline):
    assert encoded.location.uri.startswith(tiny_pipeline.root)
    check_output(encoded, trained["shard"], trained["train_vqvae"])
    manifest = encoded.manifest
    assert manifest["shards_encoded"] == SHARDS and manifest["shards_resumed"] == 0
    assert manifest["layout"]["vqvae_fingerprint"] == trained["train_vqvae"].fingerprint
    assert 0 < manifest["val_recon_mse"] < 4 and manifest["images_per_s"] > 0
    # The reconstruction error of the val split agrees with train_vqvae's own validation (its first 16 images).
    assert manifest["val_recon_mse"] == pytest.approx(trained["train_vqvae"].manifest["metrics"]["val_mse"], rel=0.5)

    client = MlflowClient(tiny_pipeline.tracking_uri)
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
    dataset = Dataset.open(trained["shard"].location)
    checked = 0
    for keys, images, labels in batch_loader(dataset.shards("val"), DECODE_BATCH, repeat=False):
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
def test_rerun_is_cached_and_writes_nothing(encoded, tiny_pipeline):
    before = {key: os.stat(os.path.join(encoded.location.path, key)).st_mtime_ns for key in encoded.location.list_files()}
    again = run_pipeline(tiny_pipeline.config(), only="encode")["encode"]
    assert again.cached and again.fingerprint == encoded.fingerprint
    after = {key: os.stat(os.path.join(encoded.location.path, key)).st_mtime_ns for key in encoded.location.list_files()}
    assert after == before


@pytest.mark.slow
def test_encode_on_the_s3_server_and_resume_after_a_crash(trained, tiny_pipeline, s3_env):
    # The upstream outputs copied to the S3 root under the same fingerprints: the encode stage reads
    # the tars and the model from S3 and writes its tables there.
    root = Location(s3_env.uri("encode-test"))
    for stage in ("shard", "train_vqvae"):
        source = trained[stage].location
        for key in source.list_files():
            if not key.startswith("ray_train/"):
                (root / stage / trained[stage].fingerprint / key).write_bytes((source / key).read_bytes())
    cfg = tiny_pipeline.config(storage={"root": root.uri})
    first = run_pipeline(cfg, only="encode")["encode"]
    assert first.location.uri.startswith("s3://") and not first.cached
    assert first.manifest["layout"]["vqvae_model"].startswith("s3://")
    assert first.manifest["shards_encoded"] == SHARDS

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
    assert second.manifest["shards_encoded"] == 1 and second.manifest["shards_resumed"] == SHARDS - 1
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


def _made_by_another_vqvae(file: Location) -> None:
    """Rewrite a code table as if a VQ-VAE of another fingerprint (the same grids and codebooks) had made it."""
    layout, table = read_codes(file)
    write_codes(file, table.replace_schema_metadata(dataclasses.replace(layout, vqvae_fingerprint="another")
                                                    .schema().metadata))


def _encode_stage(cfg, upstream: dict) -> StageResult:
    """The encode stage on hand-picked upstream results (a dataset version run_pipeline would not choose)."""
    tracker, error = Tracker(cfg), None
    tracker.start_pipeline("run", to_yaml(cfg))
    try:
        return run_stage(encode, cfg, tracker, upstream)
    except BaseException as caught:
        error = caught
        raise
    finally:
        tracker.finish_pipeline(ended_status(error))


@pytest.mark.slow
def test_a_root_reached_by_another_path_copies_and_resumes_tables_of_the_same_codes(trained, tiny_pipeline, tmp_path):
    # The upstream outputs copied to a root of their own, reached later through a symlink as well: every
    # fingerprint is the same by either path, the model's URI is not.
    real, link = tmp_path / "real", tmp_path / "link"
    shard, vqvae = trained["shard"], trained["train_vqvae"]
    for result in (shard, vqvae):
        shutil.copytree(result.location.path, real / result.name / result.fingerprint,
                        ignore=shutil.ignore_patterns("ray_train"))
    link.symlink_to(real)
    first = run_pipeline(tiny_pipeline.config(storage={"root": str(real)}), only="encode")["encode"]
    assert first.manifest["shards_encoded"] == SHARDS

    # A grown version of the dataset (its shards are the first version's), encoded through the link: the
    # earlier tables are copied, but for one made by another VQ-VAE, which is encoded again.
    root = Location(str(link))
    grown = StageResult("shard", "grown", root / "shard" / "grown",
                        shard.manifest | {"fingerprint": "grown", "base": shard.fingerprint}, True)
    (grown.location / "manifest.json").write_json(grown.manifest)
    upstream = {"shard": grown, "train_vqvae": dataclasses.replace(
        vqvae, location=root / "train_vqvae" / vqvae.fingerprint)}
    _made_by_another_vqvae(first.location / first.manifest["files"]["train"][-1]["file"])
    cfg = tiny_pipeline.config(storage={"root": root.uri})
    second = _encode_stage(cfg, upstream)
    assert second.location.uri.startswith(root.uri)
    assert second.manifest["shards_reused"] == SHARDS - 1 and second.manifest["shards_encoded"] == 1
    assert second.manifest["layout"]["vqvae_model"] == (upstream["train_vqvae"].location / "vqvae.pt").uri
    assert len(code_files(second, "train")[0]) == SHARDS - 1  # the copies' footers name the model by the real path

    # A crash, with a table in the output made by another VQ-VAE: the rerun resumes the others and makes that
    # one again (copied from the first version, which has it).
    (second.location / "manifest.json").remove()
    foreign = second.location / second.manifest["files"]["val"][0]["file"]
    _made_by_another_vqvae(foreign)
    third = _encode_stage(cfg, upstream)
    assert third.manifest["shards_resumed"] == SHARDS - 1 and third.manifest["shards_reused"] == 1
    assert third.manifest["files"] == second.manifest["files"]
    assert read_codes(foreign)[0].vqvae_fingerprint == vqvae.fingerprint
    assert read_split(third, "val")[1].num_rows == 8 * VAL_PER_CLASS


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
