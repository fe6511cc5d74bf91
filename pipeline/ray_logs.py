"""How a local Ray started by the pipeline is set up so that its console says what matters, and only once."""

import logging
import os

import ray

# Ray Train's placement-group cleaner polls the State API, which the dashboard serves; a local Ray
# runs without the dashboard (its processes take CPU that a 2-core machine needs), so the poll
# fails and the cleaner would warn every second for the length of every fit. Errors still show.
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
# Every rank's every ray.train.report is logged at INFO ("Reporting training result N: TrainingReport(...)"),
# a line per rank and checkpoint with the whole metrics dict; the stages log their own progress (rank 0).
REPORT_LOGGER = "ray.train.v2._internal.execution.context"

LOCAL_RUNTIME_ENV = {
    "worker_process_setup_hook": "pipeline.ray_logs.quiet_ray_train",
    # Ray Train's preemption watcher is an actor that polls for nodes being preempted, which a local Ray never
    # is; it is created with the worker handles as arguments and restarts allowed, which Ray reports at ERROR
    # level for every fit (ray-project/ray#53727). A cluster keeps it.
    "env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"},
}


def quiet_ray_train() -> None:
    """A Ray `worker_process_setup_hook`."""
    logging.getLogger(CLEANER_LOGGER).setLevel(logging.ERROR)
    logging.getLogger(REPORT_LOGGER).setLevel(logging.WARNING)
    # The cleaner finds its Ray through the state API with no address; with two local Rays on one machine (a
    # nightly run overlapping a manual one) that lookup raises and kills its thread with a traceback.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)

