"""`vq2 compare` against the real MLflow server: the table, MLflow's compare view, and the HTML report opened in a
headless Chromium (Debian's package) where the table, each run's sample grid and the chart must render."""

import io
import shutil
import subprocess
from html.parser import HTMLParser

from mlflow.tracking import MlflowClient
from PIL import Image

from jobs.cli import main as vq2
from pipeline.compare import pipeline_runs
from pipeline.config import parse_config
from pipeline.tracking import Tracker

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
