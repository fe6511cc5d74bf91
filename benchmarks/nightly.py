"""A week of nights: the tiny pipeline as seven scheduled reruns on an S3 server, with what nights bring.

    .venv/bin/python benchmarks/nightly.py            # about 15 minutes on 2 cores
    .venv/bin/python benchmarks/nightly.py --keep DIR # keep the storage, logs and MLflow database in DIR

Each night is one `vq2 run` (a fresh process with its own local Ray, as cron would start it) against a
SeaweedFS S3 server and an `mlflow server`, both started here as the tests start them, under the
`policy.on_new_data: encode` policy of a growing corpus:

    1  first run                            every stage runs
    2  nothing changed                      every stage cached
    3  the corpus grows                     shard, encode, evaluate
    4  the corpus grows, storage is flaky   shard, encode, evaluate through 503 SlowDown, expired tokens and
                                            reset connections (a fault-injecting proxy in front of S3)
    5  the corpus grows, the driver is      shard finishes, then the driver and its Ray are SIGKILLed
       killed (SIGKILL) during encode       while encode runs
    6  nothing new                          encode resumes, evaluate; night 5's runs are ended FAILED
    7  the code of one stage changes        evaluate (its code digest changed), nothing else

At the end it checks what the issue asks: every listed image is in exactly one shard or in the rejects
(and the rejects are exactly the corpus's bad files: no image was lost to a storage fault), the code
tables match the manifests row for row, each night has one parent run whose status tells what happened,
and no stage ran whose inputs, config and code had not changed. It prints a table per night and exits
non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' service starters and fault proxy

from conftest import BIN, TINY_UPSTREAM, deep_merge, start_mlflow_server, start_s3_server, stop  # noqa: E402
from fault_proxy import FaultProxy  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline import demo_data  # noqa: E402
from pipeline.codes import read_codes  # noqa: E402
from pipeline.config import parse_config, to_yaml  # noqa: E402
from pipeline.storage import MANIFEST, Location  # noqa: E402

STAGES = ["shard", "train_vqvae", "encode", "train_classifier", "train_prior", "sample", "evaluate"]
HEARTBEAT_S = 2.0
NIGHTS = [
    # (night, what happens, images added per class, expected stages that run)
    (1, "first run", 0, set(STAGES)),
    (2, "nothing changed", 0, set()),
    (3, "corpus grows", 4, {"shard", "encode", "evaluate"}),
    (4, "corpus grows, storage faults", 4, {"shard", "encode", "evaluate"}),
    (5, "corpus grows, driver SIGKILLed in encode", 4, {"shard", "encode"}),
    (6, "nothing new: finishes night 5's work", 0, {"encode", "evaluate"}),
    (7, "code of the evaluate stage changes", 0, {"evaluate"}),
]


def config_tree(s3, mlflow_uri: str) -> dict:
    return deep_merge(TINY_UPSTREAM, {
        "storage": {"root": s3.uri("nightly/root"), "lease_poll_s": 0.5},
        "dataset": {"source": s3.uri("nightly/corpus"), "shard_size": 16},
        "mlflow": {"tracking_uri": mlflow_uri, "experiment": "nightly", "heartbeat_s": HEARTBEAT_S,
                   "flush_timeout_s": 30, "request_retries": 0},
        "policy": {"on_new_data": "encode"},
        "train_vqvae": {"steps": 20, "checkpoint_every": 20, "validate_every": 20},
        "train_classifier": {"steps": 20, "checkpoint_every": 20, "validate_every": 20},
        "train_prior": {"steps": 20, "checkpoint_every": 20, "validate_every": 20, "sample_grid": 2},
        "sample": {"samples_per_class": 4},
        "evaluate": {"feature_nets": ["classifier"], "max_real_images": 32, "sweep": [1.0, 0.5], "cas_steps": 10},
    })


def edited_tree(folder: Path) -> Path:
    """A copy of the code where one function of the evaluate stage changed (a new release of it)."""
    tree = folder / "code-v2"
    for package in ("models", "pipeline", "jobs"):
        shutil.copytree(REPO / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    evaluate = tree / "pipeline/evaluate.py"
    source = evaluate.read_text()
    marker = "\ndef run(cfg"
    assert marker in source
    evaluate.write_text(source.replace(marker, "\nRELEASE = 2\n\n" + marker.lstrip("\n"), 1))
    return tree


def run_night(night: int, config: Path, env: dict, log: Path, kill_at: str | None = None,
              code: Path | None = None) -> int | None:
    """One `vq2 run` in its own session (so a kill takes its Ray along, as a lost machine would); returns its
    exit code, or None if it was killed when its log showed `kill_at`."""
    command = [str(BIN / "vq2"), "run", "--config", str(config)]
    if code is not None:
        env = env | {"PYTHONPATH": str(code)}
    with open(log, "wb") as out:
        driver = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=code or REPO,
                                  start_new_session=True)
    if kill_at is None:
        return driver.wait()
    while kill_at not in log.read_text(errors="replace"):
        if driver.poll() is not None:
            raise RuntimeError(f"night {night} ended before '{kill_at}':\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    return None


def night_runs(client: MlflowClient, experiment: str) -> list[dict]:
    """Per pipeline run (oldest first): its status, how it ended, and the stages it ran (not cached)."""
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=5000,
                              order_by=["attributes.start_time ASC"])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    nights = []
    for parent in parents:
        children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        nights.append({
            "status": parent.info.status,
            "ended_by": parent.data.tags.get("vq2.ended_by", ""),
            "ran": {run.data.tags["stage"] for run in children if run.data.tags.get("cached") == "false"},
            "stages": {run.data.tags["stage"]: run.info.status for run in children},
        })
    return nights


def check_data(root: Location, corpus: Location) -> list[str]:
    """Every listed image in exactly one shard or in the rejects; code tables row for row as the manifests."""
    problems = []
    datasets = [(root / "shard" / name / MANIFEST).read_json() for name in (root / "shard").list_folders()
                if (root / "shard" / name / MANIFEST).exists()]
    newest = max(datasets, key=lambda manifest: manifest["created"])
    dataset = root / "shard" / newest["fingerprint"]
    index = pq.read_table(io.BytesIO((dataset / "index.parquet").read_bytes())).to_pylist()
    sharded = {(row["split"], row["key"]) for row in index}
    if len(sharded) != len(index):
        problems.append("a key is in more than one shard")
    rejected = {item["path"] for item in newest["rejected"]}
    for path in corpus.list_files():
        split, label, name = path.split("/")
        key = (split, f"{label}/{name.rsplit('.', 1)[0]}")
        if (key in sharded) == (path in rejected):
            problems.append(f"{path}: {'both sharded and rejected' if key in sharded else 'lost'}")
    expected_rejects = {f"train/circle/{name}" for name in demo_data.REJECTED_BAD_FILES}
    if rejected != expected_rejects:
        problems.append(f"rejects {sorted(rejected ^ expected_rejects)} differ from the corpus's bad files")

    encodes = [(root / "encode" / name / MANIFEST).read_json() for name in (root / "encode").list_folders()
               if (root / "encode" / name / MANIFEST).exists()]
    newest_codes = [m for m in encodes if m["inputs"]["shard"] == newest["fingerprint"]]
    if len(newest_codes) != 1:
        return problems + [f"{len(newest_codes)} complete encode outputs of the newest dataset"]
    codes = root / "encode" / newest_codes[0]["fingerprint"]
    for split in ("train", "val"):
        keys = []
        for entry in newest_codes[0]["files"][split]:
            _, table = read_codes(codes / entry["file"])
            if len(table) != entry["rows"]:
                problems.append(f"{entry['file']}: {len(table)} rows, manifest says {entry['rows']}")
            keys += table["key"].to_pylist()
        if keys != [row["key"] for row in index if row["split"] == split]:
            problems.append(f"{split}: code table keys differ from the dataset index")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="vq2-nightly-"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "seaweedfs").mkdir(exist_ok=True)
    (folder / "mlflow").mkdir(exist_ok=True)
    s3, weed = start_s3_server(folder / "seaweedfs")
    mlflow_uri, mlflow_server = start_mlflow_server(folder / "mlflow", s3)
    proxy = FaultProxy(s3.endpoint, share=0.05, repeats=2, seed=7).start()
    env = os.environ | s3.env | {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    os.environ.update(s3.env)
    corpus = Location(s3.uri("nightly/corpus"))
    rows, problems = [], []
    try:
        demo_data.synthetic(corpus, 12, 4, size=(32, 32), classes=4, with_bad_files=True)
        added = 12
        tree = config_tree(s3, mlflow_uri)
        config = folder / "nightly.yaml"
        config.write_text(to_yaml(parse_config(tree, "nightly.yaml")))
        faulty = folder / "nightly-faulty-storage.yaml"
        faulty.write_text(to_yaml(parse_config(deep_merge(tree, {"storage": {"endpoint_url": proxy.endpoint}}),
                                               "nightly.yaml")))
        for night, what, grow, _ in NIGHTS:
            if grow:
                demo_data.synthetic(corpus, grow, 1, size=(32, 32), classes=4, first_index=added)
                added += grow
            started = time.monotonic()
            log = folder / f"night{night}.log"
            code = run_night(night, faulty if night == 4 else config, env, log,
                             kill_at="encode: running into" if night == 5 else None,
                             code=edited_tree(folder) if night == 7 else None)
            if night == 5:
                time.sleep(3 * HEARTBEAT_S)  # the time between two nights: night 5's heartbeat goes stale
            rows.append((night, what, code, time.monotonic() - started))
            if code not in (0, None):
                problems.append(f"night {night} exited {code}: see {log}")
        faults = dict(proxy.injected)
    finally:
        proxy.stop()
    try:
        nights = night_runs(MlflowClient(mlflow_uri), "nightly")
        problems += check_data(Location(s3.uri("nightly/root")), corpus)
    finally:
        stop(mlflow_server)
        stop(weed)

    print(f"\nstorage faults injected on night 4: {faults}\n")
    print("| night | what happens | exit | wall s | parent run | stages run | expected |")
    print("|---|---|---|---|---|---|---|")
    if len(nights) != len(NIGHTS):
        problems.append(f"{len(nights)} parent runs for {len(NIGHTS)} nights")
    for (night, what, code, wall), (_, _, _, expected), found in zip(rows, NIGHTS, nights):
        status = found["status"] + (" (ended by the next night)" if found["ended_by"] else "")
        ran = ", ".join(stage for stage in STAGES if stage in found["ran"]) or "none"
        print(f"| {night} | {what} | {'killed' if code is None else code} | {wall:.0f} | {status} | {ran} | "
              f"{', '.join(stage for stage in STAGES if stage in expected) or 'none'} |")
        if found["ran"] != expected:
            problems.append(f"night {night}: ran {sorted(found['ran'])}, expected {sorted(expected)}")
        want = "FAILED" if night == 5 else "FINISHED"
        if found["status"] != want or (night == 5) != bool(found["ended_by"]):
            problems.append(f"night {night}: parent run {found['status']} ({found['ended_by'] or 'ended by itself'})")
        if night != 5 and set(found["stages"].values()) - {"FINISHED"}:
            problems.append(f"night {night}: stage runs {found['stages']}")
    if not faults or sum(faults.values()) == 0:
        problems.append("no storage fault was injected on night 4")
    print("\n" + ("all checks passed" if not problems else "PROBLEMS:\n  " + "\n  ".join(problems)))
    print(f"work folder: {folder}" + ("" if args.keep else " (removed)"))
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
