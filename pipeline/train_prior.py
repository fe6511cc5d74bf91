"""Stage 2: train one prior per level on the code tables with Ray Train, top first, then each level below."""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle

import pyarrow as pa
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F

from models import prior as priors
from models.prior import CodePrior, PriorConfig
from models.sampling import sample_level_fast, sample_uniforms
from pipeline import registry, training
from pipeline.checkpoints import load_model, save_model
from pipeline.codes import CodesLayout, code_pieces, rank_batches, read_codes, table_tensors
from pipeline.config import PipelineConfig, TrainPriorConfig
from pipeline.encode import code_files
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
    """Per-worker training of each level's prior in `config["levels"]`, top first, in one worker group: one
    group start for all levels. A level ends with its model file, which a restarted group keeps."""
    section = config["cfg"].train_prior
    dev = training.device(section)
    tracking = training.worker_tracking(config)
    evaluation = _evaluation_sets(config, section.val_samples) if ray.train.get_context().get_world_rank() == 0 else None
    checkpoint = ray.train.get_checkpoint()
    state = training.read_checkpoint_state(checkpoint) if checkpoint is not None else None
    for level, name, prior_config in config["levels"]:
        # After a restart, a level that ended before it is kept; the level that was running resumes.
        if state is not None and kept_level(level_model_file(config["output"], name), name, prior_config,
                                            section.steps) is not None:
            continue
        _train_level(config, level, name, prior_config, state if state and state.get("level") == name else None,
                     tracking, evaluation, dev)
    tracking.close()


def level_model_file(output: Location, name: str) -> Location:
    """Where a level's finished prior lives in the stage's output."""
    return output / name / MODEL_FILE


def _train_level(config: dict, level: int, name: str, prior_config: PriorConfig, state: dict | None, tracking,
                 evaluation: dict | None, dev) -> None:
    """Train one level's prior to train_prior.steps (from `state` when it resumes), then write its model file."""
    section = config["cfg"].train_prior
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(section.seed + level)  # identical initial weights on every rank

    model = CodePrior(prior_config).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=section.lr)
    step = resumed_from = 0 if state is None else training.load_state(model, optimizer, state)
    training.seed_rank_stream((section.seed, level), rank, step)
    ddp_model = ray.train.torch.prepare_model(model)
    conditional = model.cfg.num_classes > 0

    throughput = training.Throughput(world)
    # Each rank reads its own pieces of the code tables from storage, pass after pass: nothing goes
    # through Ray's object store and no read task waits for CPUs that the training workers hold. A
    # resumed run draws new orders (the seed includes the step it resumes from).
    batches = rank_batches(config["pieces"], config["layout"], section.level_batch(name), section.shuffle_buffer,
                           (section.seed, level, resumed_from), rank, world)
    running, val_metrics = [], {}

    while step < section.steps:
        labels, codes = next(batches)  # int16 until here
        maybe_inject_fault(config["fault"], f"{NAME}.{name}", step, rank)
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = training.learning_rate(section, step)
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
                log.info("train_prior %s step %d/%d loss %.3f bits/dim %s images/s", name, step, section.steps,
                         metrics[f"{name}_train_loss_bits"], training.rate_text(metrics[f"{name}_images_per_s"]))
        validate = step % section.validate_every == 0 or step == section.steps
        val_metrics = _validate(model, level, name, config, evaluation, tracking, step, dev) if validate and rank == 0 else {}
        if step % section.checkpoint_every == 0 or step == section.steps:
            state = {"level": name, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "seed": section.seed, "world_size": world}
            training.report({"step": step, "resumed_from": resumed_from, **val_metrics}, state)
    if rank == 0:
        # A group restarted after the last report but before this file was written resumes at the last step.
        val_metrics = val_metrics or _validate(model, level, name, config, evaluation, tracking, step, dev)
        metrics = {"step": step, "resumed_from": resumed_from, **val_metrics}
        # The VQ-VAE whose codes it learned: sampling with a registered prior refuses to decode with another.
        save_model(level_model_file(config["output"], name), "prior", model, level=name, step=step, metrics=metrics,
                   classes=config["classes"], vqvae_fingerprint=config["layout"].vqvae_fingerprint)


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
    """Fixed train and validation subsets (the paper reports NLL on both), and the VQ-VAE when there are
    pictures to draw."""
    layout = config["layout"]
    sets = {split: table_tensors(_head(config["files"][split], rows), layout) for split in ("train", "val")}
    if config["cfg"].train_prior.sample_grid:
        sets["vqvae"] = load_model(config["vqvae_model"], "vqvae")[0]
    return sets


@torch.no_grad()
def _validate(model: CodePrior, level: int, name: str, config: dict, evaluation: dict, tracking, step: int,
              dev) -> dict[str, float]:
    """Train/val NLL in bits per dimension, and a grid: reconstructions over this level resampled."""
    section = config["cfg"].train_prior
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


def kept_level(model_file: Location, name: str, prior_config: PriorConfig, steps: int) -> dict | None:
    """The record of a level that a crashed run finished, if its model file is this level's, was made with
    this PriorConfig and took train_prior.steps steps; else None, with a log line saying why it is trained again."""
    if not model_file.exists():
        return None
    try:
        model, extra = load_model(model_file, "prior")
    except (RuntimeError, ValueError, TypeError, KeyError, EOFError, pickle.UnpicklingError) as error:
        problem = f"it cannot be read as a prior model ({type(error).__name__}: {error})"
    else:
        found = dataclasses.asdict(model.cfg)
        wanted = dataclasses.asdict(prior_config)
        differing = sorted(key for key in wanted if found.get(key) != wanted[key])
        if extra.get("level") != name:
            problem = f"it holds the {extra.get('level')!r} level"
        elif differing:
            problem = "its PriorConfig differs in " + ", ".join(f"{k} ({found.get(k)!r}, expected {wanted[k]!r})"
                                                             for k in differing)
        elif extra.get("step") != steps:
            problem = f"it claims {extra.get('step')} steps, train_prior.steps is {steps}"
        else:
            return {"model": f"{name}/{MODEL_FILE}", "steps": extra["step"], "metrics": extra["metrics"],
                    "prior_config": wanted}
    log.warning("train_prior: not keeping %s: %s; training the %s level again", model_file, problem, name)
    return None


def run(cfg: PipelineConfig, ctx) -> dict:
    section = cfg.train_prior
    files, layout = {}, None
    for split in ("train", "val"):
        files[split], layout = code_files(ctx.upstream["encode"], split)
        if not files[split]:
            raise ValueError(f"encode output {ctx.upstream['encode'].location} has no {split!r} code tables")
    rows = [entry["rows"] for entry in ctx.upstream["encode"].manifest["files"]["train"]]
    classes = ctx.upstream["shard"].manifest["classes"]  # class label i is classes[i]
    configs = prior_configs(section, layout, len(classes))
    unknown = sorted(set(section.level_batch_size) - set(configs))
    if unknown:
        raise ValueError(f"train_prior.level_batch_size names {', '.join(unknown)}; the levels are {', '.join(configs)}")
    batch_size = max(section.level_batch(name) for name in configs)
    if sum(rows) < section.num_workers * batch_size:
        raise ValueError(f"train_prior: {sum(rows)} training rows cannot give each of train_prior.num_workers="
                         f"{section.num_workers} workers a batch of {batch_size} (train_prior.batch_size, "
                         "level_batch_size)")

    # A level whose model file a crashed run finished is kept; the others train in one Ray Train run.
    untrained = [(level, name, prior_config) for level, (name, prior_config) in enumerate(configs.items())
                 if kept_level(level_model_file(ctx.output, name), name, prior_config, section.steps) is None]
    checkpoint = None
    if untrained:
        loop_config = {
            "cfg": cfg, "levels": untrained, "layout": layout, "files": files,
            "pieces": code_pieces(files["train"], rows, section.num_workers),
            "vqvae_model": Location(layout.vqvae_model, ctx.root.endpoint_url, ctx.root.region),
            "run_id": ctx.tracking.run_id, "output": ctx.output, "fault": fault_spec(), "classes": classes,
        }
        checkpoint = training.fit(train_loop, loop_config, section, ctx.output).checkpoint.path
    levels = {}
    for name, prior_config in configs.items():
        levels[name] = kept_level(level_model_file(ctx.output, name), name, prior_config, section.steps)
        if levels[name] is None:
            raise RuntimeError(f"train_prior: the Ray Train run ended without the {name} level's model file "
                               f"{level_model_file(ctx.output, name)}")
        registry.register(ctx, cfg, "prior", level_model_file(ctx.output, name), prior_config, level=name)
    summary = {f"{name}_{split}_nll_bits": info["metrics"].get(f"{name}_{split}_nll_bits")
               for name, info in levels.items() for split in ("train", "val")}
    ctx.tracking.log_metrics({k: v for k, v in summary.items() if v is not None})
    return {"levels": levels, "checkpoint": checkpoint, "layout": dataclasses.asdict(layout), "nll_bits": summary,
            "classes": classes}
