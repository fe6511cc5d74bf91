"""Stage 1: train the hierarchical VQ-VAE on the shards with Ray Train (DDP), checkpointing to storage."""

from __future__ import annotations

import dataclasses
import logging

import ray.train
import ray.train.torch
import torch

from models.vqvae import VQVAE, VQVAE_PRESETS, VQVAEConfig
from pipeline import registry, training
from pipeline.checkpoints import model_from_state, save_model
from pipeline.config import PipelineConfig, TrainVQVAEConfig
from pipeline.dataset import Dataset
from pipeline.faults import fault_spec, maybe_inject_fault
from pipeline.figures import image_grid, png_bytes
from pipeline.shard_reader import batch_loader, to_model_range, to_uint8

# Ray Train streams worker logs to the driver's console once (a print is teed and shows twice).
log = logging.getLogger(__name__)

NAME = "train_vqvae"
SECTION = "train_vqvae"
FORMAT_VERSION = 1
TRAINS = True  # sees the dataset version that policy.on_new_data picks
UPSTREAM = ("shard",)
MODEL_FILE = "vqvae.pt"


def vqvae_config(section: TrainVQVAEConfig) -> VQVAEConfig:
    return dataclasses.replace(VQVAE_PRESETS[section.preset](), **section.model)


def train_loop(config: dict) -> None:
    """The per-worker training function (a Ray Train worker runs one copy per rank)."""
    cfg: PipelineConfig = config["cfg"]
    section = cfg.train_vqvae
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    dev = training.device(section)
    torch.manual_seed(section.seed)  # identical initial weights on every rank

    layout = training.memory_format(section)
    model = VQVAE(config["model_config"]).to(dev, memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=section.lr)
    step = resumed_from = training.restore(model, optimizer)
    training.seed_rank_stream((section.seed,), rank, step)
    # The EMA codebooks sync themselves (all-reduce); DDP must not overwrite them from rank 0 on
    # every forward (it still syncs them once at start, which a resume relies on).
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"forward_sync_buffers": False})

    # Each rank streams its share of the shards, dealt anew every pass; the stream repeats, so all ranks
    # take the same number of steps whatever their share. The deal depends on the seed and the step
    # resumed from, the shuffle and the flips also on the rank.
    loader = batch_loader(
        config["train_shards"], section.batch_size, repeat=True, seed=training.data_seed(section.seed, step),
        rank=rank, world=world, shuffle_buffer=section.shuffle_buffer, augment=True, workers=section.loader_workers,
    )
    validation = _validation_batch(config["val_shards"], section.val_samples) if rank == 0 else None
    tracking = training.worker_tracking(config)
    throughput = training.Throughput(world)
    fault = config["fault"]
    batches = iter(loader)
    if rank == 0 and step == 0:
        _validate(model, validation, tracking, step, dev)  # the untrained baseline

    while step < section.steps:
        maybe_inject_fault(fault, NAME, step, rank)
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = training.learning_rate(section, step)
        _, images, _ = next(batches)
        images = to_model_range(images.to(dev, non_blocking=True, memory_format=layout))
        with training.autocast(section, dev):
            out = ddp_model(images)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if section.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), section.grad_clip)
        optimizer.step()
        throughput.add(len(images))
        step += 1

        if step % section.log_every == 0 or step == section.steps:
            metrics = _step_metrics(out, optimizer, throughput)
            tracking.log_metrics(metrics, step)
            if rank == 0:
                log.info("train_vqvae step %d/%d loss %.4f recon %.4f %s images/s", step, section.steps,
                         metrics["loss"], metrics["recon_loss"], training.rate_text(metrics["images_per_s"]))
        validate = step % section.validate_every == 0 or step == section.steps
        val_metrics = _validate(model, validation, tracking, step, dev) if validate and rank == 0 else {}
        if step % section.checkpoint_every == 0 or step == section.steps:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "seed": section.seed, "world_size": world}
            divergence = training.max_rank_difference([q.codebook for q in model.quantizers])
            tracking.log_metrics({"codebook_rank_divergence": divergence}, step)
            training.report({"step": step, "resumed_from": resumed_from, "codebook_rank_divergence": divergence,
                             **val_metrics}, state)
    tracking.close()


def _validation_batch(val_shards, samples: int) -> torch.Tensor:
    """The fixed validation images: the first `samples` of the val split, in shard order."""
    images = []
    for _, batch, _ in batch_loader(val_shards, min(samples, 64), repeat=False):
        images.append(batch)
        if sum(len(b) for b in images) >= samples:
            break
    return torch.cat(images)[:samples]


def _step_metrics(out, optimizer, throughput) -> dict[str, float]:
    metrics = {
        "loss": out.loss.item(),
        "recon_loss": out.reconstruction_loss.item(),
        "commitment_loss": out.commitment_loss.item(),
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_s": throughput.rate(),
    }
    for level, stats in enumerate(out.levels):  # level 0 is the top
        metrics[f"perplexity_level{level}"] = stats.perplexity.item()
        metrics[f"codes_in_use_level{level}"] = stats.usage.item()
    return metrics


@torch.no_grad()
def _validate(model: VQVAE, images: torch.Tensor, tracking, step: int, dev) -> dict[str, float]:
    """Validation MSE of decode(encode(x)) on the fixed split; a grid of originals over reconstructions."""
    model.eval()
    reconstructions, errors = [], []
    for chunk in images.split(64):
        x = to_model_range(chunk.to(dev))
        y = model.decode_codes(model.encode(x))
        errors.append(((y - x) ** 2).mean(dim=(1, 2, 3)).cpu())
        reconstructions.append(to_uint8(y).cpu())
    val_mse = torch.cat(errors).mean().item()
    tracking.log_metrics({"val_mse": val_mse}, step)
    grid = image_grid([images[:16], torch.cat(reconstructions)[:16]])
    tracking.log_bytes(png_bytes(grid), f"reconstructions/step_{step:07d}.png")
    return {"val_mse": val_mse}


def run(cfg: PipelineConfig, ctx) -> dict:
    section = cfg.train_vqvae
    dataset = Dataset.open(ctx.upstream["shard"].location)
    train_shards, val_shards = training.image_shards(dataset, section, NAME, cfg.dataset.image_size)
    model_config = vqvae_config(section)
    model_config.grid_shapes(cfg.dataset.image_size)  # fails early if the size does not divide into the levels
    loop_config = {"cfg": cfg, "model_config": model_config, "train_shards": train_shards, "val_shards": val_shards,
                   "run_id": ctx.tracking.run_id, "output": ctx.output, "fault": fault_spec()}
    result = training.fit(train_loop, loop_config, section, ctx.output)
    state = training.read_checkpoint_state(result.checkpoint)
    model = model_from_state("vqvae", dataclasses.asdict(model_config), state["model"])
    save_model(ctx.output / MODEL_FILE, "vqvae", model, step=state["step"], image_size=cfg.dataset.image_size)
    registry.register(ctx, cfg, "vqvae", ctx.output / MODEL_FILE, model_config, image_size=cfg.dataset.image_size)
    ctx.tracking.set_tags({"checkpoint": result.checkpoint.path, "model_uri": (ctx.output / MODEL_FILE).uri})
    return {
        "model": MODEL_FILE,
        "checkpoint": result.checkpoint.path,
        "vqvae_config": dataclasses.asdict(model_config),
        "image_size": cfg.dataset.image_size,
        "grids": [list(grid) for grid in model_config.grid_shapes(cfg.dataset.image_size)],
        "steps": state["step"],
        "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
    }
