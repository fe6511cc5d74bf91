"""The stages' Ray Data actor pools: one model per actor, and a dead actor's work given to a new pool.

Ray Data passes its actors their constructor arguments through the object store; with actor restarts on
(its default) Ray warns at ERROR level that such a restart can fail (ray-project/ray#53727) for every
pool. So the pools run with `max_restarts=0`, and the stage replaces a dead actor itself: when one dies,
the pass ends, and the tasks that have not returned yet go to a fresh pool (each task's output is written
by the task, so the finished ones are never redone). Each row that comes back carries its task's index.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import numpy as np
import ray
import ray.data
from ray.exceptions import RayActorError

log = logging.getLogger("vq2")

INDEX = "__vq2_task"
MAX_POOLS = 4  # passes in all: a task that kills every actor it meets fails the stage


class _Indexed:
    """Wraps a stage's actor class: the same calls, with the task's index added to what each returns."""

    def __init__(self, actor_class: type, kwargs: dict):
        self.actor = actor_class(**kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = batch.pop(INDEX)
        return self.actor(batch) | {INDEX: index}


def pool_rows(tasks: list[dict], actor_class: type, kwargs: dict, *, actors: int, num_cpus: float = 1.0,
              num_gpus: float = 0, in_flight: int = 2) -> Iterator[dict]:
    """Run `actor_class(**kwargs)(batch)` over `tasks` (one task a call) on a pool of `actors`, yielding each
    call's row as it finishes, in any order; tasks of an actor that died run again on a new pool."""
    pending = dict(enumerate(tasks))
    for attempt in range(1, MAX_POOLS + 1):
        items = [task | {INDEX: index} for index, task in pending.items()]
        with warnings.catch_warnings():
            # max_restarts has no named parameter yet, only the **ray_remote_args that Ray 2.6x deprecates.
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            pool = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                _Indexed, fn_constructor_kwargs={"actor_class": actor_class, "kwargs": kwargs}, batch_size=1,
                batch_format="numpy", num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0,
                compute=ray.data.ActorPoolStrategy(size=min(actors, len(items)),
                                                   max_tasks_in_flight_per_actor=in_flight),
            )
        try:
            for found in pool.iter_rows():
                row = dict(found)
                pending.pop(int(row.pop(INDEX)), None)
                yield row
            return
        except RayActorError as error:
            if attempt == MAX_POOLS:
                raise
            log.warning("an actor of %s died (%s); its %d unfinished tasks go to a new pool", actor_class.__name__,
                        type(error).__name__, len(pending))
