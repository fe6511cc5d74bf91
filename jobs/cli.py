"""The `vq2` command line: argument parsing only; the work is in pipeline/."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pipeline import demo_data
from pipeline.config import ConfigError, load_config
from pipeline.dataset import verify
from pipeline.compare import compare
from pipeline.runner import StageFailed, pipeline_status, run_pipeline, stages
from pipeline.storage import Location
from pipeline.tracking import tracking_uri

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vq2", description="VQ-VAE-2 as a Ray + MLflow pipeline")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(command: argparse.ArgumentParser) -> None:
        command.add_argument("--config", required=True, help="pipeline YAML (see configs/)")
        command.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")

    run = commands.add_parser("run", help="run every stage in order; complete stages are skipped")
    with_config(run)
    run.add_argument("--until", default=None, metavar="STAGE", help="stop after this stage (and what it needs)")
    with_config(commands.add_parser("status", help="each stage: complete, partial or missing, and where it lives"))
    compare = commands.add_parser("compare", help="compare pipeline runs of an MLflow experiment")
    compare.add_argument("--experiment", required=True, help="MLflow experiment (default name: vq2-<config name>)")
    compare.add_argument("--metric", action="append", help="metric to show (repeatable); default the headline ones")
    compare.add_argument("--tracking-uri", default=None, help="default MLFLOW_TRACKING_URI, or --config's store")
    compare.add_argument("--config", default=None, help="take the tracking store from this pipeline config")
    compare.add_argument("--runs", type=int, default=20, help="newest runs to compare")
    compare.add_argument("--out", default=None, help="report file (.html; a .png chart is written beside it)")
    for name in stages():
        with_config(commands.add_parser(name, help=f"run the {name} stage only"))

    check = commands.add_parser("verify", help="re-read a dataset's shards and check them against its manifest")
    check.add_argument("uri", help="dataset version folder, e.g. runs/tiny/shard/<fingerprint>")

    data = commands.add_parser("demo-data", help="write a demo corpus in ImageNet layout <split>/<class>/<file>")
    data.add_argument("--out", required=True, help="folder or URI to write into")
    data.add_argument("--source", choices=("fashion-mnist", "synthetic"), default="fashion-mnist")
    data.add_argument("--per-class", type=int, default=100, help="training images per class")
    data.add_argument("--val-per-class", type=int, default=20, help="validation images per class")
    data.add_argument("--size", type=_size, default=None, help="synthetic: WxH or N (default 64); fashion: pad to N")
    data.add_argument("--classes", type=int, default=len(demo_data.SYNTHETIC_CLASSES), help="synthetic classes")
    data.add_argument("--format", choices=("jpg", "png"), default="jpg", help="synthetic file format")
    data.add_argument("--bad-files", action="store_true", help="synthetic: mix in files the shard stage rejects")

    demo = commands.add_parser("demo", help="write the demo corpus if missing, then run configs/tiny.yaml")
    demo.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return parser


def _demo_data(args: argparse.Namespace) -> int:
    out = Location(args.out)
    if args.source == "fashion-mnist":
        size = args.size[0] if args.size else 32
        return demo_data.fashion_mnist(out, args.per_class, args.val_per_class, size)
    return demo_data.synthetic(
        out, args.per_class, args.val_per_class, args.size or (64, 64), args.classes, args.format, args.bad_files
    )


def _demo(overrides: list[str]) -> int:
    cfg = load_config(DEMO_CONFIG, overrides)
    source = Location(cfg.dataset.source)
    if not source.exists():
        try:
            demo_data.fashion_mnist(source, per_class=100, val_per_class=20)
        except demo_data.MissingDataError as error:
            logging.getLogger("vq2").warning("%s\nUsing the synthetic corpus instead.", error)
            demo_data.synthetic(source, per_class=100, val_per_class=20, size=(32, 32), with_bad_files=True)
    results = run_pipeline(cfg, command="demo")
    for name, result in results.items():
        print(f"{name}: {'cached' if result.cached else 'done'} {result.location}")
    print(_where_to_look(cfg, results))
    return 0


def _where_to_look(cfg, results) -> str:
    """The closing lines of the demo: the MLflow UI, the pictures and the headline numbers."""
    uri = tracking_uri(cfg)
    ui = f"mlflow ui --backend-store-uri {uri} --port 5000" if uri.startswith("sqlite") else uri
    lines = ["", "Where to look:", f"  MLflow UI:        {ui}   (then open http://127.0.0.1:5000)"]
    if "sample" in results:
        lines.append(f"  sample grid:      {results['sample'].location / results['sample'].manifest['grid']}")
    if "evaluate" in results:
        evaluation = results["evaluate"]
        lines.append(f"  trade-off plot:   {evaluation.location / evaluation.manifest['artifacts']['plot']}")
        lines.append(f"  metrics summary:  {evaluation.location / evaluation.manifest['artifacts']['summary']}")
        summary = (evaluation.location / evaluation.manifest["artifacts"]["summary"]).read_json()["metrics"]
        lines += [f"    {name:<28} {value:.4g}" for name, value in sorted(summary.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    args = _parser().parse_args(argv)
    try:
        if args.command == "verify":
            problems = verify(args.uri)
            for problem in problems:
                print(problem)
            print("OK" if not problems else f"{len(problems)} problems")
            return 1 if problems else 0
        if args.command == "demo-data":
            print(f"wrote {_demo_data(args)} files under {args.out}")
            return 0
        if args.command == "demo":
            return _demo(args.overrides)
        if args.command == "compare":
            return _compare(args)
        cfg = load_config(args.config, args.overrides)
        if args.command == "status":
            return _status(cfg)
        only = None if args.command == "run" else args.command
        results = run_pipeline(cfg, only=only, command=args.command, until=getattr(args, "until", None))
        for name, result in results.items():
            print(f"{name}: {'cached' if result.cached else 'done'} {result.location}")
        return 0
    except (ConfigError, demo_data.MissingDataError) as error:
        print(f"vq2: {error}", file=sys.stderr)
        return 2
    except StageFailed as error:
        logging.getLogger("vq2").exception("pipeline failed")
        print(f"vq2: {error}", file=sys.stderr)
        return 1


def _status(cfg) -> int:
    rows = pipeline_status(cfg)
    width = max(len(row["stage"]) for row in rows)
    for row in rows:
        made = f"  (MLflow run {row['run_id']}, {row['created']})" if row["run_id"] else ""
        print(f"{row['stage']:<{width}}  {row['state']:<8}  {row['output']}{made}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    if args.tracking_uri:
        uri = args.tracking_uri
    elif args.config:
        uri = tracking_uri(load_config(args.config))
    else:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        print("vq2 compare: give --tracking-uri, --config or MLFLOW_TRACKING_URI", file=sys.stderr)
        return 2
    table, report, png = compare(uri, args.experiment, args.metric, args.runs)
    print(table)
    out = Path(args.out or f"vq2-compare-{args.experiment}.html")
    out.write_text(report)
    out.with_suffix(".png").write_bytes(png)
    print(f"report: {out} (chart: {out.with_suffix('.png')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
