"""Run comparison from MLflow: config differences, headline metrics and sample grids of pipeline runs, side by
side, and the link to the same runs in MLflow's own compare view."""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline.config import redact_uri  # noqa: E402

SAMPLE_GRID = "samples.png"  # the sample stage's grid artifact: a row per class
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store

# Stable names every stage logs under (see DESIGN.md, Tracking), in pipeline order.
HEADLINE_METRICS = (
    "val_mse", "top_val_nll_bits", "bottom_val_nll_bits", "val_top1", "acceptance_rate",
    "fid_inception_v3", "fid_star_inception_v3", "is_classifier", "is_efficientnet_lite0",
    "precision_inception_v3", "recall_inception_v3", "cas_top1", "cas_top5",
)


@dataclass
class PipelineRun:
    """One pipeline invocation: its parent run and, per stage, the metrics and params of the run that made it."""

    run_id: str
    name: str
    started: int
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    experiment_id: str = ""
    sample_run: str | None = None  # the run that logged the sample grid this invocation used
    stage_runs: list[str] = field(default_factory=list)


def pipeline_runs(client: MlflowClient, experiment: str, limit: int = 20) -> list[PipelineRun]:
    """The newest `limit` pipeline runs of an experiment, oldest first, with their stages' results.

    A cached stage's metrics come from the run that produced its output, so every invocation
    shows the numbers it actually used. A stage run that did not finish adds its params but not its
    metrics: what a failed or killed stage logged is partial (a sweep cut short, a loss mid-training).
    Nor does a run tagged `role: training_input` (under `policy.on_new_data: encode`, the stage run again
    on the pinned first dataset version for the training stages): the stage's metrics are the newest data's.
    """
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(e.name for e in client.search_experiments())
        raise ValueError(f"no MLflow experiment {experiment!r}; experiments: {names}")
    everything = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=5000)
    parents = [r for r in everything if "command" in r.data.tags and "mlflow.parentRunId" not in r.data.tags][:limit]
    runs = []
    for parent in reversed(parents):
        run = PipelineRun(parent.info.run_id, parent.data.tags.get("mlflow.runName", parent.info.run_id),
                          parent.info.start_time, parent.info.status, experiment_id=found.experiment_id)
        stages = client.search_runs(
            [found.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
        for stage in sorted(stages, key=lambda s: s.info.start_time):
            run.params |= stage.data.params  # flattened config keys, section first
            run.stage_runs.append(stage.info.run_id)
            if stage.info.status != "FINISHED" or stage.data.tags.get("role") == "training_input":
                continue
            producer = stage.data.tags.get("produced_by_run")
            run.metrics |= client.get_run(producer).data.metrics if producer else stage.data.metrics
            if stage.data.tags.get("stage") == "sample":
                run.sample_run = producer or stage.info.run_id
        runs.append(run)
    return runs


def differing_params(runs: list[PipelineRun]) -> list[str]:
    """Config keys set to different values by the runs that ran their stage (a stage a run skipped is no
    difference of config)."""
    keys = sorted({key for run in runs for key in run.params})
    return [key for key in keys if len({run.params[key] for run in runs if key in run.params}) > 1]


def table_rows(runs: list[PipelineRun], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "status"] + differing_params(runs) + metrics
    rows = []
    for run in runs:
        row = [f"{run.name} ({run.run_id[:8]})", run.status]
        row += [run.params.get(key, "") for key in differing_params(runs)]
        row += [f"{run.metrics[m]:.4g}" if m in run.metrics else "" for m in metrics]
        rows.append(row)
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def metrics_png(runs: list[PipelineRun], metrics: list[str]) -> bytes:
    """One small bar chart per metric, a bar per run."""
    shown = [m for m in metrics if any(m in run.metrics for run in runs)] or metrics[:1]
    columns = min(4, len(shown))
    rows = -(-len(shown) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    labels = [run.run_id[:8] for run in runs]
    for ax, metric in zip(axes.flat, shown):
        ax.bar(labels, [run.metrics.get(metric, float("nan")) for run in runs], color="tab:blue")
        ax.set_title(metric, fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100)
    plt.close(figure)
    return out.getvalue()


def _image(png: bytes, alt: str, css_class: str) -> str:
    # data-loaded: set by the browser once it has decoded the picture (what the report's test checks).
    return (f"<img class='{css_class}' src='data:image/png;base64,{base64.b64encode(png).decode()}' "
            f"alt='{html.escape(alt)}' onload='this.dataset.loaded=this.naturalWidth'>")


def html_report(experiment: str, header: list[str], rows: list[list[str]], png: bytes, grids: list[bytes | None],
                ui_link: str) -> str:
    """The table with each run's sample grid in its last column, the chart of the headline metrics below, and the
    link to MLflow's compare view."""
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header) + "<th>samples (a row per class)</th>"
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row)
        + f"<td>{_image(grid, f'samples of {row[0]}', 'grid') if grid else 'no sample stage'}</td></tr>"
        for row, grid in zip(rows, grids))
    return (
        f"<!doctype html><meta charset='utf-8'><title>vq2 compare: {html.escape(experiment)}</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px 8px;font-size:13px;vertical-align:top}img.grid{image-rendering:pixelated;width:256px}</style>"
        f"<h1>{html.escape(experiment)}</h1><p><a href='{html.escape(ui_link)}'>these runs in MLflow</a></p>"
        f"<table id='runs'><tr>{cells}</tr>{body}</table>"
        f"<p>{_image(png, 'headline metrics per run', 'chart')}</p>"
    )


def ui_link(tracking_uri: str, runs: list[PipelineRun]) -> str:
    """MLflow's compare view of these runs (their parent runs): on the tracking server, or on `mlflow ui`
    serving a local store."""
    base = redact_uri(tracking_uri).rstrip("/") if tracking_uri.startswith(("http://", "https://")) else LOCAL_UI
    ids = quote(json.dumps([run.run_id for run in runs], separators=(",", ":")))
    experiments = quote(json.dumps(sorted({run.experiment_id for run in runs}), separators=(",", ":")))
    return f"{base}/#/compare-runs?runs={ids}&experiments={experiments}"


def sample_grid(client: MlflowClient, run: PipelineRun) -> bytes | None:
    """The sample grid that the run's sample stage logged (or the run it reused logged), if any."""
    if run.sample_run is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return Path(client.download_artifacts(run.sample_run, SAMPLE_GRID, tmp)).read_bytes()
        except (OSError, MlflowException):
            return None


@dataclass
class Comparison:
    """What `vq2 compare` shows: the table, the HTML report, the chart and MLflow's compare view."""

    table: str
    report: str
    chart: bytes
    ui_link: str


def compare(tracking_uri: str, experiment: str, metrics: list[str] | None = None, limit: int = 20) -> Comparison:
    """The experiment's pipeline runs compared: a markdown table, an HTML report with each run's sample grid,
    a PNG chart of the headline metrics and the link to MLflow's compare view of the same runs."""
    client = MlflowClient(tracking_uri)
    runs = pipeline_runs(client, experiment, limit)
    if not runs:
        raise ValueError(f"experiment {experiment!r} has no pipeline runs yet")
    chosen = list(metrics) if metrics else [m for m in HEADLINE_METRICS if any(m in r.metrics for r in runs)]
    header, rows = table_rows(runs, chosen)
    png = metrics_png(runs, chosen)
    link = ui_link(tracking_uri, runs)
    report = html_report(experiment, header, rows, png, [sample_grid(client, run) for run in runs], link)
    return Comparison(markdown(header, rows), report, png, link)
