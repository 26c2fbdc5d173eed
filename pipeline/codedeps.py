"""Which of our source files a stage executes: its script and everything it imports from
`pipeline` and `stages`, transitively, found by reading the import statements (also those
inside functions, which run lazily).

One source for two users: tests/test_dvc_yaml.py fails when a stage's deps in dvc.yaml do not
cover these files (so an edit anywhere a stage executes re-runs it), and the train stage's
resume fingerprint hashes them (so a checkpoint made by other code is not resumed).
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = ("pipeline", "stages")


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Dotted names of our modules that `path` imports anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pipeline.core import paths`
    return {n for n in found if n.split(".")[0] in OURS and (_module_file(n) or n in OURS)}


@lru_cache(maxsize=None)
def module_files(module: str) -> tuple[Path, ...]:
    """Every file of ours that importing and running `module` may execute, sorted."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages' __init__ run first
        if path := _module_file(name):  # None: a namespace package (stages/ has no __init__.py)
            todo += sorted(_imports(path))
    return tuple(sorted(p for p in map(_module_file, seen) if p))


def stage_files(stage: str) -> tuple[Path, ...]:
    """The source files the DVC stage `stage` (`python -m stages.<stage>`) executes."""
    return module_files(f"stages.{stage}")
