"""Operating the pipeline: status, run comparison, failures that name their stage, reruns on a grown corpus."""

import re
import socket
import subprocess
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from jobs.cli import main as vq2
from pipeline import demo_data
from pipeline.compare import PipelineRun, compare, differing_params
from pipeline.config import parse_config
from pipeline.lease import Lease
from pipeline.runner import StageFailed, pipeline_status, run_pipeline
from pipeline.storage import Location


def test_status_reports_complete_running_partial_and_missing(tiny_pipeline):
    cfg = tiny_pipeline.config(sample={"seed": 12345})  # a sample version no test runs
    rows = {row["stage"]: row for row in pipeline_status(cfg)}
    assert [rows[s]["state"] for s in ("shard", "train_vqvae", "encode", "train_classifier")] == ["complete"] * 4
    assert rows["shard"]["run_id"] and rows["train_vqvae"]["output"].endswith(rows["train_vqvae"]["fingerprint"])
    assert rows["sample"]["state"] == "missing"

    # A crashed run leaves files without a manifest: partial, and a rerun resumes it.
    leftover = Location(rows["sample"]["output"]) / "codes" / "batch-000000.parquet"
    leftover.write_bytes(b"x")
    lease = Lease(Location(rows["sample"]["output"]), ttl_s=60)
    try:
        assert {row["stage"]: row for row in pipeline_status(cfg)}["sample"]["state"] == "partial"
        assert lease.try_acquire() is None  # another run works on it
        sample = {row["stage"]: row for row in pipeline_status(cfg)}["sample"]
        assert sample["state"] == "running" and sample["lease_owner"] == lease.owner
    finally:
        lease.release()
    # A lease whose holder ran on this machine and whose process is gone is no run, however long it had to go.
    dead = subprocess.Popen(["true"])
    dead.wait()
    (Location(rows["sample"]["output"]) / "lease.json").write_json(
        {"owner": "a killed run", "expires": time.time() + 3600, "ttl_s": 3600, "host": socket.gethostname(),
         "pid": dead.pid})
    try:
        assert {row["stage"]: row for row in pipeline_status(cfg)}["sample"]["state"] == "partial"
    finally:
        leftover.parent.remove()
        (Location(rows["sample"]["output"]) / "lease.json").remove()


def test_differing_params_ignore_stages_a_run_skipped():
    runs = [
        PipelineRun("a", "a", 1, "FINISHED", params={"train_vqvae.lr": "0.1", "dataset.shard_size": "64"}),
        PipelineRun("b", "b", 2, "FINISHED", params={"train_vqvae.lr": "0.2", "dataset.shard_size": "64"}),
        PipelineRun("c", "c", 3, "FINISHED", params={"dataset.shard_size": "64"}),  # ran only the shard stage
    ]
    assert differing_params(runs) == ["train_vqvae.lr"]


def test_compare_reads_the_runs_back_from_mlflow(tiny_pipeline, tmp_path, capsys):
    comparison = compare(tiny_pipeline.tracking_uri, "tiny-pipeline", ["val_mse", "val_top1"])
    table, report, png = comparison.table, comparison.report, comparison.chart
    lines = table.splitlines()
    assert lines[0].startswith("| run | status |") and "val_mse" in lines[0]
    header = lines[0].strip("| ").split(" | ")
    rows = [line[2:-2].split(" | ") for line in lines[2:]]
    assert len(rows) >= 4 and all(row[0].startswith("tiny-test: run (") for row in rows)
    column = header.index("val_mse")
    val_mse = [float(row[column]) for row in rows if row[column]]  # the train_vqvae run and those reusing it
    assert val_mse and all(0 < v < 1 for v in val_mse)
    assert report.startswith("<!doctype html>") and png.startswith(b"\x89PNG")

    out = tmp_path / "report.html"
    code = vq2(["compare", "--experiment", "tiny-pipeline", "--tracking-uri", tiny_pipeline.tracking_uri,
                "--metric", "val_mse", "--out", str(out)])
    assert code == 0 and out.exists() and out.with_suffix(".png").exists()
    assert "val_mse" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no MLflow experiment 'nope'"):
        compare(tiny_pipeline.tracking_uri, "nope")


def test_a_failing_stage_is_named_and_earlier_stages_stay_reusable(tiny_pipeline, tmp_path, capsys):
    tree = yaml.safe_load(tiny_pipeline.config().model_dump_json())
    tree["train_prior"]["num_workers"] = 9
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert vq2(["train_prior", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "stage train_prior failed: ValueError: train_prior.num_workers=9" in err
    assert "completed stages (reused by a rerun, which resumes train_prior): shard, train_vqvae, encode" in err
    client = MlflowClient(tiny_pipeline.tracking_uri)
    (failed,) = client.search_runs([client.get_experiment_by_name("tiny-pipeline").experiment_id],
                                   "tags.stage = 'train_prior'", order_by=["attributes.start_time DESC"], max_results=1)
    assert failed.info.status == "FAILED"
    assert client.get_run(failed.data.tags["mlflow.parentRunId"]).info.status == "FAILED"


@pytest.mark.slow
def test_nightly_reruns_resume_a_crashed_training_and_shard_only_the_new_images_of_a_grown_corpus(
        ray_local, tmp_path, monkeypatch):
    corpus = Location(str(tmp_path / "corpus"))
    demo_data.synthetic(corpus, 8, 2, size=(32, 32), classes=4)

    def config(policy):
        tree = {
            "storage": {"root": str(tmp_path / "root")},
            "dataset": {"source": corpus.uri, "image_size": 32, "shard_size": 16},
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "growth"},
            "policy": {"on_new_data": policy},
            "train_vqvae": {"num_workers": 1, "batch_size": 8, "steps": 12, "checkpoint_every": 6, "validate_every": 6,
                            "max_failures": 0, "loader_workers": 1, "val_samples": 8},  # with a loading process
            "encode": {"num_actors": 1},
        }
        return parse_config(tree, "growth.yaml")

    # One night the VQ-VAE's worker dies at step 11, and with no restart allowed the stage fails; the next
    # night's rerun resumes it from its checkpoint of step 6. (A worker restarted within a run by Ray Train:
    # test_train_prior.py, on the same Ray Train set-up, pipeline/training.py.) The steps between checkpoint
    # and death give Ray Train's controller time to take the checkpoint's report: one reported just before a
    # worker dies may be lost, and the run then resumes from the one before it.
    marker = tmp_path / "killed"
    monkeypatch.setenv("VQ2_FAULT_INJECT", f"train_vqvae:11:0:{marker}")
    with pytest.raises(StageFailed, match="^stage train_vqvae failed"):
        run_pipeline(config("encode"), until="encode")
    assert marker.exists()
    first = run_pipeline(config("encode"), until="encode")
    trained = first["train_vqvae"].manifest
    assert trained["steps"] == 12 and trained["metrics"]["resumed_from"] == 6

    # Then the corpus grows by 16 training images.
    demo_data.synthetic(corpus, 4, 0, size=(32, 32), classes=4, first_index=8)
    grown = run_pipeline(config("encode"), until="encode")

    old, new = first["shard"].manifest, grown["shard"].manifest
    assert new["base"] == first["shard"].fingerprint
    assert new["shards"][: len(old["shards"])] == old["shards"]  # old shards kept, not rewritten
    assert {s["dataset"] for s in new["shards"][len(old["shards"]):]} == {grown["shard"].fingerprint}
    assert new["splits"]["train"] == old["splits"]["train"] + 16
    # encode policy: the VQ-VAE is not retrained; the new images are encoded with it.
    assert grown["train_vqvae"].cached and grown["train_vqvae"].fingerprint == first["train_vqvae"].fingerprint
    assert not grown["encode"].cached
    assert sum(f["rows"] for f in grown["encode"].manifest["files"]["train"]) == new["splits"]["train"]
    # ... and only the new ones: the old shards' code tables are copied from the first encode output.
    assert grown["encode"].manifest["shards_reused"] == len(old["shards"])
    assert grown["encode"].manifest["shards_encoded"] == len(new["shards"]) - len(old["shards"])
    for entry in first["encode"].manifest["files"]["train"]:
        copied = (grown["encode"].location / entry["file"]).read_bytes()
        assert copied == (first["encode"].location / entry["file"]).read_bytes()

    # retrain policy: the VQ-VAE of the grown dataset is a new, not yet trained, version.
    rows = {row["stage"]: row for row in pipeline_status(config("retrain"))}
    assert rows["shard"]["state"] == "complete"
    assert rows["train_vqvae"]["state"] == "missing"
    assert rows["train_vqvae"]["fingerprint"] != first["train_vqvae"].fingerprint


def test_bad_command_line_input_is_one_line_and_a_non_zero_exit(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        vq2(["run", "--config", "configs/tiny.yaml", "--until", "nostage"])
    assert stopped.value.code == 2
    assert "invalid choice: 'nostage'" in capsys.readouterr().err
    assert vq2(["verify", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no manifest.json; not a complete dataset" in err
    (tmp_path / "broken.yaml").write_text("storage: [unclosed\n")
    for config in (tmp_path / "broken.yaml", tmp_path / "absent.yaml"):
        assert vq2(["run", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"vq2: {config}: cannot read config") and err.count("\n") == 1
    missing_source = tmp_path / "missing-source.yaml"
    missing_source.write_text(f"storage: {{root: {tmp_path / 'root'}}}\ndataset: {{source: {tmp_path / 'nowhere'}}}\n")
    assert vq2(["status", "--config", str(missing_source)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"dataset.source {tmp_path / 'nowhere'}: not found" in err


def test_verify_of_what_is_not_a_dataset_folder_is_one_line_and_exit_2(tmp_path, capsys):
    """A dataset's manifest file given for its folder (was a NotADirectoryError traceback), an unknown protocol
    (was retried for half a minute as a transient error), a manifest of another stage's output."""
    folder = tmp_path / "not-a-dataset"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"stage": "encode"}')
    cases = {str(folder / "manifest.json"): "Not a directory", "nosuch://bucket/x": "Protocol not known: nosuch",
             str(folder): "not a dataset (its manifest has no 'shards')"}
    for uri, reason in cases.items():
        assert vq2(["verify", uri]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"vq2 verify: {uri}: ") and captured.err.count("\n") == 1, captured.err
        assert reason in captured.err and "transient" not in captured.err and not captured.out


def test_a_stage_run_alone_before_its_input_exists_says_in_one_line_what_makes_it(tmp_path, capsys):
    demo_data.synthetic(Location(str(tmp_path / "corpus")), 1, 1, size=(8, 8), classes=2)
    config = tmp_path / "fresh.yaml"
    config.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path / "root")},
                                      "dataset": {"source": str(tmp_path / "corpus")}}))
    assert vq2(["encode", "--config", str(config), "dataset.shard_size=5"]) == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("vq2")]
    assert "Traceback" not in err
    shard = tmp_path / "root" / "shard"
    assert re.fullmatch(rf"vq2 encode: it reads the shard output {shard}/[0-9a-f]{{16}}, which is not complete; make it "
                        rf"first: vq2 run --config {config} --until shard dataset.shard_size=5", line), line
