"""Ensemble members: each a DVC experiment name or one of our checkpoint files, loaded as its
model and checkpoint, and the checks that the members can share one input and one test split.

An experiment name is resolved as DVC 3.67 resolves it (`dvc.repo.experiments.utils.resolve_name`):
the git refs `refs/exps/<baseline[:2]>/<baseline[2:]>/<name>` (DVC's own namespaces apply,
celery, exec and temp skipped); a name found under several baselines is the one of HEAD's
baseline, else ambiguous. Its models/model.pt is read with `dvc.api.open(rev=<commit>)` from
the DVC cache (or the remote) into a temporary folder, never into the repository.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.checkpoint import load_checkpoint, preprocessing, temperature
from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.preprocess import Preprocessing

EXPS = "refs/exps/"
SKIPPED = tuple(f"{EXPS}{ns}/" for ns in ("apply", "celery", "exec", "temp"))  # DVC's ITER_SKIP_NAMESPACES
FILE_SUFFIXES = (".pt", ".pth", ".ckpt")
SHARED_INPUT = ("image_size", "stored_size", "resize", "interpolation")  # one centre crop feeds every member
MAX_LISTED = 20  # experiment names an unknown-name error lists


@dataclass
class Member:
    name: str                 # as the user gave it
    source: str               # the checkpoint file, or "experiment NAME"
    commit: str | None        # the experiment's git commit
    model: nn.Module
    ckpt: dict[str, Any]

    @property
    def prep(self) -> Preprocessing:
        return preprocessing(self.ckpt)

    @property
    def temperature(self) -> float:
        return temperature(self.ckpt)

    @property
    def classes(self) -> list[str]:
        return list(self.ckpt["classes"])

    @property
    def data_hash(self) -> str:
        return self.ckpt.get("data_hash") or ""


def load_member(spec: str) -> Member:
    """A checkpoint file (an existing file, a path with '/', or a .pt/.pth/.ckpt name), else a
    DVC experiment name (or its full ref, refs/exps/...)."""
    path = Path(spec)
    if not spec.startswith(EXPS) and (path.is_file() or "/" in spec or path.suffix in FILE_SUFFIXES):
        if not path.is_file():
            raise UserError(f"member {spec!r}: no such file; give a checkpoint (e.g. models/model.pt) "
                            "or a DVC experiment name (dvc exp list --all-commits)")
        model, ckpt = load_checkpoint(path)
        return Member(spec, str(path), None, model, ckpt)
    commit = experiment_commit(spec)
    model, ckpt = checkpoint_at(commit, spec)
    return Member(spec, f"experiment {spec}", commit, model, ckpt)


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=False)


def experiments() -> dict[str, list[tuple[str, str]]]:
    """Experiment name → [(ref, commit)], every experiment of this repository (what
    `dvc exp list --all-commits --name-only` lists); empty outside a git repository."""
    listed = _git("for-each-ref", "--format=%(refname) %(objectname)", EXPS.rstrip("/")).stdout
    found: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for ref, commit in (line.split() for line in listed.splitlines()):
        parts = ref.split("/")
        if len(parts) == 5 and not ref.startswith(SKIPPED):
            found[parts[4]].append((ref, commit))
    return dict(found)


def experiment_commit(name: str) -> str:
    """The git commit of experiment `name` (or of a full ref refs/exps/...)."""
    if name.startswith(EXPS):
        out = _git("rev-parse", "--verify", "--quiet", f"{name}^{{commit}}")
        if out.returncode != 0:
            raise UserError(f"{name!r} is not an experiment ref of this repository; dvc exp list --all-commits lists them")
        return out.stdout.strip()
    found = experiments()
    if name not in found:
        raise UserError(f"{name!r} is neither a checkpoint file nor a DVC experiment of this repository; "
                        f"experiments: {_listing(found)}")
    refs = found[name]
    if len(refs) > 1:
        head = _git("rev-parse", "HEAD").stdout.strip()
        refs = [(ref, commit) for ref, commit in refs if "".join(ref.split("/")[2:4]) == head] or refs
    if len(refs) > 1:
        raise UserError(f"experiment name {name!r} exists on {len(refs)} baseline commits; give one by its ref, "
                        f"e.g. {refs[0][0]}")
    return refs[0][1]


def _listing(found: dict) -> str:
    if not found:
        return "none (dvc exp run makes them)"
    names = sorted(found)
    more = f" and {len(names) - MAX_LISTED} more (dvc exp list --all-commits)" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def checkpoint_at(commit: str, name: str) -> tuple[nn.Module, dict[str, Any]]:
    """The model and checkpoint of models/model.pt as `commit` records it, read through DVC."""
    import dvc.api
    from dvc.exceptions import DvcException

    with tempfile.TemporaryDirectory(prefix="pipeline-ensemble-") as tmp:
        path = Path(tmp) / paths.CHECKPOINT.name
        try:
            with dvc.api.open(paths.CHECKPOINT.as_posix(), rev=commit, mode="rb") as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (DvcException, FileNotFoundError) as exc:
            raise UserError(f"experiment {name!r} (commit {commit[:10]}): cannot read its {paths.CHECKPOINT} "
                            f"from the DVC cache ({type(exc).__name__}); fetch it: dvc exp pull REMOTE {name}") from None
        try:
            return load_checkpoint(path)
        except UserError as err:
            raise UserError(f"experiment {name!r}: {err}") from None


def check_compatible(members: list[Member], classes: list[str], data_hash: str, stored_size: int,
                     prepared: Path) -> list[str]:
    """Raise a one-line UserError unless every member scores the prepared data in `prepared`
    (its `classes`, hash and stored image size) through one shared input; return warnings."""
    first = members[0]
    warnings = []
    for m in members:
        if m.ckpt.get("task") != first.ckpt.get("task"):
            raise UserError(f"member {m.name!r} is {m.ckpt.get('task', 'multiclass')}, member {first.name!r} "
                            f"{first.ckpt.get('task', 'multiclass')}: members must share the task")
        if m.classes != classes:
            raise UserError(f"member {m.name!r} has classes {_short(m.classes)} but {prepared} has {_short(classes)}: "
                            "members must have the classes of the data, in the same order (train them on it)")
        for key in SHARED_INPUT:
            a, b = getattr(first.prep, key), getattr(m.prep, key)
            if a != b:
                raise UserError(f"member {m.name!r} has {key} {b}, member {first.name!r} {a}: one preprocessed "
                                f"image feeds every member, so {', '.join(SHARED_INPUT)} must agree (mean/std may differ)")
        if m.prep.stored_size != stored_size:
            raise UserError(f"member {m.name!r} expects images stored at {m.prep.stored_size} px, {prepared} holds "
                            f"{stored_size} px: re-run prepare with the params it was trained with")
        if m.data_hash and m.data_hash != data_hash:
            raise UserError(f"member {m.name!r} was trained on other prepared data (data_hash {m.data_hash[:12]}, "
                            f"{prepared} has {data_hash[:12]}): another seed or data params split it differently, so "
                            "its training images may be in this test split; ensemble models trained on this split")
        if not m.data_hash:
            warnings.append(f"member {m.name!r} records no data_hash (an older checkpoint): "
                            "cannot check that it was trained on this split")
    return warnings


def _short(classes: list[str], limit: int = 6) -> str:
    shown = ", ".join(classes[:limit]) + (f", … ({len(classes)})" if len(classes) > limit else "")
    return f"[{shown}]"
