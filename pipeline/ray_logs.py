"""Quiets one Ray Train warning in every worker process of a local Ray started without its dashboard."""

import logging

# Ray Train's placement-group cleaner polls the State API, which the dashboard serves; a local Ray
# runs without the dashboard (its processes take CPU that a 2-core machine needs), so the poll
# fails and the cleaner would warn every second for the length of every fit. Errors still show.
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_placement_group_cleaner() -> None:
    """A Ray `worker_process_setup_hook`."""
    logging.getLogger(CLEANER_LOGGER).setLevel(logging.ERROR)
