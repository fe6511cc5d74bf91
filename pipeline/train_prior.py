"""Stage 2: train one prior per level on the code tables with Ray Train, top first, then each level below."""

from __future__ import annotations

import dataclasses
import logging
import math

import pyarrow as pa
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F

from models import prior as priors
from models.prior import CodePrior, PriorConfig
from models.sampling import sample_level_fast, sample_uniforms
from pipeline import training
from pipeline.checkpoints import load_model, model_from_state, save_model
from pipeline.codes import CodesLayout, read_codes, table_tensors
from pipeline.config import PipelineConfig, TrainPriorConfig
from pipeline.encode import code_files, ray_dataset
from pipeline.faults import fault_spec, maybe_inject_fault
from pipeline.figures import image_grid, png_bytes
from pipeline.shard_reader import to_uint8
from pipeline.storage import Location

# Ray Train streams worker logs to the driver's console once (a print is teed and shows twice).
log = logging.getLogger(__name__)

NAME = "train_prior"
SECTION = "train_prior"
FORMAT_VERSION = 1
TRAINS = True  # sees the dataset version that policy.on_new_data picks
UPSTREAM = ("shard", "train_vqvae", "encode")
MODEL_FILE = "prior.pt"
LN2 = math.log(2)


def prior_configs(section: TrainPriorConfig, layout: CodesLayout, num_classes: int) -> dict[str, PriorConfig]:
    """One PriorConfig per level, top first: the preset's sizes, the tables' grids and codebooks.

    A lower level is conditioned on every level above it.
    """
    configs = {}
    for i, name in enumerate(layout.levels):
        if section.preset == "tiny":
            base = priors.prior_tiny_top() if i == 0 else priors.prior_tiny_lower()
        elif section.preset == "imagenet256":
            base = priors.prior_imagenet256_top() if i == 0 else priors.prior_imagenet256_bottom()
        else:
            base = priors.prior_ffhq1024("top" if i == 0 else "middle" if i < len(layout.levels) - 1 else "bottom")
        configs[name] = dataclasses.replace(
            base,
            grid=layout.grids[i],
            codebook_size=layout.codebook_sizes[i],
            num_classes=num_classes if base.num_classes else 0,
            condition_grids=layout.grids[:i],
            condition_codebook_sizes=layout.codebook_sizes[:i],
            **section.models.get(name, {}),
        )
    return configs


def nll_bits(model: CodePrior, level: int, labels: torch.Tensor, codes: list[torch.Tensor], batch_size: int, dev) -> float:
    """Mean negative log-likelihood of one level's codes in bits per dimension (eval mode, no dropout)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            sl = slice(start, start + batch_size)
            target = codes[level][sl].long().to(dev)
            condition = [c[sl].long().to(dev) for c in codes[:level]] or None
            logits = model(target, labels[sl].to(dev) if model.cfg.num_classes else None, condition)
            total += F.cross_entropy(logits.float(), target, reduction="sum").item()
            count += target.numel()
    return total / count / LN2


def train_loop(config: dict) -> None:
    """Per-worker training of one level's prior on its shard of the code table."""
    cfg: PipelineConfig = config["cfg"]
    section = cfg.train_prior
    level, name, layout = config["level"], config["name"], config["layout"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    dev = training.device(section)
    torch.manual_seed(section.seed)

    model = CodePrior(config["prior_config"]).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=section.lr)
    step = resumed_from = training.restore(model, optimizer)
    ddp_model = ray.train.torch.prepare_model(model)
    conditional = model.cfg.num_classes > 0

    tracking = training.worker_tracking(cfg, config["run_id"])
    throughput = training.Throughput(world)
    evaluation = _evaluation_sets(config, section.val_samples) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    running = []

    while step < section.steps:
        steps_before = step
        # Ray Data splits the rows equally, so every rank sees the same number of batches per pass.
        for batch in shard.iter_batches(batch_size=section.batch_size, batch_format="pyarrow", drop_last=True,
                                        local_shuffle_buffer_size=4 * section.batch_size):
            if step >= section.steps:
                break
            maybe_inject_fault(config["fault"], f"{NAME}.{name}", step, rank)
            model.train()
            for group in optimizer.param_groups:
                group["lr"] = training.learning_rate(section, step)
            labels, codes = table_tensors(batch, layout)  # int16 until here
            target = codes[level].to(dev).long()
            condition = [c.to(dev).long() for c in codes[:level]] or None
            with training.autocast(section, dev):
                logits = ddp_model(target, labels.to(dev) if conditional else None, condition)
            loss = F.cross_entropy(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if section.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), section.grad_clip)
            optimizer.step()
            throughput.add(len(target))
            running.append(loss.item())
            step += 1

            if step % section.log_every == 0 or step == section.steps:
                metrics = {f"{name}_train_loss_bits": sum(running) / len(running) / LN2,
                           f"{name}_images_per_s": throughput.rate(), f"{name}_lr": optimizer.param_groups[0]["lr"]}
                running = []
                tracking.log_metrics(metrics, step)
                if rank == 0:
                    log.info("train_prior %s step %d/%d loss %.3f bits/dim %.0f images/s", name, step, section.steps,
                             metrics[f"{name}_train_loss_bits"], metrics[f"{name}_images_per_s"])
            validate = step % section.validate_every == 0 or step == section.steps
            val_metrics = _validate(model, config, evaluation, tracking, step, dev) if validate and rank == 0 else {}
            if step % section.checkpoint_every == 0 or step == section.steps:
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                         "seed": section.seed, "world_size": world}
                training.report({"step": step, "resumed_from": resumed_from, **val_metrics}, state)
        if step == steps_before:  # a pass without a whole batch would loop forever
            raise RuntimeError(f"train_prior {name}: this worker's share of the rows holds no batch of "
                               f"{section.batch_size}")


def _head(files: list[Location], rows: int) -> pa.Table:
    tables, count = [], 0
    for file in files:
        _, table = read_codes(file)
        tables.append(table)
        count += len(table)
        if count >= rows:
            break
    return pa.concat_tables(tables).slice(0, rows)


def _evaluation_sets(config: dict, rows: int) -> dict:
    """Fixed train and validation subsets (the paper reports NLL on both), and the VQ-VAE for pictures."""
    layout = config["layout"]
    sets = {split: table_tensors(_head(config["files"][split], rows), layout) for split in ("train", "val")}
    vqvae, _ = load_model(config["vqvae_model"], "vqvae")
    return sets | {"vqvae": vqvae}


@torch.no_grad()
def _validate(model: CodePrior, config: dict, evaluation: dict, tracking, step: int, dev) -> dict[str, float]:
    """Train/val NLL in bits per dimension, and a grid: reconstructions over this level resampled."""
    name, level, section = config["name"], config["level"], config["cfg"].train_prior
    metrics = {
        f"{name}_{split}_nll_bits": nll_bits(model, level, *evaluation[split], section.batch_size, dev)
        for split in ("train", "val")
    }
    tracking.log_metrics(metrics, step)
    if section.sample_grid:
        labels, codes = evaluation["val"]
        labels, codes = labels[: section.sample_grid], [c[: section.sample_grid].long().to(dev) for c in codes]
        (uniforms,) = sample_uniforms(range(len(labels)), [codes[level][0].numel()])
        resampled = list(codes)
        resampled[level] = sample_level_fast(
            model, uniforms, labels.to(dev) if model.cfg.num_classes else None, codes[:level] or None
        )
        vqvae = evaluation["vqvae"].to(dev)
        rows = [to_uint8(vqvae.decode_codes(c)).cpu() for c in (codes, resampled)]
        tracking.log_bytes(png_bytes(image_grid(rows)), f"samples/{name}_step_{step:07d}.png")
    return metrics


def _train_level(cfg: PipelineConfig, ctx, level: int, name: str, prior_config: PriorConfig, files, layout,
                 dataset: ray.data.Dataset) -> dict:
    section = cfg.train_prior
    loop_config = {
        "cfg": cfg, "level": level, "name": name, "prior_config": prior_config, "layout": layout, "files": files,
        "vqvae_model": Location(layout.vqvae_model, ctx.root.endpoint_url, ctx.root.region),
        "run_id": ctx.tracking.run_id, "fault": fault_spec(),
    }
    result, state = training.fit(train_loop, loop_config, section, ctx.output / name, {"train": dataset})
    model = model_from_state("prior", dataclasses.asdict(prior_config), state["model"])
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    save_model(ctx.output / name / MODEL_FILE, "prior", model, level=name, step=state["step"], metrics=metrics)
    return {"model": f"{name}/{MODEL_FILE}", "checkpoint": result.checkpoint.path, "steps": state["step"],
            "prior_config": dataclasses.asdict(prior_config), "metrics": metrics}


def run(cfg: PipelineConfig, ctx) -> dict:
    section = cfg.train_prior
    training.check_resources(section, NAME)
    files, layout = {}, None
    for split in ("train", "val"):
        files[split], layout = code_files(ctx.upstream["encode"], split)
        if not files[split]:
            raise ValueError(f"encode output {ctx.upstream['encode'].location} has no {split!r} code tables")
    rows = sum(entry["rows"] for entry in ctx.upstream["encode"].manifest["files"]["train"])
    if rows < section.num_workers * section.batch_size:
        raise ValueError(f"train_prior: {rows} training rows cannot give each of train_prior.num_workers="
                         f"{section.num_workers} workers a batch of train_prior.batch_size={section.batch_size}")
    num_classes = len(ctx.upstream["shard"].manifest["classes"])
    configs = prior_configs(section, layout, num_classes)

    levels, dataset = {}, None
    for level, (name, prior_config) in enumerate(configs.items()):
        model_file = ctx.output / name / MODEL_FILE
        if model_file.exists():  # finished before a crash: keep it
            _, extra = load_model(model_file, "prior")
            levels[name] = {"model": f"{name}/{MODEL_FILE}", "steps": extra["step"], "metrics": extra["metrics"],
                            "prior_config": dataclasses.asdict(prior_config)}
            continue
        if dataset is None:
            # Read once for every level, before the trainer takes the CPUs: the code tables are small
            # (int16, ~30x smaller than the JPEGs), every epoch then streams from the object store, and
            # read tasks never wait on CPUs that the training workers hold.
            dataset = ray_dataset(ctx.upstream["encode"], "train")[0].materialize()
        levels[name] = _train_level(cfg, ctx, level, name, prior_config, files, layout, dataset)
    summary = {f"{name}_{split}_nll_bits": info["metrics"].get(f"{name}_{split}_nll_bits")
               for name, info in levels.items() for split in ("train", "val")}
    ctx.tracking.log_metrics({k: v for k, v in summary.items() if v is not None})
    return {"levels": levels, "layout": dataclasses.asdict(layout), "nll_bits": summary}
