"""Digest of the project source a stage runs: its module and the project modules it imports, transitively.

The digest goes into the stage's fingerprint (pipeline/runner.py), so an upgrade of the code a stage
runs makes new outputs instead of reusing those of the old code, while a change anywhere else (README,
tests, another stage) keeps the cache. What counts:

- every import of the stage module itself, at module level or inside a function (a stage that imports
  a helper lazily still runs it);
- the module-level imports of every project module reached from there, transitively (a lazy import in
  a shared module, such as the config schema naming the models' fields to check overrides, serves a
  check, not the stage's work);
- only modules of the project packages (`pipeline`, `models`); `from models import x` counts the
  submodule `models/x.py` when there is one, else the package's `__init__.py` and its imports;
- not the modules that only report a stage's work (`REPORTING`: its MLflow calls, system metrics and
  progress lines): they decide how a stage tells what it does, never what it makes, and a fix to how a
  run reaches MLflow must not retrain every model, as a change to the config keys of the same kind
  (actor counts, log cadence) does not (pipeline/config.py, `operational`).

Sources are compared as syntax trees without docstrings and `description=` arguments, so comments,
docstrings, the config fields' descriptions and formatting do not change a digest; any change to code does.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PROJECT_PACKAGES = ("pipeline", "models")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
REPORTING = frozenset({"pipeline.tracking", "pipeline.system_metrics", "pipeline.progress"})


def _source_file(module: str) -> Path | None:
    """The file of a project module (`a/b.py` or `a/b/__init__.py`), or None if it is not one."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = PROJECT_ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def _tree(module: str) -> ast.Module:
    path = _source_file(module)
    assert path is not None, module
    return ast.parse(path.read_text(), filename=str(path))


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    """Project modules named by one import statement."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif node.level or node.module is None:
        raise ValueError(f"relative import at line {node.lineno}: the project uses absolute imports only")
    else:
        names = []
        for alias in node.names:
            submodule = f"{node.module}.{alias.name}"
            names.append(submodule if _source_file(submodule) else node.module)
    return [name for name in names if _source_file(name)]


def _imports(module: str, everywhere: bool) -> set[str]:
    tree = _tree(module)
    nodes = ast.walk(tree) if everywhere else tree.body
    return {name for node in nodes if isinstance(node, (ast.Import, ast.ImportFrom)) for name in _imported(node)}


def modules_run_by(stage_module: str) -> list[str]:
    """The stage module and every project module it runs, sorted; not the REPORTING ones, nor what only they import."""
    seen, todo = {stage_module}, list(_imports(stage_module, everywhere=True))
    while todo:
        module = todo.pop()
        if module not in seen and module not in REPORTING:
            seen.add(module)
            todo.extend(_imports(module, everywhere=False))
    return sorted(seen)


def _without_documentation(tree: ast.Module) -> ast.Module:
    """The tree less its docstrings and the `description=` texts of its calls (the config schema's field
    descriptions: pipeline/config.py is in every stage's digest, and a reworded description must not reshard
    the corpus and retrain every model)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
        if isinstance(node, ast.Call):
            node.keywords = [keyword for keyword in node.keywords if keyword.arg != "description"]
    return tree


@cache
def code_digest(stage_module: str) -> str:
    """16 hex digits of sha256 over the normalised source of every module the stage runs."""
    digest = hashlib.sha256()
    for module in modules_run_by(stage_module):
        tree = _without_documentation(ast.parse(_source_file(module).read_text()))
        digest.update(f"{module}\0{ast.dump(tree)}\0".encode())
    return digest.hexdigest()[:16]
