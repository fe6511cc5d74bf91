"""Deliberate process deaths for the fault-tolerance tests; inert unless VQ2_FAULT_INJECT is set."""

from __future__ import annotations

import os
import signal
from pathlib import Path

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
