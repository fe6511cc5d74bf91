"""Run comparison from MLflow: config differences and headline metrics of pipeline runs, side by side."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

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


def pipeline_runs(client: MlflowClient, experiment: str, limit: int = 20) -> list[PipelineRun]:
    """The newest `limit` pipeline runs of an experiment, oldest first, with their stages' results.

    A cached stage's metrics come from the run that produced its output, so every invocation
    shows the numbers it actually used.
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
                          parent.info.start_time, parent.info.status)
        stages = client.search_runs(
            [found.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
        for stage in sorted(stages, key=lambda s: s.info.start_time):
            run.params |= stage.data.params  # flattened config keys, section first
            producer = stage.data.tags.get("produced_by_run")
            metrics = client.get_run(producer).data.metrics if producer else stage.data.metrics
            run.metrics |= metrics
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


def html_report(experiment: str, header: list[str], rows: list[list[str]], png: bytes) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    image = base64.b64encode(png).decode()
    return (
        f"<!doctype html><meta charset='utf-8'><title>vq2 compare: {html.escape(experiment)}</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px 8px;font-size:13px}</style>"
        f"<h1>{html.escape(experiment)}</h1><table><tr>{cells}</tr>{body}</table>"
        f"<p><img src='data:image/png;base64,{image}' alt='headline metrics per run'></p>"
    )


def compare(tracking_uri: str, experiment: str, metrics: list[str] | None = None, limit: int = 20):
    """(markdown table, HTML report, PNG chart) comparing the experiment's pipeline runs."""
    runs = pipeline_runs(MlflowClient(tracking_uri), experiment, limit)
    if not runs:
        raise ValueError(f"experiment {experiment!r} has no pipeline runs yet")
    chosen = list(metrics) if metrics else [m for m in HEADLINE_METRICS if any(m in r.metrics for r in runs)]
    header, rows = table_rows(runs, chosen)
    png = metrics_png(runs, chosen)
    return markdown(header, rows), html_report(experiment, header, rows, png), png
