"""Fingerprints know the code: editing what a stage runs makes new outputs for it and what is downstream, nothing else."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import demo_data
from pipeline.code_digest import code_digest, modules_run_by
from pipeline.config import load_config
from pipeline.runner import pipeline_status
from pipeline.storage import Location

REPO = Path(__file__).resolve().parent.parent
STATUS = """
import json, sys
from pipeline.config import load_config
from pipeline.runner import pipeline_status
cfg = load_config(sys.argv[1], [f"storage.root={sys.argv[2]}", f"dataset.source={sys.argv[3]}"])
print(json.dumps({row["stage"]: row["fingerprint"] for row in pipeline_status(cfg)}))
"""


@pytest.fixture(scope="module")
def tree_and_corpus(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """A folder, a corpus in it, and the fingerprints this checkout gives every stage."""
    folder = tmp_path_factory.mktemp("fingerprints")
    demo_data.synthetic(Location(str(folder / "corpus")), 2, 1, size=(32, 32), classes=2)
    cfg = load_config(REPO / "configs/tiny.yaml", [f"storage.root={folder / 'root'}",
                                                     f"dataset.source={folder / 'corpus'}"])
    return folder, folder / "corpus", {row["stage"]: row["fingerprint"] for row in pipeline_status(cfg)}


def fingerprints(tree: Path, folder: Path, corpus: Path) -> dict[str, str]:
    """Every stage's fingerprint as the code in `tree` computes it (a fresh interpreter importing that tree)."""
    done = subprocess.run([sys.executable, "-c", STATUS, str(REPO / "configs/tiny.yaml"), str(folder / "root"),
                           str(corpus)], cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def edited_copy(folder: Path, name: str, edits: list[tuple[str, str, str]]) -> Path:
    """A copy of the project's packages with each (file, old, new) edit made."""
    tree = folder / name
    for package in ("models", "pipeline"):
        shutil.copytree(REPO / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    for path, old, new in edits:
        source = (tree / path).read_text()
        assert old in source
        (tree / path).write_text(source.replace(old, new, 1))
    return tree


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {stage for stage in before if before[stage] != after[stage]}


def test_editing_a_model_changes_its_training_stage_and_everything_downstream_only(tree_and_corpus):
    folder, corpus, base = tree_and_corpus
    tree = edited_copy(folder, "vqvae-edit", [
        ("models/vqvae.py", "bottom = image_size // self.bottom_downsample", "bottom = int(image_size) // self.bottom_downsample"),
        # Comments, docstrings and layout are not code: the shard stage keeps its cache.
        ("pipeline/shard.py", '"""The shard stage:', '# A comment.\n"""The sharding stage:'),
        ("pipeline/shard.py", "    return data, record\n", "    return (data,\n            record)  # the same\n"),
    ])
    assert changed(base, fingerprints(tree, folder, corpus)) == {
        "train_vqvae", "encode", "train_prior", "sample", "evaluate"}


def test_editing_a_stage_changes_it_and_its_downstream_stages(tree_and_corpus):
    folder, corpus, base = tree_and_corpus
    tree = edited_copy(folder, "sample-edit", [("pipeline/sample.py", "import numpy as np\n",
                                                 "import numpy as np\n\nSAMPLE_FORMAT_NOTE = 1\n")])
    assert changed(base, fingerprints(tree, folder, corpus)) == {"sample", "evaluate"}


def test_editing_how_stages_report_their_work_reruns_no_stage(tree_and_corpus):
    """The MLflow calls, system metrics and progress lines decide how a stage tells what it does, not what it
    makes: a fix there (say, to how a refused call is retried) keeps every output, models included. Nor does a
    reworded description of a config field (config.py is in every stage's digest), or another number of
    encode's loader processes (an actor reads a shard through at most one, so the rows keep the tar's order)."""
    folder, corpus, base = tree_and_corpus
    tree = edited_copy(folder, "reporting-edit", [
        ("pipeline/tracking.py", "HEARTBEAT_TAG = ", "ABANDONED_NOTE = 1\nHEARTBEAT_TAG = "),
        ("pipeline/system_metrics.py", "\nlog = ", "\nSAMPLED_NOTE = 1\nlog = "),
        ("pipeline/progress.py", "\nlog = ", "\nLINE_NOTE = 1\nlog = "),
        ("pipeline/config.py", 'description="encoder actors, each holding one VQ-VAE"',
         'description="encoder actors, each holding a VQ-VAE of its own"'),
    ])
    assert changed(base, fingerprints(tree, folder, corpus)) == set()
    cfg = load_config(REPO / "configs/tiny.yaml", [f"storage.root={folder / 'root'}", f"dataset.source={corpus}",
                                                     "encode.loader_workers=3"])
    assert {row["stage"]: row["fingerprint"] for row in pipeline_status(cfg)} == base


def test_a_stage_runs_its_own_modules_and_the_models_it_imports():
    shard = modules_run_by("pipeline.shard")
    assert "pipeline.shard" in shard and "pipeline.storage" in shard
    assert not [module for module in shard if module.startswith("models")]  # config's lazy checks are not work
    assert {"models.vqvae", "models.quantizer"} <= set(modules_run_by("pipeline.train_vqvae"))
    assert "models.prior" not in modules_run_by("pipeline.train_vqvae")
    # evaluate imports the classifier trainer inside a function: still code it runs
    assert "pipeline.train_classifier" in modules_run_by("pipeline.evaluate")
    assert len(code_digest("pipeline.shard")) == 16
