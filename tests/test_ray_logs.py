"""What the Ray worker setup hook does to Ray Train's console lines."""

import io
import logging

from pipeline import ray_logs


def test_a_timed_out_autoscaling_request_is_one_warning_line_without_its_traceback(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # the hook leaves a set address alone and starts no Ray
    ray_logs.quiet_ray_train()
    console = io.StringIO()
    handler = logging.StreamHandler(console)
    client_logger = logging.getLogger(ray_logs.AUTOSCALING_CLIENT_LOGGER)
    client_logger.addHandler(handler)
    try:
        try:
            raise TimeoutError("Get timed out: some object(s) not ready.")
        except TimeoutError:
            client_logger.warning("Failed to send resource request for train-1.", exc_info=True)
    finally:
        client_logger.removeHandler(handler)
        client_logger.removeFilter(ray_logs.without_traceback)
    assert console.getvalue() == "Failed to send resource request for train-1.\n"
