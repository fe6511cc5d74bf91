"""Train the pipeline's own classifier on the real training shards with Ray Train (DDP), checkpointing to storage.

The classifier (models/classifier.py) scores samples for classifier-based rejection sampling
(PAPER.md section 3.3), is the dataset-specific feature/logit network of the metrics
(pipeline/feature_nets.py, `classifier`) and is the real-data reference of the Classification
Accuracy Score. `fit_classifier` / `classification_accuracy_score` train the same model on
in-memory tensors in one process: CAS trains it on samples and tests it on real validation images.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math

import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F

from models.classifier import CLASSIFIER_PRESETS, ClassifierConfig, ResNetClassifier, classifier_tiny
from pipeline import registry, training
from pipeline.checkpoints import model_from_state, save_model
from pipeline.config import PipelineConfig, TrainClassifierConfig
from pipeline.dataset import Dataset
from pipeline.faults import fault_spec, maybe_inject_fault
from pipeline.metrics import accuracy_scores
from pipeline.shard_reader import batch_loader, collate, read_tar, to_model_range
from pipeline.storage import Location

# Ray Train streams worker logs to the driver's console once (a print is teed and shows twice).
log = logging.getLogger(__name__)

NAME = "train_classifier"
SECTION = "train_classifier"
FORMAT_VERSION = 1
TRAINS = True  # sees the dataset version that policy.on_new_data picks
UPSTREAM = ("shard",)
MODEL_FILE = "classifier.pt"
VAL_BATCH = 128


def classifier_config(section: TrainClassifierConfig, num_classes: int) -> ClassifierConfig:
    return dataclasses.replace(CLASSIFIER_PRESETS[section.preset](num_classes), **section.model)


def _all_reduce_sum(values: list[float], dev: torch.device) -> list[float]:
    totals = torch.tensor(values, dtype=torch.float64, device=dev)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    return totals.tolist()


def _sync_buffers_from_rank0(model: torch.nn.Module) -> None:
    # Batch-norm statistics differ by the last local update on each rank; evaluate rank 0's (the saved ones).
    if torch.distributed.is_initialized():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def val_pieces(shards: list[tuple[Location, int]], limit: int | None) -> list[tuple[Location, int | None]]:
    """The first `limit` images of the val split (all of it for None) as (shard, count) pieces, count None for
    a whole shard. The ranks deal the pieces out, so which images are scored does not depend on the worker
    count, and a split of fewer shards than workers is still scored up to `limit`."""
    pieces, left = [], math.inf if limit is None else limit
    for shard, samples in shards:
        if left <= 0:
            break
        pieces.append((shard, None if samples <= left else int(left)))
        left -= samples
    return pieces


def _val_batches(pieces: list[tuple[Location, int | None]], workers: int):
    """(images, labels) batches of a rank's val pieces: whole shards through the loader's processes, a shard cut
    by the limit read here up to its count."""
    whole = [shard for shard, count in pieces if count is None]
    if whole:
        for _, images, labels in batch_loader(whole, VAL_BATCH, repeat=False, workers=workers):
            yield images, labels
    for shard, count in pieces:
        if count is not None:
            samples = itertools.islice(read_tar(shard), count)
            while batch := list(itertools.islice(samples, VAL_BATCH)):
                _, images, labels = collate(batch)
                yield images, labels


@torch.no_grad()
def _validate(model: ResNetClassifier, pieces: list[tuple[Location, int | None]], dev,
              workers: int) -> dict[str, float]:
    """Every rank scores its own val pieces; the sums are all-reduced."""
    model.eval()
    _sync_buffers_from_rank0(model)
    loss_sum = top1 = top5 = seen = 0.0
    for images, labels in _val_batches(pieces, workers):
        logits = model(to_model_range(images.to(dev))).float().cpu()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        k5 = min(5, logits.shape[1])
        hits = logits.topk(k5, dim=1).indices == labels.unsqueeze(1)
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
        seen += len(labels)
    loss_sum, top1, top5, seen = _all_reduce_sum([loss_sum, top1, top5, seen], dev)
    if seen == 0:
        raise ValueError("train_classifier: the val split yielded no images")
    return {"val_loss": loss_sum / seen, "val_top1": top1 / seen, "val_top5": top5 / seen, "val_images": seen}


def train_loop(config: dict) -> None:
    """The per-worker training function (a Ray Train worker runs one copy per rank)."""
    cfg: PipelineConfig = config["cfg"]
    section = cfg.train_classifier
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    dev = training.device(section)
    torch.manual_seed(section.seed)  # identical initial weights on every rank

    layout = training.memory_format(section)
    model = ResNetClassifier(config["model_config"]).to(dev, memory_format=layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=section.lr, weight_decay=section.weight_decay)
    step = resumed_from = training.restore(model, optimizer)
    training.seed_rank_stream((section.seed,), rank, step)
    ddp_model = ray.train.torch.prepare_model(model)

    # Each rank streams its share of the train shards, dealt anew every pass, repeating, so all ranks take the
    # same number of steps; the deal depends on the seed and the step resumed from, the shuffle also on the rank.
    loader = batch_loader(
        config["train_shards"], section.batch_size, repeat=True, seed=training.data_seed(section.seed, step),
        rank=rank, world=world, shuffle_buffer=section.shuffle_buffer, augment=section.augment,
        workers=section.loader_workers,
    )
    val_share = config["val_pieces"][rank::world]
    tracking = training.worker_tracking(config)
    throughput = training.Throughput(world)
    fault = config["fault"]
    batches = iter(loader)
    loss_sum = correct = seen = 0.0
    val_metrics: dict[str, float] = {}

    while step < section.steps:
        maybe_inject_fault(fault, NAME, step, rank)
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = training.learning_rate(section, step)
        _, images, labels = next(batches)
        images = to_model_range(images.to(dev, non_blocking=True, memory_format=layout))
        labels = labels.to(dev, non_blocking=True)
        with training.autocast(section, dev):
            logits = ddp_model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=section.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if section.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), section.grad_clip)
        optimizer.step()
        throughput.add(len(images))
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(dim=1) == labels).sum().item()
        seen += len(labels)
        step += 1

        if step % section.log_every == 0 or step == section.steps:
            # Averages since the last log over every rank's batches (a collective: all ranks log together).
            total_loss, total_correct, total_seen = _all_reduce_sum([loss_sum, correct, seen], dev)
            metrics = {"train_loss": total_loss / total_seen, "train_accuracy": total_correct / total_seen,
                       "lr": optimizer.param_groups[0]["lr"], "images_per_s": throughput.rate()}
            loss_sum = correct = seen = 0.0
            tracking.log_metrics(metrics, step)
            if rank == 0:
                log.info("train_classifier step %d/%d loss %.4f accuracy %.3f %s images/s", step, section.steps,
                         metrics["train_loss"], metrics["train_accuracy"], training.rate_text(metrics["images_per_s"]))
        if step % section.validate_every == 0 or step == section.steps:
            val_metrics = _validate(model, val_share, dev, section.loader_workers)
            tracking.log_metrics(val_metrics, step)
            if rank == 0:
                log.info("train_classifier step %d val top-1 %.3f top-5 %.3f", step, val_metrics["val_top1"],
                         val_metrics["val_top5"])
        if step % section.checkpoint_every == 0 or step == section.steps:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "seed": section.seed, "world_size": world}
            training.report({"step": step, "resumed_from": resumed_from, **val_metrics}, state)
    tracking.close()


def run(cfg: PipelineConfig, ctx) -> dict:
    section = cfg.train_classifier
    dataset = Dataset.open(ctx.upstream["shard"].location)
    train_shards, _ = training.image_shards(dataset, section, NAME, cfg.dataset.image_size)
    model_config = classifier_config(section, len(dataset.classes))
    loop_config = {"cfg": cfg, "model_config": model_config, "train_shards": train_shards,
                   "val_pieces": val_pieces(dataset.shard_sizes("val"), section.val_samples),
                   "run_id": ctx.tracking.run_id, "output": ctx.output, "fault": fault_spec()}
    result = training.fit(train_loop, loop_config, section, ctx.output)
    state = training.read_checkpoint_state(result.checkpoint)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    val = {k: metrics[f"val_{k}"] for k in ("top1", "top5", "loss") if f"val_{k}" in metrics}
    model = model_from_state("classifier", dataclasses.asdict(model_config), state["model"])
    save_model(ctx.output / MODEL_FILE, "classifier", model, step=state["step"], image_size=cfg.dataset.image_size,
               classes=list(dataset.classes), val=val)
    registry.register(ctx, cfg, "classifier", ctx.output / MODEL_FILE, model_config, image_size=cfg.dataset.image_size)
    ctx.tracking.set_tags({"checkpoint": result.checkpoint.path, "model_uri": (ctx.output / MODEL_FILE).uri})
    return {
        "model": MODEL_FILE,
        "checkpoint": result.checkpoint.path,
        "classifier_config": dataclasses.asdict(model_config),
        "image_size": cfg.dataset.image_size,
        "classes": list(dataset.classes),
        "steps": state["step"],
        "val": val,
        "metrics": metrics,
    }


# --- one process, in-memory tensors (CAS) ---------------------------------------------------------------


def _as_model_range(images: torch.Tensor) -> torch.Tensor:
    return to_model_range(images) if images.dtype == torch.uint8 else images.float()


def fit_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    model_config: ClassifierConfig | None = None,
    *,
    steps: int = 500,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    label_smoothing: float = 0.0,
    augment: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ResNetClassifier:
    """Train a ResNetClassifier on in-memory images (N, 3, H, W; uint8 or [-1, 1]) and labels (N,).

    Single process, AdamW with the cosine schedule to a tenth of `lr`, random horizontal flips,
    shuffled epochs; deterministic for a seed. Returns the model in eval mode, on `device`.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many images as labels (> 0), got {len(images)} and {len(labels)}")
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    dev = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded initial weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = ResNetClassifier(model_config or classifier_tiny(num_classes)).to(dev)
    if model.cfg.num_classes != num_classes:
        raise ValueError(f"model_config.num_classes={model.cfg.num_classes} but num_classes={num_classes}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    batch_size = min(batch_size, len(images))
    order = torch.randperm(len(images), generator=generator)
    position = 0
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        if position + batch_size > len(order):
            order, position = torch.randperm(len(images), generator=generator), 0
        index = order[position : position + batch_size]
        position += batch_size
        x = _as_model_range(images[index]).to(dev)
        if augment:
            flip = torch.rand(len(index), generator=generator) < 0.5
            x[flip.to(dev)] = x[flip.to(dev)].flip(-1)
        loss = F.cross_entropy(model(x), labels[index].to(dev), label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                        device: str | torch.device | None = None) -> dict[str, float]:
    """{'top1', 'top5', 'loss'} of a classifier on images (uint8 or [-1, 1]) and labels."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    logits = torch.cat([model(_as_model_range(chunk).to(dev)).float().cpu() for chunk in images.split(batch_size)])
    labels = torch.as_tensor(labels, dtype=torch.long)
    return accuracy_scores(logits, labels) | {"loss": F.cross_entropy(logits, labels).item()}


def classification_accuracy_score(
    train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor, test_labels: torch.Tensor,
    num_classes: int, model_config: ClassifierConfig | None = None, **fit_options,
) -> dict[str, float]:
    """CAS (Ravuri & Vinyals 2019): train a classifier only on `train_*` (the samples), test it on `test_*`
    (real validation images); {'top1', 'top5', 'loss'}. The same call on real training images gives the
    real-data reference the paper reports beside it."""
    model = fit_classifier(train_images, train_labels, num_classes, model_config, **fit_options)
    return evaluate_classifier(model, test_images, test_labels)
