"""What the Ray Train stages share: scaling and run configs, checkpoints, LR schedule, seeds, worker tracking."""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.config import ImageTrainerConfig, TrainerConfig
from pipeline.dataset import Dataset
from pipeline import system_metrics
from pipeline.storage import Location
from pipeline.system_metrics import SystemMetrics
from pipeline.tracking import StageRun, Tracker

CHECKPOINT_FILE = "state.pt"


def scaling_config(section: TrainerConfig) -> ScalingConfig:
    return ScalingConfig(
        num_workers=section.num_workers,
        use_gpu=section.use_gpu,
        resources_per_worker={"CPU": section.cpus_per_worker} | ({"GPU": 1} if section.use_gpu else {}),
    )


def run_config(output: Location, section: TrainerConfig) -> RunConfig:
    """Checkpoints go under the stage's own output prefix; the same name resumes a crashed run."""
    storage_path, filesystem = ray_storage(output)
    return RunConfig(
        name="ray_train",
        storage_path=storage_path,
        storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=section.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        # Ray Train's INFO lines (worker group start, DDP wrapping, a "Reporting training result" line per rank
        # and report with the whole metrics dict) go to its log files only; the stages log their own progress.
        logging_config=LoggingConfig(log_level="WARNING"),
    )


def ray_storage(location: Location) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train; S3 credentials stay in the environment."""
    if location.protocol == "file":
        return location.path, None
    if location.protocol in ("s3", "s3a"):
        endpoint = location.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
        # Checkpoint writes go through pyarrow's S3 client: retried as often as the storage policy says.
        options = {"region": location.region or os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                   "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=location.retry.attempts)}
        if endpoint:
            parsed = urlparse(endpoint)
            options |= {"endpoint_override": parsed.netloc, "scheme": parsed.scheme or "https"}
        return location.path, pyarrow.fs.S3FileSystem(**options)
    raise ValueError(f"Ray Train cannot keep checkpoints on {location.protocol}:// ({location.uri}); use file:// or s3://")


def learning_rate(section: TrainerConfig, step: int) -> float:
    """Linear warm-up, then constant or cosine decay to a tenth of the peak."""
    if step < section.warmup_steps:
        return section.lr * (step + 1) / section.warmup_steps
    if section.lr_schedule == "constant":
        return section.lr
    progress = (step - section.warmup_steps) / max(1, section.steps - section.warmup_steps)
    return section.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def stream_seed(key: tuple[int, ...], rank: int, step: int) -> int:
    """The seed of one rank's training randomness (dropout, ...) from `step` on: `key` (the stage's seed, the level)
    names the model; every rank and every step a run starts or resumes from gets a stream of its own."""
    # Hashed, not summed: with a sum, one rank's stream after a resume could be another's from step 0.
    return _hashed((tuple(key), rank, step))


def data_seed(seed: int, step: int) -> int:
    """The seed of an image stage's data order (the deal of the shards to the ranks, each pass) from `step` on:
    the same on every rank, another for every step a run starts or resumes from."""
    return _hashed(("data", seed, step))


def _hashed(parts: tuple) -> int:
    # repr takes any int, a negative configured seed too.
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def seed_rank_stream(key: tuple[int, ...], rank: int, step: int) -> None:
    """Seed torch (CPU and GPUs) with this rank's stream_seed. Call it once the weights are built from the shared
    seed and the checkpoint is restored: DDP averages the gradients of different dropout masks, and a resume does
    not replay step 0's. What must agree across ranks (the VQ-VAE's codebook draws) is broadcast from rank 0."""
    torch.manual_seed(stream_seed(key, rank, step))


def rate_text(rate: float) -> str:
    """A rate for a progress line: whole numbers from 100 up, three significant digits below (a paper-size model
    on a CPU can take seconds per image: its line must not read 0 images/s)."""
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"


def device(section: TrainerConfig) -> torch.device:
    """This worker's device; on CPU, as many torch threads as the worker reserved CPUs."""
    dev = ray.train.torch.get_device()
    if dev.type == "cpu":
        torch.set_num_threads(max(1, int(section.cpus_per_worker)))
    return dev


def autocast(section: TrainerConfig, dev: torch.device):
    """bf16 autocast on CUDA when configured; a no-op context elsewhere."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=section.bf16 and dev.type == "cuda")


def memory_format(section: ImageTrainerConfig) -> torch.memory_format:
    """The layout of an image stage's weights and batches: channels_last when configured, where cuDNN runs
    convolutions and batch norm in bf16 without transposing to and from NCHW; torch's default otherwise."""
    return torch.channels_last if section.channels_last else torch.contiguous_format


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load the latest checkpoint of this run (after a restart or a resume) into model and optimizer;
    returns the step to continue from (0 for a fresh run)."""
    checkpoint = ray.train.get_checkpoint()
    return 0 if checkpoint is None else load_state(model, optimizer, read_checkpoint_state(checkpoint))


def load_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> int:
    """Load a checkpoint state (`model`, `optimizer`, `step`) into model and optimizer; returns its step."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def image_shards(dataset: Dataset, section: TrainerConfig, stage: str, image_size: int | None):
    """(train, val) shard locations for an image-training stage, with every precondition checked."""
    if image_size is None:
        raise ValueError(f"{stage} batches images of one size: set dataset.image_size")
    splits = {split: dataset.shards(split) for split in ("train", "val")}
    for split, shards in splits.items():
        if not shards:
            raise ValueError(f"dataset {dataset.location} has no {split!r} shards; {stage} needs train and val splits")
    if len(splits["train"]) < section.num_workers:
        raise ValueError(
            f"{stage}.num_workers={section.num_workers} but the dataset has only {len(splits['train'])} train "
            "shards: every worker streams its own shards; lower dataset.shard_size or the worker count"
        )
    return splits["train"], splits["val"]


def fit(train_loop, loop_config: dict, section: TrainerConfig, output: Location, datasets: dict | None = None):
    """Run a TorchTrainer with the section's scaling and checkpoints under `output`; its Result."""
    trainer = TorchTrainer(
        train_loop,
        # The driver's node: rank 0 logs its machine's system metrics only when that is another one.
        train_loop_config=loop_config | {"driver_node": ray.get_runtime_context().get_node_id()},
        scaling_config=scaling_config(section),
        run_config=run_config(output, section),
        datasets=datasets,
    )
    return trainer.fit()


def report(metrics: dict, state: dict | None = None) -> None:
    """ray.train.report from every rank; rank 0 attaches the checkpoint when `state` is given."""
    if state is None or ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, Path(folder) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


def read_checkpoint_state(checkpoint: Checkpoint) -> dict:
    """Driver side: the state saved in a Ray Train checkpoint."""
    with checkpoint.as_directory() as folder:
        # Mapped, not read: the driver only touches the model of a state that also holds the optimizer
        # (ImageNet-256 bottom prior: 4.8 GB, 1.6 GB of it the model). Private mappings: never written back.
        return torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True, mmap=True)


def worker_tracking(config: dict) -> StageRun:
    """The stage's MLflow run, reached from a Ray Train worker (only rank 0 logs) with the loop config's `cfg`,
    `run_id` and `output`. Call its `close()` at the end of the loop: what MLflow did not receive by then is
    left under `output` for the driver to deliver. On another node than the driver's, rank 0 logs its
    machine's system metrics too."""
    cfg, run_id = config["cfg"], config["run_id"]
    if ray.train.get_context().get_world_rank() != 0 or run_id is None:
        return StageRun(None, None)
    stage_run = StageRun(Tracker(cfg), run_id, spill_to=config["output"])
    node = system_metrics.node_id()
    if node is not None and ray.get_runtime_context().get_node_id() != config.get("driver_node"):
        stage_run.system_metrics = SystemMetrics(stage_run, cfg.mlflow.system_metrics_s, node).__enter__()
    return stage_run


def max_rank_difference(tensors: list[torch.Tensor]) -> float:
    """Largest absolute difference between any rank's tensors and rank 0's (0.0 when in sync)."""
    if not torch.distributed.is_initialized():
        return 0.0
    worst = torch.zeros((), device=tensors[0].device)
    for tensor in tensors:
        reference = tensor.detach().clone()
        torch.distributed.broadcast(reference, src=0)
        worst = torch.maximum(worst, (tensor.detach() - reference).abs().max())
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    return worst.item()


class Throughput:
    """Images per second since the last call, across all ranks."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.images = 0
        self._last = time.perf_counter()

    def add(self, batch: int) -> None:
        self.images += batch * self.world_size

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.images / max(now - self._last, 1e-9)
        self.images, self._last = 0, now
        return rate
