"""The `vq2` command line: argument parsing only; the work is in pipeline/."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
import sys
from pathlib import Path

from mlflow.exceptions import MlflowException

from pipeline import demo_data
from pipeline.config import ConfigError, MlflowConfig, load_config, redact_uri
from pipeline.dataset import verify
from pipeline.evaluate import headline_lines
from pipeline.faults import StorageUnavailable
from pipeline.listing import SourceError
from pipeline.preflight import PreflightFailed, preflight
from pipeline.compare import compare
from pipeline.registry import promote
from pipeline.runner import StageFailed, StageIncomplete, pipeline_status, run_pipeline, stages
from pipeline.storage import Location
from pipeline.tracking import PipelineStopped, bound_http_requests, credentials_in_uri, tracking_uri

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
DEMO_PER_CLASS, DEMO_VAL_PER_CLASS = 600, 100  # images per class written into the demo corpus


def _count(text: str) -> int | None:
    return None if text == "all" else int(text)


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
    run.add_argument("--until", default=None, choices=list(stages()), metavar="STAGE",
                     help=f"stop after this stage (and what it needs): one of {', '.join(stages())}")
    with_config(commands.add_parser("status", help="each stage: complete, partial or missing, and where it lives"))
    check_first = commands.add_parser("preflight", help="check on the cluster what the stages `run` would run need "
                                      "(storage, MLflow, resources, packages, feature networks); run nothing")
    with_config(check_first)
    check_first.add_argument("--until", default=None, choices=list(stages()), metavar="STAGE",
                             help="only the stages up to this one (and what it needs)")
    compare = commands.add_parser("compare", help="compare pipeline runs of an MLflow experiment")
    compare.add_argument("--experiment", required=True, help="MLflow experiment (default name: vq2-<config name>)")
    compare.add_argument("--metric", action="append", help="metric to show (repeatable); default the headline ones")
    compare.add_argument("--tracking-uri", default=None, help="default MLFLOW_TRACKING_URI, or --config's store")
    compare.add_argument("--config", default=None, help="take the tracking store from this pipeline config")
    compare.add_argument("--runs", type=int, default=20, help="newest runs to compare")
    compare.add_argument("--out", default=None, help="write the HTML report here (folders are created; the .png "
                         "chart goes beside it); without it nothing is written")
    promote = commands.add_parser("promote", help="set an alias (champion, ...) on the registered models of a "
                                  "pipeline run")
    promote.add_argument("--experiment", required=True, help="MLflow experiment of the run")
    promote.add_argument("--run", required=True, help="the pipeline run (its parent run id, or one of its stage runs)")
    promote.add_argument("--alias", required=True, help="alias to set, e.g. champion (then models:/vq2-vqvae@champion)")
    promote.add_argument("--tracking-uri", default=None, help="default MLFLOW_TRACKING_URI, or --config's store")
    promote.add_argument("--config", default=None, help="take the tracking store from this pipeline config")
    for name in stages():
        with_config(commands.add_parser(name, help=f"run the {name} stage only"))

    check = commands.add_parser("verify", help="re-read a dataset's shards and check them against its manifest")
    check.add_argument("uri", help="dataset version folder, e.g. runs/tiny/shard/<fingerprint>")

    data = commands.add_parser("demo-data", help="write a demo corpus in ImageNet layout <split>/<class>/<file>")
    data.add_argument("--out", required=True, help="folder or URI to write into")
    data.add_argument("--source", choices=("fashion-mnist", "synthetic"), default="fashion-mnist")
    data.add_argument("--per-class", type=_count, default=100, help="training images per class, or 'all'")
    data.add_argument("--val-per-class", type=_count, default=20, help="validation images per class, or 'all' "
                      "(Fashion-MNIST: its 10,000 test images)")
    data.add_argument("--size", type=_size, default=None, help="synthetic: WxH or N (default 64); fashion: pad to N")
    data.add_argument("--classes", type=int, default=len(demo_data.SYNTHETIC_CLASSES), help="synthetic classes")
    data.add_argument("--format", choices=("jpg", "png"), default="jpg", help="synthetic file format")
    data.add_argument("--bad-files", action="store_true", help="synthetic: mix in files the shard stage rejects")

    demo = commands.add_parser("demo", help="write the demo corpus if missing, then run configs/tiny.yaml")
    demo.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return parser


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with key.sub=value overrides anywhere among the options: argparse alone takes a command's
    positional arguments in one run, so `--config C x=1 --until encode y=2` would leave y=2 unrecognized."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [arg for arg in rest if arg.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.overrides = [*args.overrides, *rest]  # argv order: every later run of positionals follows the first
    return args


def _demo_data(args: argparse.Namespace) -> int:
    out = Location(args.out)
    if args.source == "fashion-mnist":
        size = args.size[0] if args.size else 32
        return demo_data.fashion_mnist(out, args.per_class, args.val_per_class, size)
    if args.per_class is None or args.val_per_class is None:
        raise ValueError("--source synthetic: give --per-class and --val-per-class as numbers")
    return demo_data.synthetic(
        out, args.per_class, args.val_per_class, args.size or (64, 64), args.classes, args.format, args.bad_files
    )


def _demo(overrides: list[str]) -> int:
    cfg = load_config(DEMO_CONFIG, overrides)
    source = Location(cfg.dataset.source)
    if not source.exists():
        try:
            demo_data.fashion_mnist(source, per_class=DEMO_PER_CLASS, val_per_class=DEMO_VAL_PER_CLASS)
        except demo_data.MissingDataError as error:
            logging.getLogger("vq2").warning("%s\nUsing the synthetic corpus instead: %s", error,
                                             demo_data.SYNTHETIC_WARNING)
            demo_data.synthetic(source, per_class=DEMO_PER_CLASS, val_per_class=DEMO_VAL_PER_CLASS, size=(32, 32),
                                with_bad_files=True)
    preflight(cfg)
    results = run_pipeline(cfg, command="demo")
    for name, result in results.items():
        print(f"{name}: {'cached' if result.cached else 'done'} {result.location}")
    print(_where_to_look(cfg, results))
    return 0


def _where_to_look(cfg, results) -> str:
    """The closing lines of the demo: the MLflow UI, the pictures and the headline numbers."""
    uri = redact_uri(tracking_uri(cfg))  # MLFLOW_TRACKING_URI may carry a database password
    ui = f"mlflow ui --backend-store-uri {uri} --port 5000" if uri.startswith("sqlite") else uri
    lines = ["", "Where to look:", f"  MLflow UI:        {ui}   (then open http://127.0.0.1:5000)"]
    if "sample" in results:
        lines.append(f"  sample grid:      {results['sample'].location / results['sample'].manifest['grid']}")
    if "evaluate" in results:
        evaluation = results["evaluate"]
        if evaluation.manifest["artifacts"]["plot"]:
            lines.append(f"  trade-off plot:   {evaluation.location / evaluation.manifest['artifacts']['plot']}")
        lines.append(f"  metrics summary:  {evaluation.location / evaluation.manifest['artifacts']['summary']} "
                     "(every metric; the ones that matter, each beside its floor:)")
        lines += headline_lines((evaluation.location / evaluation.manifest["artifacts"]["summary"]).read_json())
    if "shard" in results and set(results["shard"].manifest["classes"]) == set(demo_data.SYNTHETIC_CLASSES):
        lines.append(f"  WARNING: {demo_data.SYNTHETIC_WARNING}")
    return "\n".join(lines)


def _stop(signum: int, _frame) -> None:
    # Raised in the main thread: the stage and pipeline runs end KILLED before the process exits.
    raise PipelineStopped(f"stopped by {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    args = _parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)  # what `ray job stop` and Kubernetes send
    try:
        if args.command == "verify":
            try:
                problems = verify(args.uri)
            except FileNotFoundError as error:
                print(f"vq2 verify: {_redacted(str(error))}", file=sys.stderr)
                return 2
            except (OSError, ValueError, ImportError, StorageUnavailable) as error:
                # Not a folder (a file), a malformed or unknown URI, a filesystem that is not installed, a storage
                # that does not answer, a manifest that is not JSON: the reason in one line.
                print(f"vq2 verify: {_redacted(args.uri)}: {_redacted(str(error))}", file=sys.stderr)
                return 2
            except KeyError as error:  # a manifest without a dataset's keys: another stage's output
                print(f"vq2 verify: {_redacted(args.uri)}: not a dataset (its manifest has no {error})",
                      file=sys.stderr)
                return 2
            for problem in problems:
                print(problem)
            print("OK" if not problems else f"{len(problems)} problems")
            return 1 if problems else 0
        if args.command == "demo-data":
            try:
                print(f"wrote {_demo_data(args)} files under {args.out}")
            except ValueError as error:
                print(f"vq2 demo-data: {error}", file=sys.stderr)
                return 2
            return 0
        if args.command == "demo":
            return _demo(args.overrides)
        if args.command == "compare":
            return _compare(args)
        if args.command == "promote":
            return _promote(args)
        cfg = load_config(args.config, args.overrides)
        if args.command == "status":
            return _status(cfg)
        if args.command == "preflight":
            checked = preflight(cfg, until=args.until)
            print(f"preflight: OK for {', '.join(checked)}" if checked else "preflight: every stage is complete")
            return 0
        if args.command == "run":
            preflight(cfg, until=args.until)  # before any work: what the run lacks fails it in seconds
        only = None if args.command == "run" else args.command
        results = run_pipeline(cfg, only=only, command=args.command, until=getattr(args, "until", None))
        for name, result in results.items():
            print(f"{name}: {'cached' if result.cached else 'done'} {result.location}")
        return 0
    except (ConfigError, SourceError, demo_data.MissingDataError, demo_data.ChecksumError) as error:
        print(f"vq2: {error}", file=sys.stderr)
        return 2
    except PreflightFailed as error:
        print(f"vq2: {error}", file=sys.stderr)
        return 1
    except StageIncomplete as error:
        # The same config and overrides, or the command would make an output of other fingerprints.
        remedy = shlex.join(["vq2", "run", "--config", args.config, "--until", error.stage, *args.overrides])
        print(f"vq2 {args.command}: it reads the {error.stage} output {error.location}, which is not complete; "
              f"make it first: {remedy}", file=sys.stderr)
        return 1
    except StageFailed as error:
        logging.getLogger("vq2").exception("pipeline failed")
        print(f"vq2: {error}", file=sys.stderr)
        return 1
    except (PipelineStopped, KeyboardInterrupt) as error:
        print(f"vq2: {error or 'interrupted'}; runs marked KILLED, a rerun resumes the unfinished stage",
              file=sys.stderr)
        return 143 if isinstance(error, PipelineStopped) else 130


def _status(cfg) -> int:
    rows = pipeline_status(cfg)
    width = max(len(row["stage"]) for row in rows)
    for row in rows:
        made = f"  (MLflow run {row['run_id']}, {row['created']})" if row["run_id"] else ""
        made = f"  (lease held by {row['lease_owner']})" if row["lease_owner"] else made
        print(f"{row['stage']:<{width}}  {row['state']:<8}  {row['output']}{made}")
    return 0


# A URI in a message, up to the next blank or quote: MLflow's and database drivers' errors repeat the store's URI.
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _redacted(text: str) -> str:
    """`text` with the password of every URI in it masked."""
    return _URI_IN_TEXT.sub(lambda found: redact_uri(found.group()), text)


def _store(args: argparse.Namespace) -> str:
    """The tracking store `compare` and `promote` read: --tracking-uri, --config's, or MLFLOW_TRACKING_URI; a
    ValueError saying why there is none usable."""
    settings = MlflowConfig()
    if args.tracking_uri:
        uri = args.tracking_uri
    elif args.config:
        cfg = load_config(args.config)
        settings, uri = cfg.mlflow, tracking_uri(cfg)
    else:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError("give --tracking-uri, --config or MLFLOW_TRACKING_URI")
    if (problem := credentials_in_uri(uri)) is not None:  # refused as the stages' preflight refuses it
        raise ValueError(problem)
    bound_http_requests(settings)
    return uri


# What a tracking command answers in one line, exit 2: no usable store, a store that does not answer or refuses
# (MlflowException), a database driver that is not installed, an experiment, run or model that is not there.
_STORE_ERRORS = (ValueError, LookupError, ImportError, MlflowException)


def _promote(args: argparse.Namespace) -> int:
    try:
        promoted = promote(_store(args), args.experiment, args.run, args.alias)
    except _STORE_ERRORS as error:
        print(f"vq2 promote: {_redacted(str(getattr(error, 'message', error)))}", file=sys.stderr)
        return 2
    for name, version in promoted:
        print(f"{name} version {version} is now {name}@{args.alias} (models:/{name}@{args.alias})")
    return 0


def _compare(args: argparse.Namespace) -> int:
    try:
        uri = _store(args)
        comparison = compare(uri, args.experiment, args.metric, args.runs)
    except _STORE_ERRORS as error:
        print(f"vq2 compare: {_redacted(str(getattr(error, 'message', error)))}", file=sys.stderr)
        return 2
    print(comparison.table)
    local = ("" if uri.startswith(("http://", "https://"))
             else f"  (serve the store first: mlflow ui --backend-store-uri {redact_uri(uri)})")
    print(f"MLflow compare view: {comparison.ui_link}{local}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(comparison.report)
        out.with_suffix(".png").write_bytes(comparison.chart)
        print(f"report: {out} (chart: {out.with_suffix('.png')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
