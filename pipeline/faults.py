"""Faults: which errors mean a bad input and which are transient (the one retry rule), and deliberate
process deaths for the fault-tolerance tests."""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("vq2")
T = TypeVar("T")


class BadInput(Exception):
    """An input that no retry can turn into a sample; the message is the reason kept in the manifest."""


class StorageUnavailable(RuntimeError):
    """A storage call that still failed with a transient error after every attempt of its retry policy."""


# The storage's definite answers about a path (it is not there, is a folder, already exists: a conditional
# create): asking again cannot change them, so they are never retried.
DEFINITE = (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError)

# Errors of the program or of its configuration (a malformed URI or one of an unknown protocol, a filesystem
# that is not installed, a wrong argument): asking again gives the same answer, so they are raised at once, not
# retried for half a minute and reported as transient. No storage client the pipeline uses raises one for a
# passing fault: s3fs, botocore and aiohttp raise OSErrors (PermissionError too: an expired token reads like a bad
# signature, so it is retried) or their own classes, which derive from none of these but for malformed input
# (aiohttp's InvalidURL, botocore's InvalidRegionError, urllib3's LocationValueError are ValueErrors).
PERMANENT = (ValueError, TypeError, KeyError, ImportError, NotImplementedError)


def is_transient(error: BaseException) -> bool:
    """The one classification of errors. False for a bad input (a BadInput: not an image, over the pixel
    limit, truncated or corrupt, too large) or a definite answer of the storage (not found): the shard
    stage records it as a rejection; and False for an error of the program or its configuration (PERMANENT):
    raised at once. True for everything else (S3 SlowDown, a 5xx, an expired token, a reset connection, a
    timeout, any other I/O error): retried, and if it persists, the task and its stage fail."""
    return not isinstance(error, (BadInput, *DEFINITE, *PERMANENT))


@dataclass(frozen=True)
class RetryPolicy:
    """How a storage call is retried: `attempts` in all; the wait before retry n is drawn between half and
    all of backoff_s * 2^(n-1), capped at max_backoff_s (the spread keeps many workers from retrying in step)."""

    attempts: int = 8
    backoff_s: float = 0.2
    max_backoff_s: float = 20.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(f"retry policy needs attempts >= 1 and waits >= 0, got {self}")

    def wait_s(self, retry: int) -> float:
        ceiling = min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1))
        return random.uniform(ceiling / 2, ceiling)


def with_retries(call: Callable[[], T], policy: RetryPolicy, what: str) -> T:
    """`call()`, retried by `policy` on transient errors; any other error is raised at once, a transient one
    that outlasts the policy becomes StorageUnavailable naming `what` (the operation and URI)."""
    attempt = 1
    while True:
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - is_transient decides
            if not is_transient(error):
                raise
            if attempt >= policy.attempts:
                raise StorageUnavailable(
                    f"{what}: failed {attempt} time(s) with transient errors; last: {type(error).__name__}: {error}"
                ) from error
            wait = policy.wait_s(attempt)
            log.info("%s: %s: %s; retry %d of %d in %.2f s", what, type(error).__name__, error, attempt,
                     policy.attempts - 1, wait)
            time.sleep(wait)
            attempt += 1


# "<stage>:<step>:<rank>:<marker file>" kills that rank's process (SIGKILL, a real worker death)
# when it reaches that step, once: the marker file records that it happened. The driver reads the
# variable and hands it to its workers, so it works with any Ray cluster.
FAULT_ENV = "VQ2_FAULT_INJECT"


def fault_spec() -> str | None:
    return os.environ.get(FAULT_ENV)


def maybe_inject_fault(spec: str | None, stage: str, step: int, rank: int = 0) -> None:
    """Kill this process if `spec` names this stage, step and rank, the first time only."""
    if not spec:
        return
    name, at_step, at_rank, marker = spec.split(":", 3)
    if name != stage or int(at_step) != step or int(at_rank) != rank or os.path.exists(marker):
        return
    Path(marker).write_text(f"killed {stage} rank {rank} at step {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)
