"""Stage leases on a local folder and on the real S3 server: one holder, renewal, takeover of a dead holder's lease."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipeline.lease import LEASE, Lease, LeaseLost, read_lease, stage_lease
from pipeline.storage import Location


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


@pytest.mark.parametrize("content", [b"", b"{\"owner\": \"half", b"[]", b"{}"])
def test_an_unreadable_lease_is_expired_for_status_and_taken_over_with_a_warning(output, content, caplog):
    (output / LEASE).write_bytes(content)  # what a crash mid-write (or a foreign tool) can leave
    assert read_lease(output)["expires"] < time.time()  # `vq2 status`: no run holds the output
    with stage_lease(output, 60, lambda: False, poll_s=0.01, stage="shard") as lease:
        assert lease is not None and read_lease(output)["owner"] == lease.owner
    assert f"lease {output / LEASE}: unreadable" in caplog.text and "treated as expired" in caplog.text


def test_the_local_lease_file_reaches_the_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    output = Location(str(tmp_path / "stage" / "0123456789abcdef"))
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd))
    lease = Lease(output, ttl_s=60)
    assert lease.try_acquire() is None
    lease.release()
    assert any(os.path.basename(path).startswith(f"{LEASE}.tmp-") for path in synced), synced


def hang_renewals(lease: Lease) -> tuple[threading.Event, threading.Event, list]:
    """Hold `lease`'s renewals (not its acquisition) in the real backend call until `go` is set, as a renewal
    retrying for minutes on S3 would; returns (a renewal is hanging, go, the lease read right after each one)."""
    take, hanging, go, after = lease._backend.take, threading.Event(), threading.Event(), []

    def hung_take(*args, **kwargs):
        if threading.current_thread() is not lease._renewer:
            return take(*args, **kwargs)
        hanging.set()
        assert go.wait(60)
        try:
            return take(*args, **kwargs)
        finally:
            after.append(read_lease(lease.location.parent))

    lease._backend.take = hung_take
    return hanging, go, after


def test_a_renewal_that_finds_its_lease_released_by_the_run_that_took_it_over_does_not_recreate_it(output):
    """A's renewal hangs past its expiry; B takes the lease over, finishes and releases it; A's renewal then goes
    through (was: it created the lease again, A was not told it lost it and wrote the manifest over B's output)."""
    held = Lease(output, ttl_s=0.6)
    hanging, go, after = hang_renewals(held)
    assert held.try_acquire() is None
    assert hanging.wait(30)
    with stage_lease(output, 60, lambda: False, poll_s=0.01, stage="shard") as other:  # waits out A's expiry
        assert other is not None and read_lease(output)["owner"] == other.owner
    assert read_lease(output) is None
    go.set()
    held.release()  # stops the renewer once the renewal that was hanging has gone through
    assert after[0] is None  # not A's lease again
    with pytest.raises(LeaseLost, match="taken over by another run, which has released it since"):
        held.check()
    assert read_lease(output) is None


def test_a_holder_whose_renewal_hangs_past_the_expiry_counts_its_lease_lost(output):
    """While A's renewal still hangs (on S3: retried for longer than the time to live), B may hold the lease and
    write: A must not write the manifest even though its renewer has not answered yet (was: check() passed)."""
    held = Lease(output, ttl_s=0.6)
    hanging, go, _ = hang_renewals(held)
    assert held.try_acquire() is None
    assert hanging.wait(30)
    with stage_lease(output, 60, lambda: False, poll_s=0.01, stage="shard") as other:
        assert other is not None
        with pytest.raises(LeaseLost, match="expired .* while its renewals failed"):
            held.check()
        go.set()
        held.release()
        assert read_lease(output)["owner"] == other.owner  # A neither renewed nor removed B's lease
    with pytest.raises(LeaseLost, match=f"taken over by {other.owner}"):
        held.check()
