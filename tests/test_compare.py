"""`vq2 compare` against the real MLflow server: the table, MLflow's compare view, and the HTML report opened in a
headless Chromium (Debian's package) where the table, each run's sample grid and the chart must render."""

import io
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from html.parser import HTMLParser

from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import free_port
from jobs.cli import main as vq2
from pipeline import runner
from pipeline.compare import pipeline_runs
from pipeline.config import parse_config
from pipeline.storage import MANIFEST
from pipeline.tracking import Tracker

REPO = Path(__file__).resolve().parent.parent

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--virtual-time-budget=10000"]


def png(shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), (shade, 255 - shade, 90)).save(out, "PNG")
    return out.getvalue()


def tracker_for(mlflow_server, root, experiment: str = "exp-compare") -> Tracker:
    tree = {"storage": {"root": str(root)}, "dataset": {"source": "/nowhere"},
            "mlflow": {"tracking_uri": mlflow_server, "experiment": experiment, "request_retries": 0}}
    return Tracker(parse_config(tree, "compare.yaml"))


def pipeline_run(mlflow_server, root, lr: float, val_mse: float, shade: int) -> str:
    """A parent run with a train_vqvae and a sample stage run, as `vq2 run` records them."""
    tracker = tracker_for(mlflow_server, root)
    parent = tracker.start_pipeline("run", "x: 1\n")
    vqvae = tracker.start_stage("train_vqvae", "0123456789abcdef", {}, {"train_vqvae.lr": str(lr)})
    vqvae.log_metrics({"val_mse": val_mse})
    vqvae.finish()
    sample = tracker.start_stage("sample", "fedcba9876543210", {}, {"sample.seed": "0"})
    sample.log_metrics({"acceptance_rate": 0.5})
    sample.log_bytes(png(shade), "samples.png")
    sample.finish()
    tracker.finish_pipeline("FINISHED")
    return parent.run_id


class Page(HTMLParser):
    """The report's table rows and pictures as the browser left them (its DOM after the images loaded)."""

    def __init__(self):
        super().__init__()
        self.rows, self.images = 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self.rows += 1
        if tag == "img":
            self.images.append((attrs.get("class"), int(attrs.get("data-loaded") or 0)))


def test_compare_prints_the_mlflow_view_and_writes_a_report_only_when_asked(mlflow_server, tmp_path, capsys,
                                                                            monkeypatch):
    runs = [pipeline_run(mlflow_server, tmp_path / "root", 0.1, 0.04, 30),
            pipeline_run(mlflow_server, tmp_path / "root", 0.2, 0.02, 220)]
    capsys.readouterr()  # what making the runs printed
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert vq2(["compare", "--experiment", "exp-compare", "--tracking-uri", mlflow_server]) == 0
    out = capsys.readouterr().out
    assert "| train_vqvae.lr |" in out.splitlines()[0] and "val_mse" in out.splitlines()[0]
    (link,) = [line for line in out.splitlines() if line.startswith("MLflow compare view: ")]
    assert link.startswith(f"MLflow compare view: {mlflow_server}/#/compare-runs?runs=")
    assert all(run in link for run in runs)
    assert list(work.iterdir()) == []  # no --out: nothing written here

    report = tmp_path / "reports" / "new" / "compare.html"  # folders that do not exist yet
    assert vq2(["compare", "--experiment", "exp-compare", "--tracking-uri", mlflow_server, "--out", str(report)]) == 0
    assert report.exists() and report.with_suffix(".png").exists()

    chromium = shutil.which("chromium")
    assert chromium, "install Debian's chromium (make browser does, as root)"
    browse = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*browse, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=180,
                         check=True).stdout
    page = Page()
    page.feed(dom)
    assert page.rows == 3  # the header and a row per run
    assert sorted(kind for kind, _ in page.images) == ["chart", "grid", "grid"]
    assert all(width > 0 for _, width in page.images), page.images  # decoded by the browser, not just linked
    shot = tmp_path / "report.png"
    subprocess.run([*browse, "--window-size=1400,1000", f"--screenshot={shot}", report.as_uri()], capture_output=True,
                   timeout=180, check=True)
    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50  # text, table lines, the grids and the chart: not a blank page


def test_a_stage_that_did_not_finish_shows_its_params_not_its_metrics(mlflow_server, tmp_path):
    """A failed stage's metrics are partial (here an FID logged before the stage failed): the comparison leaves
    them out and keeps the config it ran with; a finished stage's metrics stay."""
    tracker = tracker_for(mlflow_server, tmp_path / "root", "exp-compare-failed")
    tracker.start_pipeline("run", "x: 1\n")
    vqvae = tracker.start_stage("train_vqvae", "0123456789abcdef", {}, {"train_vqvae.lr": "0.1"})
    vqvae.log_metrics({"val_mse": 0.04})
    vqvae.finish()
    evaluate = tracker.start_stage("evaluate", "fedcba9876543210", {}, {"evaluate.k": "3"})
    evaluate.log_metrics({"fid_inception_v3": 999.0})
    evaluate.finish("FAILED")
    tracker.finish_pipeline("FAILED")
    assert tracker.flush()

    (run,) = pipeline_runs(MlflowClient(mlflow_server), "exp-compare-failed")
    assert run.status == "FAILED" and run.metrics == {"val_mse": 0.04}
    assert run.params == {"train_vqvae.lr": "0.1", "evaluate.k": "3"} and len(run.stage_runs) == 2


def test_a_grown_dataset_under_the_encode_policy_shows_its_own_encode_not_the_pinned_one(mlflow_server, tmp_path,
                                                                                         monkeypatch):
    """Under `policy.on_new_data: encode` a grown dataset's invocation runs encode twice under its parent: on the
    newest version (the night's own encode), then on the pinned first version that train_prior reads. The
    comparison shows the newest version's encode metrics (seen failing on the old code: the pinned run, started
    later, overwrote them). The real runner and MLflow; the stages are stand-ins that log what encode logs."""
    monkeypatch.setattr(runner, "code_digest", lambda module: "c0de")
    monkeypatch.setattr(runner, "ensure_ray", lambda cfg: None)
    monkeypatch.setattr(runner.cluster, "require", lambda demand, ray_cfg: None)
    monkeypatch.setattr(runner, "cluster_size", lambda: 1)

    def encode(cfg, ctx):
        rows = ctx.upstream["shard"].manifest["splits"]["train"]
        ctx.tracking.log_metrics({"rows": rows})
        return {"rows": rows, "splits": {"train": rows}, "files": {"train": []}, "layout": {"grids": [[2, 2]]}}

    def stage(name, section, upstream, run, trains=False):
        return types.SimpleNamespace(NAME=name, SECTION=section, FORMAT_VERSION=1, UPSTREAM=upstream, TRAINS=trains,
                                     run=run, __name__=f"fake_{name}")

    trained = lambda cfg, ctx: {}  # noqa: E731
    fakes = [stage("shard", "dataset", (), None), stage("train_vqvae", "train_vqvae", ("shard",), trained, True),
             stage("encode", "encode", ("shard", "train_vqvae"), encode),
             stage("train_prior", "train_prior", ("shard", "train_vqvae", "encode"), trained, True)]
    monkeypatch.setattr(runner, "stages", lambda: {fake.NAME: fake for fake in fakes})
    cfg = parse_config({"storage": {"root": str(tmp_path / "root")}, "dataset": {"source": "/nowhere"},
                        "policy": {"on_new_data": "encode"},
                        "mlflow": {"tracking_uri": mlflow_server, "experiment": "exp-compare-encode-policy",
                                   "request_retries": 0, "system_metrics_s": 0}}, "grown.yaml")
    # The shard stage finds the grown version (150 training images) complete; it grew from a first one (100).
    grown = runner.stage_address(fakes[0], cfg, {})
    first = "a" * 16
    for location, fingerprint, base, rows in ((grown.location.parent / first, first, None, 100),
                                              (grown.location, grown.fingerprint, first, 150)):
        (location / MANIFEST).write_json({"fingerprint": fingerprint, "base": base, "splits": {"train": rows},
                                          "shards": []})
    runner.run_pipeline(cfg)

    client = MlflowClient(mlflow_server)
    (run,) = pipeline_runs(client, "exp-compare-encode-policy")
    assert run.metrics["rows"] == 150
    encodes = [found for found in map(client.get_run, run.stage_runs) if found.data.tags["stage"] == "encode"]
    assert [(found.data.tags.get("role"), found.data.metrics["rows"]) for found in encodes] == [
        (None, 150), ("training_input", 100)]


def test_compare_and_promote_refuse_a_tracking_uri_with_credentials_and_never_print_them(mlflow_server, tmp_path,
                                                                                        capsys, monkeypatch):
    """As the stages' preflight refuses it: MLflow repeats the URI in its errors (the old code printed `API request
    to http://alice:s3cret@...`). Given, from the environment, and of a server that does not answer."""
    tracker = tracker_for(mlflow_server, tmp_path / "root", "exp-compare-credentials")
    parent = tracker.start_pipeline("run", "x: 1\n")
    vqvae = tracker.start_stage("train_vqvae", "0123456789abcdef", {}, {"train_vqvae.lr": "0.1"})
    vqvae.log_metrics({"val_mse": 0.04})
    vqvae.finish()
    tracker.finish_pipeline("FINISHED")
    assert tracker.flush()
    capsys.readouterr()
    commands = {"compare": ["compare", "--experiment", "exp-compare-credentials"],
                "promote": ["promote", "--experiment", "exp-compare-credentials", "--run", parent.run_id,
                            "--alias", "champion"]}
    given = [mlflow_server.replace("http://", "http://alice:s3cret@", 1),
             f"http://alice:s3cret@127.0.0.1:{free_port()}"]  # nothing listens there
    for name, command in commands.items():
        for uri in given:
            for store in (["--tracking-uri", uri], []):
                with monkeypatch.context() as env:
                    env.setenv("MLFLOW_TRACKING_URI", uri)
                    assert vq2([*command, *store]) == 2, (name, uri, store)
                captured = capsys.readouterr()
                assert captured.err == (f"vq2 {name}: the MLflow tracking URI for 127.0.0.1 carries credentials: "
                                        "give them in the environment (MLFLOW_TRACKING_USERNAME and "
                                        "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN), not in the URI\n")
                assert "s3cret" not in captured.out


def test_an_unreachable_tracking_server_is_one_line_in_seconds_not_a_traceback_after_minutes(tmp_path):
    """MLflow's own HTTP retries bounded as the stages bound them (its defaults wait about 3.5 minutes), and its
    error caught: the old compare gave a traceback after those minutes."""
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_HTTP_REQUEST_")}
    commands = [["compare", "--experiment", "e"], ["promote", "--experiment", "e", "--run", "r", "--alias", "a"]]
    # Both commands in one fresh interpreter (what `vq2` runs), each answering on the last line of stderr so far.
    script = ("import json, sys\nfrom jobs.cli import main\nfor command in json.loads(sys.argv[1]):\n"
              "    print('exit', main(command), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script, json.dumps([[*c, "--tracking-uri", uri] for c in commands])],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=150)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    answers = [line for line in done.stderr.splitlines() if line.startswith("vq2 ") or line.startswith("exit ")]
    for (command, *_), (answer, exit_line) in zip(commands, zip(answers[::2], answers[1::2])):
        assert exit_line == "exit 2", done.stderr
        assert answer.startswith(f"vq2 {command}: API request to {uri}/api/2.0/mlflow/") and "refused" in answer, answer


def test_compare_masks_the_password_of_a_local_store_in_its_serve_hint(tmp_path, capsys, monkeypatch):
    """A store that is not a server gets the hint `mlflow ui --backend-store-uri <store>`, with its password masked
    (the old code printed it as given). In practice a database's (postgresql://user:password@host/db); here MLflow's
    file store, the local store whose URI takes user info without a database server."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = tmp_path / "store"
    client = MlflowClient(store.as_uri())
    experiment = client.create_experiment("exp-local")
    parent = client.create_run(experiment, tags={"command": "run"})
    stage = client.create_run(experiment, tags={"mlflow.parentRunId": parent.info.run_id, "stage": "train_vqvae"})
    client.log_metric(stage.info.run_id, "val_mse", 0.04)
    for run in (stage, parent):
        client.set_terminated(run.info.run_id)
    assert vq2(["compare", "--experiment", "exp-local", "--tracking-uri", f"file://alice:s3cret@localhost{store}"]) == 0
    captured = capsys.readouterr()
    assert f"(serve the store first: mlflow ui --backend-store-uri file://alice:***@localhost{store})" in captured.out
    assert "s3cret" not in captured.out + captured.err
