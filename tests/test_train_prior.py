"""Stage 2 with Ray Train: the top and bottom priors learn, are tracked, and resume after a worker dies."""

import math

import pytest
from mlflow.tracking import MlflowClient

from conftest import section_config
from pipeline.checkpoints import load_model
from pipeline.config import ConfigError
from pipeline.runner import run_pipeline


@pytest.mark.slow
def test_priors_learn_below_the_uniform_baseline(tiny_pipeline):
    cfg = tiny_pipeline.config()
    result = run_pipeline(cfg, only="train_prior")["train_prior"]
    manifest = result.manifest
    uniform = math.log2(64)  # the tiny codebooks
    for level in ("top", "bottom"):
        assert manifest["nll_bits"][f"{level}_val_nll_bits"] < uniform - 0.3, manifest["nll_bits"]
        assert manifest["nll_bits"][f"{level}_train_nll_bits"] < uniform - 0.3
    assert manifest["levels"]["top"]["steps"] == 30

    top, _ = load_model(result.location / manifest["levels"]["top"]["model"], "prior")
    bottom, extra = load_model(result.location / manifest["levels"]["bottom"]["model"], "prior")
    assert top.cfg.grid == (4, 4) and top.cfg.num_classes == 8 and len(top.attention) > 0
    assert bottom.cfg.grid == (8, 8) and bottom.cfg.condition_grids == ((4, 4),)
    assert extra["level"] == "bottom"
    # Label i is the class of that name: the file says so for whoever takes the prior from the Model Registry.
    classes = run_pipeline(cfg, only="shard")["shard"].manifest["classes"]
    assert extra["classes"] == manifest["classes"] == classes and len(classes) == top.cfg.num_classes
    # And the VQ-VAE whose codes it learned: sampling refuses to decode its codes with another.
    assert extra["vqvae_fingerprint"] == manifest["layout"]["vqvae_fingerprint"] == run_pipeline(
        cfg, only="train_vqvae")["train_vqvae"].fingerprint

    client = MlflowClient(tiny_pipeline.tracking_uri)
    run = client.get_run(manifest["run_id"])
    for name in ("top_val_nll_bits", "top_train_nll_bits", "bottom_val_nll_bits", "top_train_loss_bits",
                 "bottom_images_per_s"):
        assert name in run.data.metrics
    grids = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/top_step_0000015.png", "samples/bottom_step_0000030.png"} <= grids


@pytest.mark.slow
def test_one_worker_group_trains_every_level_and_a_restarted_group_keeps_a_finished_one(
        tiny_pipeline, tmp_path, monkeypatch, caplog):
    from pipeline.runner import pipeline_status
    from pipeline.storage import Location
    from pipeline.train_prior import MODEL_FILE

    cfg = tiny_pipeline.config(train_prior={"seed": 7, "max_failures": 1, "sample_grid": 0, "steps": 20})
    # A crashed run left a bottom model file that is the session's top prior: not this level's model, so
    # trained again, in the one Ray Train run that trains the top level first.
    session = run_pipeline(tiny_pipeline.config(), only="train_prior")["train_prior"]
    output = Location(next(row["output"] for row in pipeline_status(cfg) if row["stage"] == "train_prior"))
    (output / "bottom" / MODEL_FILE).write_bytes((session.location / session.manifest["levels"]["top"]["model"]).read_bytes())

    # A worker killed at the bottom level's step 15: the restarted group keeps the top level it finished
    # (its model file) and resumes the bottom one from its checkpoint of step 10.
    marker = tmp_path / "killed"
    monkeypatch.setenv("VQ2_FAULT_INJECT", f"train_prior.bottom:15:1:{marker}")
    manifest = run_pipeline(cfg, only="train_prior")["train_prior"].manifest
    assert f"not keeping {output / 'bottom' / MODEL_FILE}: it holds the 'top' level" in caplog.text
    assert marker.exists()
    assert manifest["levels"]["top"]["steps"] == 20 and manifest["levels"]["top"]["metrics"]["resumed_from"] == 0
    assert manifest["levels"]["bottom"]["steps"] == 20 and manifest["levels"]["bottom"]["metrics"]["resumed_from"] == 10
    assert manifest["checkpoint"].endswith(f"{output.path}/ray_train/{Location(manifest['checkpoint']).name}")
    _, extra = load_model(output / "bottom" / MODEL_FILE, "prior")
    assert extra["level"] == "bottom"
    client = MlflowClient(tiny_pipeline.tracking_uri)
    top_steps = [m.step for m in client.get_metric_history(manifest["run_id"], "top_train_loss_bits")]
    assert top_steps and len(top_steps) == len(set(top_steps))  # the top level was not trained again
    bottom_steps = [m.step for m in client.get_metric_history(manifest["run_id"], "bottom_train_loss_bits")]
    assert max(bottom_steps) == 20


def test_a_kept_model_file_must_match_the_level_config_and_steps(tmp_path, caplog):
    import dataclasses

    from models.prior import CodePrior, prior_tiny_lower
    from pipeline.checkpoints import save_model
    from pipeline.storage import Location
    from pipeline.train_prior import kept_level

    config = prior_tiny_lower()
    file = Location(str(tmp_path / "bottom" / "prior.pt"))
    assert kept_level(file, "bottom", config, 20) is None and caplog.text == ""  # no file: nothing to keep
    save_model(file, "prior", CodePrior(config), level="bottom", step=20, metrics={"bottom_val_nll_bits": 5.0})
    assert kept_level(file, "bottom", config, 20) == {
        "model": "bottom/prior.pt", "steps": 20, "metrics": {"bottom_val_nll_bits": 5.0},
        "prior_config": dataclasses.asdict(config)}
    assert kept_level(file, "bottom", config, 30) is None
    assert "it claims 20 steps, train_prior.steps is 30; training the bottom level again" in caplog.text
    assert kept_level(file, "bottom", dataclasses.replace(config, channels=64), 20) is None
    assert "its PriorConfig differs in channels (32, expected 64)" in caplog.text
    file.write_bytes(b"cut short by a crash")
    assert kept_level(file, "bottom", config, 20) is None
    assert "it cannot be read as a prior model" in caplog.text


def test_derived_prior_settings_are_not_configurable(tmp_path):
    def config(models):
        return section_config(tmp_path, train_prior={"models": models})

    with pytest.raises(ConfigError, match="train_prior.models: .*grid.* come from the code tables"):
        config({"top": {"grid": [8, 8]}})
    with pytest.raises(ConfigError, match="unknown model key"):
        config({"bottom": {"layers": 3}})


# A code table larger than Ray's object store, and a separate local Ray (its own process) whose store is
# smaller than that table. Ray spills to disk rather than failing when its store is full, so what is
# checked is that nothing was spilled: a stage that put the table into the store would have to spill.
STREAMING_SCRIPT = r"""
import json, sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import ray
import torch
from ray._private.internal_api import get_memory_info_reply, get_state_from_address

from models.vqvae import VQVAE, vqvae_tiny
from pipeline import ray_logs, train_prior
from pipeline.checkpoints import save_model
from pipeline.codes import CodesLayout, codes_table, write_codes
from pipeline.config import parse_config
from pipeline.storage import Location
from pipeline.tracking import StageRun

folder, store_bytes = Path(sys.argv[1]), int(sys.argv[2])
root = Location(str(folder / "root"))
save_model(root / "vqvae.pt", "vqvae", VQVAE(vqvae_tiny()))
layout = CodesLayout(grids=[(128, 128)], codebook_sizes=[16], vqvae_model=(root / "vqvae.pt").uri,
                     vqvae_fingerprint="synthetic")
encode = root / "encode" / "synthetic"
files, table_bytes = {"train": [], "val": []}, 0
for split, count, rows in (("train", 4, 800), ("val", 1, 8)):
    for index in range(count):
        name = f"{split}/codes-{index:06d}.parquet"
        codes = torch.full((rows, 128, 128), index % 16, dtype=torch.int16)
        table = codes_table([f"c{index % 2}/{split}{index}-{i}" for i in range(rows)], [index % 2] * rows, [codes], layout)
        write_codes(encode / name, table)
        files[split].append({"file": name, "rows": rows, "shard": name})
        table_bytes += table.nbytes if split == "train" else 0
# What the runner hands a stage (its StageContext and upstream StageResults), reduced to what this stage reads.
upstream = {"shard": SimpleNamespace(location=root / "shard", manifest={"classes": ["c0", "c1"]}),
            "encode": SimpleNamespace(location=encode, manifest={"files": files, "layout": asdict(layout)})}
cfg = parse_config({"storage": {"root": root.uri}, "dataset": {"source": str(folder)}, "train_prior": {
    "num_workers": 1, "cpus_per_worker": 2, "batch_size": 2, "steps": 2, "checkpoint_every": 2, "validate_every": 2, "log_every": 1,
    "val_samples": 2, "sample_grid": 0, "shuffle_buffer": 16, "models": {"top": {
        "channels": 8, "residual_channels": 8, "num_layers": 1, "attention_layers": 0, "kernel_size": 3}}}},
    "streaming.yaml")
ray.init(address="local", num_cpus=2, object_store_memory=store_bytes, include_dashboard=False,
         runtime_env=ray_logs.RUNTIME_ENV)
output = root / "train_prior" / "synthetic"
ctx = SimpleNamespace(root=root, output=output, upstream=upstream, tracking=StageRun(None, None))
manifest = train_prior.run(cfg, ctx)
# This Ray's own address: other local Rays may run beside it.
stats = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats
print("RESULT " + json.dumps({"steps": manifest["levels"]["top"]["steps"], "table_bytes": table_bytes,
      "spilled_bytes": stats.spilled_bytes_total, "fallback_bytes": stats.object_store_bytes_fallback}))
"""


@pytest.mark.slow
def test_the_prior_stage_streams_a_code_table_larger_than_the_object_store(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    store_bytes = 80 * 1024 * 1024  # about Ray's smallest object store
    done = subprocess.run([sys.executable, "-c", STREAMING_SCRIPT, str(tmp_path), str(store_bytes)],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["table_bytes"] > store_bytes and result["steps"] == 2
    assert result["spilled_bytes"] == 0 and result["fallback_bytes"] == 0, result


def test_each_pass_deals_every_code_row_to_exactly_one_rank(tmp_path):
    import torch

    from pipeline.codes import CodesLayout, code_pieces, codes_table, rank_batches, write_codes
    from pipeline.storage import Location

    layout = CodesLayout(grids=[(2, 2)], codebook_sizes=[64], vqvae_model="none", vqvae_fingerprint="none")
    files = []
    for index in range(4):  # 6 rows a file; a row's codes all hold its number
        rows = torch.arange(index * 6, index * 6 + 6, dtype=torch.int16)
        files.append(Location(str(tmp_path / f"codes-{index}.parquet")))
        write_codes(files[-1], codes_table([f"c/{r}" for r in rows.tolist()], [0] * 6,
                                           [rows[:, None, None].expand(6, 2, 2)], layout))
    assert [(p.start, p.stop) for p in code_pieces(files, [6] * 4, 2)] == [(0, 6)] * 4
    assert [(p.start, p.stop) for p in code_pieces(files[:1], [6], 4)] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]

    streams = [rank_batches(code_pieces(files, [6] * 4, 2), layout, 3, 3, (0,), rank, 2) for rank in range(2)]
    for _ in range(3):  # three passes: 12 rows, 4 batches, per rank
        rows = [[int(codes[0][i, 0, 0]) for _ in range(4) for codes in [next(stream)[1]] for i in range(3)]
                for stream in streams]
        assert sorted(rows[0] + rows[1]) == list(range(24))  # every row once, to one rank
        assert all(len({r // 6 for r in rank_rows}) == 2 for rank_rows in rows)  # two whole files each


def test_a_negative_seed_deals_the_code_rows_like_any_other(tmp_path):
    # The config takes any int; numpy's generators refuse a negative entry, which failed every rank's first batch.
    import torch

    from pipeline.codes import CodesLayout, code_pieces, codes_table, rank_batches, write_codes
    from pipeline.storage import Location

    layout = CodesLayout(grids=[(1, 1)], codebook_sizes=[64], vqvae_model="none", vqvae_fingerprint="none")
    file = Location(str(tmp_path / "codes.parquet"))
    rows = torch.arange(16, dtype=torch.int16)
    write_codes(file, codes_table([f"c/{r}" for r in range(16)], [0] * 16, [rows[:, None, None]], layout))

    def first_rows(seed):
        return next(rank_batches(code_pieces([file], [16], 1), layout, 16, 16, seed, 0, 1))[1][0].flatten().tolist()

    assert sorted(first_rows((-1, 0, 0))) == list(range(16))
    assert first_rows((-1, 0, 0)) == first_rows((-1, 0, 0)) != first_rows((1, 0, 0))


def test_every_rank_and_resume_step_gets_its_own_torch_seed():
    from pipeline.training import stream_seed

    keys = [((seed, level), rank, step) for seed in (0, 1, -1) for level in (0, 1) for rank in range(4)
            for step in (0, 1, 104_729)]
    seeds = [stream_seed(*key) for key in keys]
    assert len(set(seeds)) == len(keys) and all(0 <= seed < 2**64 for seed in seeds)  # torch.manual_seed's range
    assert seeds == [stream_seed(*key) for key in keys]  # a rerun from the same checkpoint draws the same masks


def test_a_rate_keeps_three_significant_digits_below_100():
    from pipeline.training import rate_text

    assert [rate_text(rate) for rate in (0.0123, 2.5, 99.44, 1234.6)] == ["0.0123", "2.5", "99.4", "1235"]


def _train_top_prior_in_process(monkeypatch, tmp_path, rank: int, state: dict | None = None, steps: int = 2):
    """train_prior's level loop for the top prior as `rank` of two, in this process with Ray Train's calls stubbed;
    torch's RNG state at the start of each step (what dropout draws from)."""
    import dataclasses
    import types

    import ray.train
    import ray.train.torch
    import torch

    from models.prior import prior_tiny_top
    from pipeline import train_prior
    from pipeline.codes import CodesLayout
    from pipeline.config import TrainPriorConfig
    from pipeline.storage import Location
    from pipeline.tracking import StageRun

    context = types.SimpleNamespace(get_world_rank=lambda: rank, get_world_size=lambda: 2)
    monkeypatch.setattr(ray.train, "get_context", lambda: context)
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model: model)
    monkeypatch.setattr(train_prior.training, "report", lambda metrics, state=None: None)
    monkeypatch.setattr(train_prior, "_validate", lambda *args: {})
    monkeypatch.setattr(train_prior, "save_model", lambda *args, **kwargs: None)
    data = torch.Generator().manual_seed(rank)  # its own generator: the data draws nothing from torch's stream
    monkeypatch.setattr(train_prior, "rank_batches", lambda *args: iter(
        lambda: (torch.zeros(4, dtype=torch.long), [torch.randint(64, (4, 4, 4), generator=data)]), None))
    rng_states = []
    monkeypatch.setattr(train_prior, "maybe_inject_fault", lambda *args: rng_states.append(torch.get_rng_state()))
    config = {"cfg": types.SimpleNamespace(train_prior=TrainPriorConfig(steps=steps, log_every=1)), "pieces": None,
              "layout": CodesLayout(((4, 4),), (64,), "vqvae.pt", "0123456789abcdef"), "output": Location(str(tmp_path)),
              "fault": None, "classes": [str(c) for c in range(10)]}
    train_prior._train_level(config, 0, "top", dataclasses.replace(prior_tiny_top(), dropout=0.5), state,
                             StageRun(None, None), None, torch.device("cpu"))
    return rng_states


def test_every_rank_draws_its_own_dropout_masks(monkeypatch, tmp_path):
    import torch

    rank0, rank1 = (_train_top_prior_in_process(monkeypatch, tmp_path, rank) for rank in range(2))
    assert not torch.equal(rank0[0], rank1[0])
    assert all(torch.equal(a, b) for a, b in zip(rank0, _train_top_prior_in_process(monkeypatch, tmp_path, 0)))


def test_a_resumed_level_does_not_replay_the_dropout_masks_of_step_0(monkeypatch, tmp_path):
    import dataclasses

    import torch

    from models.prior import CodePrior, prior_tiny_top

    model = CodePrior(dataclasses.replace(prior_tiny_top(), dropout=0.5))
    state = {"level": "top", "model": model.state_dict(),
             "optimizer": torch.optim.Adam(model.parameters()).state_dict(), "step": 5}
    fresh = _train_top_prior_in_process(monkeypatch, tmp_path, 0)
    resumed = _train_top_prior_in_process(monkeypatch, tmp_path, 0, state, steps=7)
    assert len(resumed) == 2 and not torch.equal(fresh[0], resumed[0])


def test_a_slow_step_logs_its_images_per_second(monkeypatch, tmp_path, caplog):
    from pipeline import training

    monkeypatch.setattr(training.Throughput, "rate", lambda self: 0.0123)  # a paper-size prior on a CPU
    caplog.set_level("INFO", logger="pipeline.train_prior")
    _train_top_prior_in_process(monkeypatch, tmp_path, 0)
    assert "train_prior top step 1/2 loss" in caplog.text and "0.0123 images/s" in caplog.text
