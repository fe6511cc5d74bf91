"""Stage leases on a local folder and on the real S3 server: one holder, renewal, takeover of a dead holder's lease."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import BIN, TINY_UPSTREAM, deep_merge
from pipeline import demo_data
from pipeline.config import parse_config, to_yaml
from pipeline.lease import LEASE, Lease, LeaseLost, read_lease, stage_lease
from pipeline.storage import MANIFEST, Location


@pytest.fixture(params=["file", "s3"])
def output(request, tmp_path) -> Location:
    if request.param == "file":
        return Location(str(tmp_path / "stage" / "0123456789abcdef"))
    s3 = request.getfixturevalue("s3_env")
    return Location(s3.uri(f"leases/{tmp_path.name}/stage/0123456789abcdef"))


def write_lease(output: Location, **fields) -> None:
    record = {"owner": "elsewhere:1:dead", "expires": time.time() + 600, "ttl_s": 600, "host": "elsewhere", "pid": 1}
    (output / LEASE).write_bytes(json.dumps(record | fields).encode())


def test_one_holder_at_a_time_and_released(output):
    first, second = Lease(output, ttl_s=60), Lease(output, ttl_s=60)
    assert first.try_acquire() is None
    holder = second.try_acquire()
    assert holder is not None and holder["owner"] == first.owner
    assert read_lease(output)["owner"] == first.owner
    first.release()
    assert read_lease(output) is None
    assert second.try_acquire() is None
    second.release()


def test_a_live_lease_of_another_machine_is_respected_and_an_expired_one_taken_over(output):
    write_lease(output)
    lease = Lease(output, ttl_s=60)
    assert lease.try_acquire()["owner"] == "elsewhere:1:dead"
    write_lease(output, expires=time.time() - 1)
    assert lease.try_acquire() is None
    assert read_lease(output)["owner"] == lease.owner
    lease.release()


def test_a_dead_process_of_this_machine_holds_nothing(output):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_lease(output, host=socket.gethostname(), pid=int(gone.stdout))
    lease = Lease(output, ttl_s=60)
    assert lease.try_acquire() is None
    lease.release()
    write_lease(output, host=socket.gethostname(), pid=os.getppid())  # alive: respected although local
    assert Lease(output, ttl_s=60).try_acquire() is not None


def test_of_many_runs_taking_over_one_expired_lease_exactly_one_wins(output):
    write_lease(output, expires=time.time() - 1)
    leases = [Lease(output, ttl_s=60) for _ in range(6)]
    start = threading.Barrier(len(leases))
    results = [None] * len(leases)

    def take(i):
        start.wait()
        results[i] = leases[i].try_acquire()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(leases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [lease for lease, holder in zip(leases, results) if holder is None]
    assert len(winners) == 1
    assert read_lease(output)["owner"] == winners[0].owner
    assert all(holder["owner"] == winners[0].owner for holder in results if holder is not None)
    winners[0].release()


def test_renewal_keeps_the_lease_and_a_takeover_is_noticed(output):
    lease = Lease(output, ttl_s=0.6)
    assert lease.try_acquire() is None
    first_expiry = read_lease(output)["expires"]
    deadline = time.monotonic() + 30
    while read_lease(output)["expires"] == first_expiry:  # the renewer writes a later expiry
        assert time.monotonic() < deadline
        time.sleep(0.02)
    lease.check()
    write_lease(output)  # another run took it over while this one was stalled
    while lease.lost is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(LeaseLost, match="taken over by elsewhere"):
        lease.check()
    lease.release()
    assert read_lease(output)["owner"] == "elsewhere:1:dead"  # not removed: it is not ours


def test_a_waiter_sees_the_other_run_finish(output):
    write_lease(output)
    finished = iter([False, False, True])
    with stage_lease(output, 60, lambda: next(finished), poll_s=0.01, stage="shard") as lease:
        assert lease is None


@pytest.mark.slow
def test_two_runs_of_one_config_at_once_do_the_work_once(s3_env, mlflow_server, tmp_path):
    """A nightly run overlapping a manual one: both succeed, each stage is run by one of them, the other waits
    for its manifest, and there is one set of outputs."""
    corpus = Location(s3_env.uri("twice/corpus"))
    demo_data.synthetic(corpus, 12, 4, size=(32, 32), classes=4)
    tree = deep_merge(TINY_UPSTREAM, {
        "storage": {"root": s3_env.uri("twice/root"), "lease_poll_s": 0.2},
        "dataset": {"source": corpus.uri, "shard_size": 24},
        "mlflow": {"tracking_uri": mlflow_server, "experiment": "twice"},
        "train_vqvae": {"steps": 10, "checkpoint_every": 10, "validate_every": 10},
    })
    config_file = tmp_path / "twice.yaml"
    config_file.write_text(to_yaml(parse_config(tree, "twice.yaml")))
    # Each driver starts its own local Ray, as two cron jobs on one machine would, with the S3 credentials of
    # its environment (a driver joining this test's Ray would not hand them to its workers).
    command = [str(BIN / "vq2"), "run", "--config", str(config_file), "--until", "encode"]
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    drivers = [subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT) for log in logs]
    codes = [driver.wait(timeout=500) for driver in drivers]
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], texts[0][-2000:] + texts[1][-2000:]
    for text in texts:  # a console a person can read: no ERROR line, traceback or deprecation, from Ray or MLflow
        alarming = [line for line in text.splitlines() if re.search(r"\bERROR\b|Traceback", line)
                    or re.search(r"deprecat|tqdm is not installed", line, re.IGNORECASE)]
        assert not alarming, alarming
    root = Location(s3_env.uri("twice/root"))
    manifests = {}
    for stage in ("shard", "train_vqvae", "encode"):
        (fingerprint,) = (root / stage).list_folders()  # one set of outputs
        ran = [text.count(f"{stage}: running into") for text in texts]
        assert sorted(ran) == [0, 1], (stage, ran)  # one run did the work, the other waited for it
        output = root / stage / fingerprint
        manifests[stage] = (output / MANIFEST).read_json()
        assert read_lease(output) is None
        assert all(f"{stage}: {'done' if count else 'cached'} {output}" in text for count, text in zip(ran, texts))
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("twice").experiment_id])
    assert {run.info.status for run in runs} == {"FINISHED"} and len(runs) == 2 * 4
    for stage, manifest in manifests.items():
        made = [run for run in runs if run.data.tags.get("stage") == stage and run.data.tags["cached"] == "false"]
        assert [run.info.run_id for run in made] == [manifest["run_id"]]
