"""How the pipeline's Ray (a local one it starts, or the cluster it joins) is set up so that its console says
what matters, and only once."""

import logging
import os

import ray

# Ray Train's placement-group cleaner polls the State API, which the dashboard serves; a local Ray
# runs without the dashboard (its processes take CPU that a 2-core machine needs), so the poll
# fails and the cleaner would warn every second for the length of every fit. Errors still show.
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
# A Ray Train worker logs every rank's every ray.train.report at INFO ("Reporting training result N:
# TrainingReport(...)", the whole metrics dict) through a logger named by its file's path, outside "ray.train",
# so RunConfig's LoggingConfig does not reach it; the stages log their own progress from rank 0.
REPORT_LOGGER = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
# A Ray Train controller asks Ray's autoscaling coordinator for its workers' resources with a 5-s timeout, and
# on a busy head (the coordinator actor still starting, two jobs at once) logs the timeout as a warning with the
# whole traceback, "safe to ignore" in its own words; it asks again every 20 s. The stages make their own
# autoscaler requests (pipeline.cluster), so the one-line warning is kept and its traceback dropped.
AUTOSCALING_CLIENT_LOGGER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"

RUNTIME_ENV = {
    "worker_process_setup_hook": "pipeline.ray_logs.quiet_ray_train",
    # Ray Train's preemption watcher is an actor that tells workers of a coming node preemption through
    # ray.train.get_preemption_info, which the stages do not read (a lost node is a worker failure, resumed from
    # the last checkpoint). It is created with the worker handles as arguments and restarts allowed, which Ray
    # reports at ERROR level for every fit (ray-project/ray#53727).
    "env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"},
}


def quiet_ray_train() -> None:
    """A Ray `worker_process_setup_hook`."""
    logging.getLogger(CLEANER_LOGGER).setLevel(logging.ERROR)
    logging.getLogger(REPORT_LOGGER).setLevel(logging.WARNING)
    logging.getLogger(AUTOSCALING_CLIENT_LOGGER).addFilter(without_traceback)
    # The cleaner finds its Ray through the state API with no address; with two local Rays on one machine (a
    # nightly run overlapping a manual one) that lookup raises and kills its thread with a traceback.
    if "RAY_ADDRESS" not in os.environ:
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def without_traceback(record: logging.LogRecord) -> bool:
    """A logging filter that keeps a record's message and drops the traceback attached to it."""
    record.exc_info = None
    record.exc_text = None
    return True

