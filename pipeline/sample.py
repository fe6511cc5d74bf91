"""Stage: class-conditional sampling at scale on a Ray actor pool, scored for classifier-based rejection."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import time

import numpy as np
import pyarrow as pa
import torch
import webdataset as wds
from PIL import Image

from models.sampling import sample_codes

from pipeline import registry
from pipeline.actor_pool import pool_rows
from pipeline.checkpoints import load_model
from pipeline.code_digest import code_digest
from pipeline.codes import CodesLayout, codes_table, level_names, read_codes, table_tensors, write_codes
from pipeline.config import PipelineConfig, RejectionConfig, SampleConfig
from pipeline.faults import fault_spec, maybe_inject_fault
from pipeline.feature_nets import CLASSIFIER, EFFICIENTNET_LITE0, imagenet_class_indices, load_feature_net
from pipeline.figures import image_grid, png_bytes
from pipeline.progress import Progress
from pipeline.shard_reader import to_uint8
from pipeline.storage import Location

log = logging.getLogger("vq2")

NAME = "sample"
SECTION = "sample"
FORMAT_VERSION = 2  # 2: the manifest's sampled_labels and lowest_accepted_scores
# Not the shard stage: the models fix the classes, so a grown dataset is not sampled again.
UPSTREAM = ("train_vqvae", "train_prior", "train_classifier")
MODELS = "models"  # the registered models a run takes, copied here after their digests are checked


def registry_models(cfg: PipelineConfig) -> dict[str, str]:
    """{role: models:/ URI} of the models the config takes from the Model Registry: vqvae, prior.<level> (top
    first), classifier."""
    section = cfg.sample
    uris = {"vqvae": section.vqvae} if section.vqvae else {}
    if section.priors:
        uris |= {f"prior.{name}": uri for name, uri in zip(level_names(len(section.priors)), section.priors)}
    if section.rejection.classifier.startswith("models:"):
        uris["classifier"] = section.rejection.classifier
    return uris


def upstream(cfg: PipelineConfig) -> tuple[str, ...]:
    """The training stages whose models sampling takes: those the config does not take from the registry."""
    replaced = {"train_vqvae": "vqvae", "train_prior": "prior.top", "train_classifier": "classifier"}
    taken = registry_models(cfg)
    return tuple(name for name in UPSTREAM if replaced[name] not in taken)


def classifier_file(cfg: PipelineConfig) -> Location | None:
    """The classifier file that `sample.rejection.classifier` names by path or URI (None: another kind)."""
    classifier = cfg.sample.rejection.classifier
    if classifier in ("dataset", EFFICIENTNET_LITE0) or classifier.startswith("models:"):
        return None
    location = Location(classifier, cfg.storage.endpoint_url, cfg.storage.region)
    if not location.exists():
        raise FileNotFoundError(f"sample.rejection.classifier: no file at {location.uri}; expected 'dataset', "
                                "'efficientnet_lite0', a models:/ URI or the path or URI of a classifier file")
    return location


def external_inputs(cfg: PipelineConfig) -> tuple[dict[str, str], dict[str, registry.RegisteredVersion]]:
    """The models sampling takes from outside the pipeline's stages are inputs: the sha256 of a registered
    model's file (`registry.<role>`: a moved alias, a new champion, samples again, the same weights under
    another version do not) or of a classifier file, and the code of their kinds (`code.<kind>`), which a
    training stage's fingerprint would otherwise carry."""
    resolved = {role: registry.resolve(cfg, uri) for role, uri in registry_models(cfg).items()}
    inputs = {f"registry.{role}": version.weights_sha256[:16] for role, version in resolved.items()}
    kinds = {role.split(".")[0] for role in resolved}
    file = classifier_file(cfg)
    if file is not None:
        inputs["classifier_file"] = file.sha256()[:16]
        kinds.add("classifier")
    inputs |= {f"code.{kind}": code_digest(f"models.{kind}") for kind in sorted(kinds)}
    return inputs, resolved


def sample_fields(levels: int) -> list[pa.Field]:
    """The columns a sample table adds to a code table: how to reproduce the sample, and its score."""
    return [
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("temperature", pa.list_(pa.float32(), levels), nullable=False),
        pa.field("score", pa.float32(), nullable=False),  # classifier probability of the conditioning class
    ]


def sample_seed(base: int, label: int, index: int) -> int:
    """The seed of sample `index` of class `label`: stable across runs, batch sizes and actor counts."""
    digest = hashlib.sha256(f"{base}:{label}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def per_level(value, levels: int, key: str) -> list:
    """A config value given once or once per level, as one per level."""
    values = value if isinstance(value, list) else [value] * levels
    if len(values) != levels:
        raise ValueError(f"sample.{key} has {len(values)} values; the VQ-VAE has {levels} levels")
    return values


def trained_classes(ctx, classifier_classes: list[str] | None = None,
                    prior_classes: dict[str, tuple[int, list[str] | None]] | None = None) -> list[str]:
    """The classes sampling draws from, in the order of the priors' class labels: label i is the name of class i
    of the data the priors were trained on. `prior_classes` is each level's (class count, class names) from the
    registered models' files; without it, the train_prior stage's manifest says.

    The rejection classifier scores each class at its output for that name (score_columns), whatever its own
    order. A prior file written before priors kept their class names gives only its count: the classifier's
    classes (`classifier_classes`, else the train_classifier stage's) are then taken in their order, as before.
    Not the dataset's classes: under `policy.on_new_data: encode` the models keep the first dataset version,
    and a grown dataset may have more classes, which the models cannot sample (evaluate says so).
    """
    if prior_classes is None:
        manifest = ctx.upstream["train_prior"].manifest
        prior_classes = {level: (info["prior_config"]["num_classes"], manifest.get("classes"))
                         for level, info in manifest["levels"].items()}
    conditioned = {level: (count, names) for level, (count, names) in prior_classes.items() if count}
    named = {tuple(names) for count, names in conditioned.values() if names}
    if len(named) > 1:
        raise RuntimeError(f"the priors were trained on different classes ({' vs '.join(map(str, map(list, named)))}): "
                           "take priors of one training")
    classes = list(named.pop()) if named else classifier_classes or ctx.upstream["train_classifier"].manifest["classes"]
    for level, (count, _) in conditioned.items():
        if count != len(classes):
            raise RuntimeError(f"the {level} prior knows {count} classes, the classifier {len(classes)}: "
                               "train both on the same dataset")
    return classes


def plan(section: SampleConfig, num_classes: int) -> list[dict]:
    """The batches to sample: each a list of (label, index, seed), one output file pair per batch."""
    classes = section.classes if section.classes is not None else list(range(num_classes))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"sample.classes {bad} are not indices of the {num_classes} classes the models were trained on")
    items = [(label, i, sample_seed(section.seed, label, i)) for label in classes for i in range(section.samples_per_class)]
    size = section.batch_size
    return [
        {"batch": b, "labels": [t[0] for t in chunk], "indices": [t[1] for t in chunk], "seeds": [t[2] for t in chunk]}
        for b, chunk in enumerate(items[i : i + size] for i in range(0, len(items), size))
    ]


def batch_files(output: Location, batch: int) -> tuple[Location, Location]:
    """(images tar, codes Parquet) of one batch; the Parquet is written last and marks the batch done."""
    return output / f"images/batch-{batch:06d}.tar", output / f"codes/batch-{batch:06d}.parquet"


class Scorer:
    """p(class | image) for the sampled classes, from the rejection classifier (`rejection_classifier`): a
    classifier file, or EfficientNet-Lite0 by name; `columns[label]` is the output column of class `label`."""

    def __init__(self, classifier: Location | str, columns: list[int], device: torch.device):
        if classifier == EFFICIENTNET_LITE0:
            self.net = load_feature_net(EFFICIENTNET_LITE0, device=device)
        else:
            self.net = load_feature_net(CLASSIFIER, classifier, device)
        self.columns = torch.tensor(columns)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        probs = self.net.logits(images).softmax(-1)
        return probs.gather(1, self.columns[labels.cpu()][:, None])[:, 0]


class SampleActor:
    """One set of models per actor: priors, VQ-VAE decoder and scorer; one call samples one batch."""

    def __init__(self, models: dict, layout: CodesLayout, classes: list[str], output: Location, section: SampleConfig,
                 fault: str | None):
        self.device = torch.device("cuda" if section.use_gpu and torch.cuda.is_available() else "cpu")
        self.vqvae, _ = load_model(models["vqvae"], "vqvae", self.device)
        self.priors = [load_model(m, "prior", self.device)[0] for m in models["priors"]]
        self.scorer = Scorer(models["classifier"], models["score_columns"], self.device)
        self.layout, self.classes, self.output, self.section, self.fault = layout, classes, output, section, fault
        levels = len(layout.grids)
        self.temperatures = per_level(section.temperature, levels, "temperature")
        self.top_ks = per_level(section.top_k, levels, "top_k")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        number = int(batch["batch"][0])
        maybe_inject_fault(self.fault, NAME, number)
        labels = torch.tensor(np.asarray(batch["labels"][0]).tolist(), dtype=torch.long)
        indices, seeds = list(batch["indices"][0]), [int(s) for s in batch["seeds"][0]]
        codes = sample_codes(self.priors, labels.to(self.device), seeds, self.temperatures, self.top_ks)
        images = to_uint8(self.vqvae.decode_codes(codes))  # rejection scores the pixels the tar keeps
        scores = self.scorer(images, labels)
        keys = [f"{self.classes[label]}/sample-{index:06d}" for label, index in zip(labels.tolist(), indices)]
        tar, parquet = batch_files(self.output, number)
        tar.write_bytes(_tar_bytes(keys, images.cpu(), labels))
        temperature = pa.FixedSizeListArray.from_arrays(
            pa.array(np.tile(np.asarray(self.temperatures, np.float32), len(keys))), len(self.temperatures))
        extra = zip(sample_fields(len(codes)), [pa.array(seeds, pa.int64()), temperature, pa.array(scores.numpy())])
        write_codes(parquet, codes_table(keys, labels.numpy(), codes, self.layout, list(extra)))
        return {"batch": np.array([number]), "samples": np.array([len(keys)]),
                "seconds": np.array([time.perf_counter() - started])}


def _tar_bytes(keys: list[str], images: torch.Tensor, labels: torch.Tensor) -> bytes:
    """A WebDataset tar of PNG samples (lossless, so metrics see exactly what the decoder made)."""
    stream = io.BytesIO()
    with wds.TarWriter(stream) as tar:
        for key, image, label in zip(keys, images, labels.tolist()):
            png = io.BytesIO()
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(png, "PNG")
            tar.write({"__key__": key, "png": png.getvalue(), "cls": str(label).encode()})
    return stream.getvalue()


def run_batches(todo: list[dict], actor_args: dict, section: SampleConfig) -> Progress:
    """Sample the given batches on an actor pool (dead actors are replaced); progress on the console."""
    progress = Progress("sample batches", len(todo))
    if not todo:
        return progress
    # A dead actor's batch goes to a new pool; a finished batch is never redone (its files are complete).
    for row in pool_rows(todo, SampleActor, actor_args, actors=section.num_actors, num_gpus=1 if section.use_gpu else 0):
        progress.advance(1, int(row["samples"]))
    return progress


def best_of_each_class(scores: np.ndarray, labels: np.ndarray, fraction: float) -> np.ndarray:
    """The best `fraction` of each class's samples (at least one) by score: exactly that many, however many
    scores tie (a confident classifier's softmax reaches 1.0), the earlier row first; NaN scores rank last."""
    mask = np.zeros(len(scores), bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        keep = max(1, math.ceil(fraction * len(rows)))
        mask[rows[np.argsort(-scores[rows], kind="stable")[:keep]]] = True
    return mask


def accept(scores: np.ndarray, labels: np.ndarray,
           rejection: RejectionConfig) -> tuple[np.ndarray, dict[int, float | None]]:
    """Which samples rejection keeps (the rule the evaluate stage applies too), and each class's lowest
    accepted score (None where it keeps none)."""
    accepted = np.ones(len(scores), bool)
    if rejection.keep_fraction is not None:
        accepted = best_of_each_class(scores, labels, rejection.keep_fraction)
    if rejection.threshold is not None:
        accepted &= scores >= rejection.threshold
    lowest = {}
    for label in np.unique(labels):
        kept = scores[accepted & (labels == label)]
        lowest[int(label)] = float(kept.min()) if len(kept) else None
    return accepted, lowest


def read_samples(output: Location, batches: int, levels: int) -> pa.Table:
    """Every sample row of a complete sample output, in batch order."""
    tables = [read_codes(batch_files(output, b)[1], sample_fields(levels))[1] for b in range(batches)]
    return pa.concat_tables(tables)


def _grids(table: pa.Table, accepted: np.ndarray, vqvae, layout: CodesLayout, per_row: int) -> tuple[bytes, bytes]:
    """A row per class of samples; and per class the best accepted row above the worst rejected row."""
    labels = table.column("label").to_numpy()
    scores = table.column("score").to_numpy()
    _, codes = table_tensors(table, layout)

    def decode(rows: np.ndarray) -> torch.Tensor:
        index = torch.tensor(rows.tolist(), dtype=torch.long)  # a reversed numpy slice has negative strides
        return to_uint8(vqvae.decode_codes([c[index].long() for c in codes]))

    samples, split = [], []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        samples.append(decode(rows[:per_row]))
        by_score = rows[np.argsort(-scores[rows])]
        kept, dropped = by_score[accepted[by_score]], by_score[~accepted[by_score]][::-1]
        split.append(decode(kept[:per_row]))
        split.append(decode(dropped[:per_row]) if len(dropped) else decode(kept[:0]))
    return png_bytes(image_grid(samples)), png_bytes(image_grid(split))


def _stage_model(ctx, stage: str, level: str | None = None) -> Location:
    result = ctx.upstream[stage]
    return result.location / (result.manifest["levels"][level]["model"] if level else result.manifest["model"])


def check_codes_vqvae(learned_from: dict[str, str | None], vqvae: str, fingerprint: str) -> None:
    """Refuse priors that learned the codes of another VQ-VAE than `vqvae` (train_vqvae `fingerprint`), which
    decodes the samples: another training of the same preset makes codes of the same grids and codebook size,
    but its code k is another picture, so its samples would be noise that no shape check catches.
    `learned_from`: each prior (named) and the fingerprint of the VQ-VAE whose codes it learned; None for a
    prior file written before train_prior recorded it, whose pairing is left to the shape check, with a warning."""
    others: dict[str, list[str]] = {}
    for prior, learned in learned_from.items():
        if learned is not None and learned != fingerprint:
            others.setdefault(learned, []).append(prior)
    if others:
        found = "; ".join(f"{' and '.join(priors)} learned the codes of the VQ-VAE of fingerprint {learned}"
                          for learned, priors in others.items())
        raise ValueError(f"{found}; the samples would be decoded by {vqvae}, fingerprint {fingerprint}, whose codes "
                         "mean other pictures: set sample.vqvae to the VQ-VAE the priors were trained on (the "
                         "vq2-vqvae version tagged with that fingerprint, or unset for this pipeline's train_vqvae), "
                         "or take priors trained on this VQ-VAE's codes")
    unknown = [prior for prior, learned in learned_from.items() if learned is None]
    if unknown:
        log.warning("sample: %s do not record which VQ-VAE's codes they learned (written before train_prior kept "
                    "it), so only their grids and codebook sizes are checked against %s; if another training made "
                    "them, the samples are noise", " and ".join(unknown), vqvae)


def sampling_models(cfg: PipelineConfig, ctx) -> tuple[dict, CodesLayout, list[str], torch.nn.Module]:
    """(model files, code layout, classes, VQ-VAE) of this run: each model from its training stage or, where
    the config names one, from the Model Registry (copied under the output once its digest checks out);
    models from different trainings are checked to fit together."""
    registered = ctx.external or {}
    if registered:
        from mlflow.entities import LoggedModelInput  # here: the pool's actors import this module, and track nothing

        ctx.tracking.log_inputs(models=[LoggedModelInput(version.model_id) for version in registered.values()])
        ctx.tracking.set_tags({f"registry.{role}": f"{v.name}/{v.version}" for role, v in registered.items()})
    files = {role: registry.fetch(cfg, version, ctx.output / MODELS / f"{role}.pt") for role, version in registered.items()}
    vqvae_file = files.get("vqvae") or _stage_model(ctx, "train_vqvae")
    vqvae, vqvae_extra = load_model(vqvae_file, "vqvae")
    if "vqvae" in registered:
        vqvae_fingerprint = registered["vqvae"].fingerprint
        vqvae_name = f"{registered['vqvae'].uri} (version {registered['vqvae'].version})"
    else:
        vqvae_fingerprint = ctx.upstream["train_vqvae"].fingerprint
        vqvae_name = f"the train_vqvae stage's {vqvae_file.uri}"
    prior_classes = None
    if cfg.sample.priors:
        names = level_names(len(cfg.sample.priors))
        priors = [files[f"prior.{name}"] for name in names]
        loaded = [load_model(file, "prior") for file in priors]
        prior_configs = [model.cfg for model, _ in loaded]
        prior_classes = {name: (model.cfg.num_classes, extra.get("classes")) for name, (model, extra) in zip(names, loaded)}
        learned_from = {f"{registered[f'prior.{name}'].uri} (version {registered[f'prior.{name}'].version})":
                        extra.get("vqvae_fingerprint") for name, (_, extra) in zip(names, loaded)}
        layout = CodesLayout([c.grid for c in prior_configs], [c.codebook_size for c in prior_configs],
                             vqvae_file.uri, vqvae_fingerprint)
    else:
        layout = CodesLayout(**ctx.upstream["train_prior"].manifest["layout"])
        # By level name: manifests are written with sorted keys, so their order is not the levels'.
        priors = [_stage_model(ctx, "train_prior", name) for name in layout.levels]
        learned_from = {f"the train_prior stage's priors in {ctx.upstream['train_prior'].location.uri} (trained on "
                        f"codes of {layout.vqvae_model})": layout.vqvae_fingerprint}
        layout = dataclasses.replace(layout, vqvae_model=vqvae_file.uri, vqvae_fingerprint=vqvae_fingerprint)
    if registered:
        check_codes_vqvae(learned_from, vqvae_name, vqvae_fingerprint)
        grids = [tuple(g) for g in vqvae.cfg.grid_shapes(vqvae_extra["image_size"])]
        if grids != list(layout.grids) or set(layout.codebook_sizes) != {vqvae.cfg.codebook_size}:
            raise ValueError(f"the priors model codes of grids {list(layout.grids)} and codebooks "
                             f"{list(layout.codebook_sizes)}, the VQ-VAE {vqvae_file} makes {grids} of "
                             f"{vqvae.cfg.codebook_size}: take priors trained on this VQ-VAE's codes")
    classifier = files.get("classifier") or rejection_classifier(cfg, ctx)
    known = None if classifier == EFFICIENTNET_LITE0 else _classifier_classes(classifier)
    classes = trained_classes(ctx, known if "classifier" in files else None, prior_classes)
    models = {"vqvae": vqvae_file, "priors": priors, "classifier": classifier,
              "score_columns": score_columns(cfg, classifier, known, classes)}
    return models, layout, classes, vqvae


def rejection_classifier(cfg: PipelineConfig, ctx) -> Location | str:
    """The classifier that `sample.rejection.classifier` names, other than a registered one: a classifier file
    (the train_classifier stage's or the one at a path or URI), or EfficientNet-Lite0 by name."""
    if cfg.sample.rejection.classifier == EFFICIENTNET_LITE0:
        return EFFICIENTNET_LITE0
    return classifier_file(cfg) or _stage_model(ctx, "train_classifier")


def score_columns(cfg: PipelineConfig, classifier: Location | str, known: list[str] | None,
                  classes: list[str]) -> list[int]:
    """For each class label of the priors, the rejection classifier's output column that scores it, found by
    class name (`known`: a classifier file's classes): a classifier that orders its classes otherwise scores
    the right ones, and one that lacks a class of the priors is refused before any sampling."""
    key = f"sample.rejection.classifier={cfg.sample.rejection.classifier}"
    if classifier == EFFICIENTNET_LITE0:
        try:
            return imagenet_class_indices(classes)
        except ValueError as error:
            raise ValueError(f"{key} scores ImageNet-1k classes, but {error}; score with 'dataset' (the "
                             "train_classifier stage) or a classifier trained on these classes") from None
    missing = [name for name in classes if name not in known]
    if missing:
        raise ValueError(f"{key}: the classifier in {classifier.uri} was not trained on {len(missing)} of the "
                         f"{len(classes)} classes the priors were trained on, first {', '.join(map(repr, missing[:5]))}")
    position = {name: column for column, name in enumerate(known)}
    return [position[name] for name in classes]


def _classifier_classes(file: Location) -> list[str]:
    """The class names a classifier file was trained on, in the order of its outputs."""
    classes = load_model(file, "classifier")[1].get("classes")
    if not classes:
        raise ValueError(f"{file.uri}: a classifier file without its class names (save_model(..., classes=[...])), "
                         "so which output scores which class is unknown")
    return list(classes)


def run(cfg: PipelineConfig, ctx) -> dict:
    section = cfg.sample
    models, layout, classes, vqvae = sampling_models(cfg, ctx)
    levels = len(layout.grids)
    per_level(section.temperature, levels, "temperature")
    per_level(section.top_k, levels, "top_k")
    batches = plan(section, len(classes))
    todo = [b for b in batches if not batch_files(ctx.output, b["batch"])[1].exists()]
    actor_args = {"models": models, "layout": layout, "classes": classes, "output": ctx.output,
                  "section": section, "fault": fault_spec()}
    progress = run_batches(todo, actor_args, section)

    table = read_samples(ctx.output, len(batches), levels)
    labels, scores = table.column("label").to_numpy(), table.column("score").to_numpy()
    accepted, lowest_scores = accept(scores, labels, section.rejection)
    samples_png, rejection_png = _grids(table, accepted, vqvae, layout, section.grid_per_class)
    ctx.tracking.log_bytes(samples_png, "samples.png")
    ctx.tracking.log_bytes(rejection_png, "rejection_accepted_vs_rejected.png")
    (ctx.output / "samples.png").write_bytes(samples_png)
    metrics = {
        "samples": len(table), "accepted": int(accepted.sum()), "acceptance_rate": float(accepted.mean()),
        "mean_score": float(scores.mean()), "sampled_batches": len(todo),
    }
    if todo:  # a rerun that finds every batch written has no rate to report
        metrics["samples_per_s"] = progress.rate
    ctx.tracking.log_metrics(metrics)
    return {
        "batches": len(batches),
        "codes": [batch_files(ctx.output, b["batch"])[1].uri for b in batches],
        "images": [batch_files(ctx.output, b["batch"])[0].uri for b in batches],
        "layout": dataclasses.asdict(layout),
        "classes": classes,
        "sampled_labels": sorted(lowest_scores),
        "lowest_accepted_scores": {str(k): v for k, v in lowest_scores.items()},
        "grid": "samples.png",
        "metrics": metrics,
    }
