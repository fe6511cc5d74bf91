"""MLflow system metrics (CPU, memory, disk, network, GPU) of one machine, logged to a stage's run.

MLflow's own collectors (`mlflow.system_metrics.metrics`: psutil, and NVML for NVIDIA GPUs) sample the
machine every `mlflow.system_metrics_s`; the samples go to the run under MLflow's names
(`system/cpu_utilization_percentage`, `system/gpu_0_utilization_percentage`, ...), so MLflow's UI shows
them in its system metrics view, but through the run's tracking queue (pipeline/tracking.py) rather than
MLflow's own monitor thread, so an outage delays them instead of stopping them. The driver of a stage
logs its machine; a Ray Train stage's rank 0 logs its own when it runs on another node. On a multi-node
cluster each name carries the node (`system/<node>/...`, the node's Ray id, first 8 hex digits).
"""

from __future__ import annotations

import logging
import threading

from pipeline.tracking import StageRun

log = logging.getLogger("vq2")
PREFIX = "system/"


def _monitors() -> list:
    """MLflow's collectors of this machine, imported when a run samples it (pipeline/tracking.py says why)."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    return [CPUMonitor(), DiskMonitor(), NetworkMonitor()] + [m for m in [_gpu_monitor()] if m]


def _gpu_monitor():
    """MLflow's NVIDIA GPU collector, or None on a machine without one (or without the NVML library)."""
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    try:
        return GPUMonitor()
    except (ImportError, RuntimeError):
        return None


def node_id() -> str | None:
    """This machine's name in system metric keys: None on a one-node Ray (or without Ray), else the node's Ray
    id (its first 8 hex digits, as `ray list nodes` shows it)."""
    import ray

    if not ray.is_initialized() or sum(1 for node in ray.nodes() if node["Alive"]) < 2:
        return None
    return ray.get_runtime_context().get_node_id()[:8]


class SystemMetrics:
    """Samples this machine every `interval_s` while the `with` block runs, and once more at its end."""

    def __init__(self, run: StageRun, interval_s: float, node: str | None = None):
        self.run, self.interval_s = run, interval_s
        self.prefix = PREFIX + (f"{node}/" if node else "")
        self.monitors = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._step = 0

    def __enter__(self) -> SystemMetrics:
        if self.interval_s > 0 and self.run.tracker is not None:
            self.monitors = _monitors()
            self._collect()  # the first CPU reading only starts psutil's interval
            for monitor in self.monitors:
                monitor.clear_metrics()
            self._thread = threading.Thread(target=self._loop, name="system metrics", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._collect()
        self._publish()

    def _collect(self) -> None:
        for monitor in self.monitors:
            monitor.collect_metrics()

    def _publish(self) -> None:
        values = {}
        for monitor in self.monitors:
            values |= monitor.aggregate_metrics()
            monitor.clear_metrics()
        self.run.log_metrics({self.prefix + key: value for key, value in values.items()}, step=self._step)
        self._step += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._collect()
                self._publish()
            except Exception as error:  # noqa: BLE001 - a failed reading never stops the stage
                log.warning("system metrics: %s: %s", type(error).__name__, error)
