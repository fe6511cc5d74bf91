"""One writer per stage output: a lease object under the output, created atomically, renewed, taken over once expired.

Two runs of the same config (a nightly run that overlaps a manual one) compute the same output folders.
Before a stage writes, its run takes the lease `<output>/lease.json` ({owner, expires, host, pid}); the
other run waits until the output's manifest appears (then the stage is cached for it) or the holder is
gone: its lease expired (not renewed: the process or its machine died), or it ran on this machine and its
process no longer exists. Then the waiter takes the lease over and resumes the partial output. The holder
renews the lease from a background thread every third of its time to live; a renewal replaces only the
holder's own lease, never creates one: a lease found gone or another run's, or left to expire while
renewals failed, is lost. Expiry compares wall clocks of different machines: keep `storage.lease_ttl_s`
well above their skew.

Atomicity comes from what the storage really supports:
- S3: a conditional PUT. `If-None-Match: *` creates the lease only if there is none, `If-Match: <ETag>`
  replaces exactly the expired (or own) lease that was read, so of two runs taking over the same expired
  lease, one wins.
- A local folder: an exclusive `flock` on the output folder serialises every read-decide-write.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from collections.abc import Callable, Iterator
from typing import TypeVar

from fsspec.asyn import sync

from pipeline.faults import with_retries
from pipeline.storage import Location

T = TypeVar("T")

log = logging.getLogger("vq2")
LEASE = "lease.json"


class LeaseLost(RuntimeError):
    """Another run took this run's lease over (it was not renewed in time): the output is not ours to finish."""


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def holder_gone(lease: dict) -> bool:
    """True when the lease has expired, or its holder ran on this machine and that process is gone."""
    if lease["expires"] < time.time():
        return True
    return lease.get("host") == socket.gethostname() and not _process_exists(lease["pid"])


def parse_lease(data: bytes, location: Location) -> dict:
    """The lease record in `data`; one that cannot be read (empty or cut short by a crash, not a lease) is an
    expired lease, with a warning naming the file: else no run, not even `vq2 status`, could get past it."""
    try:
        record = json.loads(data)
    except ValueError as error:
        problem = f"not JSON ({error})"
    else:
        if isinstance(record, dict) and isinstance(record.get("owner"), str) and \
                isinstance(record.get("expires"), (int, float)):
            return record
        problem = "not a lease record {owner, expires, ...}"
    log.warning("lease %s: unreadable, %s; treated as expired", location, problem)
    return {"owner": f"unreadable lease {location}", "expires": 0.0}


class _LocalBackend:
    """Lease file on a local filesystem; every read-decide-write holds an exclusive flock on its folder."""

    def __init__(self, location: Location):
        self.location = location
        self.path = location.path
        self.folder = location.parent.path

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # The folder, not the lease file, carries the lock: the file is replaced and removed, the folder stays.
        os.makedirs(self.folder, exist_ok=True)
        descriptor = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)

    def _read(self) -> dict | None:
        try:
            with open(self.path, "rb") as stream:
                return parse_lease(stream.read(), self.location)
        except FileNotFoundError:
            return None

    def _write(self, record: dict) -> None:
        self.location.write_json(record)  # synced to disk, then moved into place: whole or absent after a crash

    def take(self, record: dict, may_replace: Callable[[dict], bool], create: bool = True) -> dict | None:
        """Write `record` if there is no lease (FileNotFoundError unless `create`) or `may_replace(current)`;
        else return the current lease."""
        with self._locked():
            current = self._read()
            if current is None and not create:
                raise FileNotFoundError(f"{self.location}: no lease to renew")
            if current is not None and not may_replace(current):
                return current
            self._write(record)
            return None

    def release(self, owner: str) -> None:
        with self._locked():
            current = self._read()
            if current is not None and current["owner"] == owner:
                os.remove(self.path)


class _S3Backend:
    """Lease object on S3: conditional PUTs (If-None-Match to create, If-Match to replace what was read).

    Every request is retried on transient errors by the location's policy; a failed condition is an
    answer (another run wrote first), never retried.
    """

    def __init__(self, location: Location):
        self.location, self.fs, self.path = location, location.fs, location.path
        self.bucket, self.key, _ = self.fs.split_path(self.path)

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        return with_retries(call, self.location.retry, f"lease {what} {self.location}")

    def _read(self) -> tuple[dict, str] | None:
        """The lease and the ETag of that very version (one GET), or None."""

        async def get() -> tuple[dict, str]:
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with response["Body"] as body:
                return parse_lease(await body.read(), self.location), response["ETag"]

        try:
            return self._retrying("read", lambda: sync(self.fs.loop, get))
        except FileNotFoundError:
            return None

    def _put(self, data: bytes, **condition) -> None:
        def put() -> None:
            try:
                self.fs.pipe_file(self.path, data, **condition)
            except OSError as error:
                if _precondition_failed(error):
                    raise FileExistsError(f"{self.location}: {condition} does not hold") from error
                raise

        self._retrying("write", put)

    def take(self, record: dict, may_replace: Callable[[dict], bool], create: bool = True) -> dict | None:
        data = json.dumps(record).encode()
        current = self._read()
        try:
            if current is None:
                if not create:
                    raise FileNotFoundError(f"{self.location}: no lease to renew")
                self._put(data, mode="create")
                return None
            lease, etag = current
            if not may_replace(lease):
                return lease
            self._put(data, IfMatch=etag)
            return None
        except FileExistsError:
            # Another run created or replaced the lease between our read and our write, or our own write
            # went through and only its answer was lost (then the retry found our lease there).
            found = self._read()
            if found is not None and found[0]["owner"] == record["owner"]:
                return None
            return found[0] if found else {"owner": "unknown", "expires": time.time()}

    def release(self, owner: str) -> None:
        current = self._read()
        if current is not None and current[0]["owner"] == owner:
            self._retrying("remove", lambda: self.fs.rm_file(self.path))
        self.fs.invalidate_cache(self.path)


def _precondition_failed(error: OSError) -> bool:
    """s3fs raises FileExistsError for a failed If-None-Match, a plain OSError for a failed If-Match."""
    if isinstance(error, FileExistsError):
        return True
    response = getattr(error.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") == "PreconditionFailed"


def _backend(location: Location):
    if location.protocol == "file":
        return _LocalBackend(location)
    if location.protocol in ("s3", "s3a"):
        return _S3Backend(location)
    raise ValueError(f"stage leases need a file:// or s3:// storage root, not {location.protocol}:// ({location.uri})")


class Lease:
    """This run's claim on one stage output; renewed in the background while held."""

    def __init__(self, output: Location, ttl_s: float):
        self.location = output / LEASE
        self.ttl_s = ttl_s
        self.owner = _owner()
        self._backend = _backend(self.location)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._expires = 0.0  # of the last record this run wrote
        self.lost: str | None = None  # why the lease was lost, if it was

    def _record(self) -> dict:
        return {"owner": self.owner, "expires": time.time() + self.ttl_s, "ttl_s": self.ttl_s,
                "host": socket.gethostname(), "pid": os.getpid()}

    def try_acquire(self) -> dict | None:
        """Take the lease if it is free, ours, expired, or held by a process of this machine that is gone;
        else return the holder's lease."""
        record = self._record()
        holder = self._backend.take(record, lambda current: current["owner"] == self.owner or holder_gone(current))
        if holder is None:
            self._expires = record["expires"]
        if holder is None and self._renewer is None:
            self._renewer = threading.Thread(target=self._renew, name=f"lease {self.location}", daemon=True)
            self._renewer.start()
        return holder

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            record = self._record()
            try:
                # Never created: a renewal that stalled past the expiry may find the lease taken over and
                # released by a run that finished the stage; writing it again would hand this run that output.
                holder = self._backend.take(record, lambda current: current["owner"] == self.owner, create=False)
            except FileNotFoundError:  # only a run that took the lease over removes it
                holder = {"owner": "another run, which has released it since"}
            except Exception as error:  # noqa: BLE001 - a failed renewal is retried at the next beat
                log.warning("lease %s: renewal failed (%s: %s); retrying", self.location, type(error).__name__, error)
                continue
            if holder is None:
                self._expires = record["expires"]
            else:
                self.lost = f"taken over by {holder['owner']}"
                log.error("lease %s: %s; this run will not write the manifest", self.location, self.lost)
                return

    def check(self) -> None:
        """Raise LeaseLost if another run took the lease over while this one worked, or may have: the lease
        expired while its renewals failed (on S3 one renewal may retry for longer than the time to live)."""
        if self.lost:
            raise LeaseLost(f"{self.location}: lease {self.lost} (not renewed within {self.ttl_s:g} s)")
        if time.time() > self._expires:
            raise LeaseLost(f"{self.location}: lease expired {time.time() - self._expires:.0f} s ago while its "
                            f"renewals failed; another run may have taken it over")

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if not self.lost:
            self._backend.release(self.owner)


def read_lease(output: Location) -> dict | None:
    """The lease on a stage output ({owner, expires, ttl_s}), or None when no run holds one."""
    location = output / LEASE
    try:
        data = location.read_bytes()
    except FileNotFoundError:  # none, or released since
        return None
    return parse_lease(data, location)


@contextmanager
def stage_lease(output: Location, ttl_s: float, done: Callable[[], bool], poll_s: float,
                stage: str) -> Iterator[Lease | None]:
    """Hold the lease on `output` for the body, or yield None once `done()` says another run finished it.

    While another run holds a live lease this waits, with a line every minute; an expired lease (its
    holder stopped renewing: killed, or its machine gone) is taken over.
    """
    lease = Lease(output, ttl_s)
    waited_since, last_line = time.monotonic(), 0.0
    while True:
        holder = lease.try_acquire()
        if holder is None:
            break
        if done():
            yield None
            return
        if time.monotonic() - last_line >= 60:
            last_line = time.monotonic()
            log.info("%s: waiting for run %s, which holds %s (lease expires in %.0f s; waited %.0f s)", stage,
                     holder["owner"], lease.location, holder["expires"] - time.time(), last_line - waited_since)
        time.sleep(poll_s)
    try:
        yield lease
    finally:
        lease.release()
