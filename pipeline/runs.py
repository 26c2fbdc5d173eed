"""`python -m pipeline runs`: which run is best, and what was different about it, on one screen.

Every DVC experiment of the repository (of every baseline commit), those baselines and the
workspace, one row each, at most 100 columns: name, data set, model, strategy (scratch or the
fine-tuning strategy), test accuracy (metrics/eval.json), best validation accuracy
(metrics/train.json; a multi-label data set's rows: test and validation mAP), training time and the params it changed from its commit (as the MLflow
run's name says them). Rows are grouped by data set, best test accuracy first; the best row of
each data set is marked `*`.

DVC is read with `Repo.experiments.show`, the call behind `dvc.api.exp_show`, for its structured
result: the API's flat rows mix params, metrics and deps under names that gain a file prefix only
when two collide (`params.yaml:lr` beside train.json's `lr`), and it cannot list every baseline.

Training time is not a DVC metric (it differs run to run): it comes from MLflow, one search of
the store for runs tagged `dvc_exp_name` (the workspace: metrics/train_timing.json). A store that
is missing or unreachable costs a `–` and one note line, never the table.
"""
from __future__ import annotations

import contextlib
import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.io import file_sha256
from pipeline.text import shorten, shorten_middle

WIDTH = 100           # the screen: no line is longer
UNKNOWN = "–"
SHOWN = ("dataset", "data_dir", "model", "finetune", "pretrained", "weights")  # in their own columns
KINDS = ("experiment", "baseline", "workspace")  # on equal metrics, the one `dvc exp apply` takes first
HEADLINE = ("metrics/eval.json", "accuracy")          # test accuracy: what "best" means
VALIDATION = ("metrics/train.json", "best_val_accuracy")
MULTILABEL = ("map_macro", "best_val_map")  # what a multi-label data set's rows show instead (test, val)
MLFLOW_TIME = "train/seconds"
MLFLOW_MAX_RUNS = 5000  # the most recent runs searched for training times (one query)


@dataclass
class Run:
    name: str                      # workspace, a baseline's branch or short rev, or the experiment's name
    kind: str                      # one of KINDS
    rev: str | None                # the git commit; None for the workspace
    baseline: str | None           # the commit it started from: an experiment's baseline, HEAD for the workspace
    dataset: str                   # display_name(dataset, data_dir); "?" when params.yaml did not parse
    model: str
    strategy: str                  # scratch | full | linear_probe | partial | two_phase
    params: dict[str, Any]         # params.yaml, flattened to dotted keys
    test_accuracy: float | None
    best_val_accuracy: float | None
    train_seconds: float | None = None
    running: bool = False          # an experiment still running: no metrics shown, "running" for its time
    best: bool = False
    changed: dict[str, Any] = field(default_factory=dict)  # the params it changed from its commit


# --- from DVC -----------------------------------------------------------------------------


def collect(root: Path | None = None) -> tuple[Path, list[Run]]:
    """The repository's root and its rows: the workspace, every baseline commit that has
    experiments (and HEAD), and every experiment (queued and failed ones left out)."""
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo
    from dvc.scm import Git

    try:
        repo = Repo(str(root) if root else None)
    except NotDvcRepoError:
        raise UserError(f"{Path(root or Path.cwd()).resolve()} is not inside a DVC repository; run "
                        "`python -m pipeline runs` in the project's folder") from None
    with repo:
        if not isinstance(repo.scm, Git):
            raise UserError(f"{repo.root_dir} is not a git repository: DVC experiments live in git (git init)")
        if repo.scm.no_commits:
            raise UserError("no commit yet: commit the project (git add -A; git commit), then run experiments "
                            "with `dvc exp run`")
        try:
            states = repo.experiments.show(revs=["HEAD", *_baselines(repo.scm)], num=1, hide_queued=True,
                                           hide_failed=True)
        except DvcException as exc:
            raise UserError(f"DVC could not list the experiments: {exc}") from None
        rows = [run for state in states for run in _rows(state)]
        head = repo.scm.get_rev()
        for run in rows:
            if run.kind == "workspace":
                run.baseline = head  # the workspace changed params.yaml from HEAD's
                _params_of_its_outputs(run, Path(repo.root_dir))
        return Path(repo.root_dir), rows


def _baselines(scm) -> list[str]:
    """The commits experiments were run from (the exp refs' baselines), without taking the
    repository's lock (`dvc exp ls` takes it: it would fail while an experiment runs)."""
    from dvc.repo.experiments.utils import exp_refs_by_baseline

    return sorted(exp_refs_by_baseline(scm))


def _params_of_its_outputs(run: Run, root: Path) -> None:
    """The workspace's params as they were when its outputs were made: the check stage's record
    in dvc.lock (it reads every section and runs first), not params.yaml, which may have changed
    since (`git checkout params.yaml` after `dvc exp run`, as the README says to do)."""
    import yaml

    from pipeline.core.params import read_yaml

    try:
        lock = read_yaml((root / "dvc.lock").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return
    made_with = (((lock.get("stages") or {}).get("check") or {}).get("params") or {}).get(paths.PARAMS.as_posix())
    if made_with:
        run.params = _flatten(made_with)
        run.dataset, run.model, run.strategy = _dataset(run.params), str(run.params.get("model", "?")), \
            _strategy(run.params)


def _rows(state) -> list[Run]:
    """A baseline state (or the workspace) and its experiments as rows."""
    if state.rev == "workspace":
        return [_row("workspace", "workspace", None, None, state.data)]
    rows = [_row(state.name or state.rev[:7], "baseline", state.rev, None, state.data)]
    for exp in state.experiments or []:
        head = exp.revs[0]
        rows.append(_row(exp.name or head.rev[:7], "experiment", head.rev, state.rev, head.data))
        if exp.executor is not None and exp.executor.state == "running":  # its metrics are not results yet
            rows[-1].running, rows[-1].test_accuracy, rows[-1].best_val_accuracy = True, None, None
    return rows


def _row(name: str, kind: str, rev: str | None, baseline: str | None, data) -> Run:
    params = _flatten(_file_data(data.params, paths.PARAMS.as_posix())) if data else {}
    metrics = data.metrics if data else {}
    test, val = _file_data(metrics, HEADLINE[0]), _file_data(metrics, VALIDATION[0])
    return Run(name, kind, rev, baseline, _dataset(params), str(params.get("model", "?")), _strategy(params), params,
               _number(test.get(HEADLINE[1], test.get(MULTILABEL[0]))),  # task=multilabel: its mAP
               _number(val.get(VALIDATION[1]) if MULTILABEL[1] not in val else val.get(MULTILABEL[1])))


def _file_data(results: dict[str, Any], path: str) -> dict[str, Any]:
    """The parsed content DVC read from `path` ({} when it is missing or did not parse)."""
    return (results.get(path) or {}).get("data") or {}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _dataset(params: dict[str, Any]) -> str:
    from pipeline.data.registry import display_name

    if "dataset" not in params:
        return "?"
    try:
        return display_name(params["dataset"], params.get("data_dir") or ".")
    except KeyError:  # a data set this version no longer knows (an old commit): its own name
        return str(params["dataset"])


def _strategy(params: dict[str, Any]) -> str:
    from pipeline.runview import strategy

    return strategy({"finetune": "full"} | params) if params else "?"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# --- training time, from MLflow -------------------------------------------------------------


def add_train_seconds(runs: list[Run], root: Path) -> str | None:
    """Fill in `train_seconds`: the workspace's from metrics/train_timing.json, the experiments'
    from the MLflow store (one search). Returns a note when the store could not be read."""
    timing, checkpoint = root / paths.TRAIN_TIMING, root / paths.CHECKPOINT
    for run in runs:
        if run.kind == "workspace" and timing.exists() and checkpoint.exists():
            with contextlib.suppress(OSError, ValueError):  # the file is the model's only when train made it
                record = json.loads(timing.read_text())
                if record.get("checkpoint_sha256") == file_sha256(checkpoint):
                    run.train_seconds = _number(record.get("train_seconds"))
    wanted = [r for r in runs if r.kind == "experiment" or (r.kind == "workspace" and r.train_seconds is None)]
    if not wanted:
        return None
    with contextlib.chdir(root):  # the default store is the repository root's mlflow.db
        from pipeline.mlstore import tracking_uri

        uri = tracking_uri()
    if problem := _store_problem(uri):
        return f"time {UNKNOWN}: {problem}"
    try:
        found = _mlflow_runs(uri)
    except Exception as exc:  # noqa: BLE001  (a side column: any failure of the store is one note, not the table)
        return f"time {UNKNOWN}: the MLflow store {uri} could not be read ({type(exc).__name__}: {exc})"
    for run in wanted:
        run.train_seconds = _seconds_of(run, found, checkpoint)
    return None


def _store_problem(uri: str) -> str | None:
    """Why the store cannot be read, briefly checked; None when it is worth a search."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return None if db.is_file() and db.stat().st_size > 0 else f"no MLflow store at {db}"
    from pipeline import mlstore

    mlstore.bound_http_retries()  # a lost server fails in seconds, not minutes
    return mlstore.store_problem(uri)


def _mlflow_runs(uri: str) -> list[tuple[dict[str, str], float]]:
    """(tags, train/seconds) of the store's runs that have a training time, newest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return []
    found = client.search_runs(ids, filter_string=f"metrics.`{MLFLOW_TIME}` >= 0", max_results=MLFLOW_MAX_RUNS,
                               order_by=["attributes.start_time DESC"])
    return [(r.data.tags, r.data.metrics[MLFLOW_TIME]) for r in found]


def _seconds_of(run: Run, found: list[tuple[dict[str, str], float]], checkpoint: Path) -> float | None:
    """The newest MLflow run of this experiment (its name, and its baseline when the run has
    one); for the workspace, the run whose `checkpoint_sha256` is that of models/model.pt."""
    if run.kind == "workspace":
        if not checkpoint.is_file():
            return None
        sha = file_sha256(checkpoint)
        return next((s for tags, s in found if tags.get("checkpoint_sha256") == sha), None)
    return next((s for tags, s in found if tags.get("dvc_exp_name") == run.name
                 and tags.get("dvc_baseline_rev", run.baseline) == run.baseline), None)


# --- order and table -------------------------------------------------------------------------


def order(runs: list[Run], per_dataset: int | None = None) -> list[Run]:
    """Grouped by data set, best test accuracy first within each; data sets in the order of their
    best row; rows without test accuracy after all others. `per_dataset`: the best N of each.
    Marks the best row of each data set (`best`)."""
    def rank(r: Run) -> tuple:
        return (r.test_accuracy is None, -(r.test_accuracy or 0.0), -(r.best_val_accuracy or 0.0),
                KINDS.index(r.kind))

    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.dataset].append(run)
    for rows in groups.values():
        rows.sort(key=rank)
        del rows[per_dataset or len(rows):]
        for i, row in enumerate(rows):
            row.best = i == 0 and row.test_accuracy is not None
    ordered = sorted(groups.values(), key=lambda rows: (rank(rows[0]), rows[0].dataset))
    flat = [r for rows in ordered for r in rows]
    return [r for r in flat if r.test_accuracy is not None] + [r for r in flat if r.test_accuracy is None]


def mark_changed(runs: list[Run]) -> list[str]:
    """Set each row's `changed`: what it changed from its commit's params.yaml (an experiment:
    its baseline's; the workspace: HEAD's; a commit: nothing), the answer to "what was different
    about it", as the MLflow run's name gives it. Rows whose commit is not listed: the params
    that differ among the rows. Params in their own columns are left out. Returns the keys shown,
    top-level keys first, then in params.yaml's order."""
    commits = {r.rev: r.params for r in runs if r.kind == "baseline"}
    keys = list(dict.fromkeys(k for r in runs for k in r.params if k not in SHOWN))
    with_params = [r for r in runs if r.params]
    differ = [k for k in keys if len({_show(r.params.get(k, ...)) for r in with_params}) > 1]
    for run in runs:
        base = commits.get(run.baseline)
        if run.kind == "baseline":
            run.changed = {}
        elif base is not None:
            run.changed = {k: v for k, v in run.params.items()
                           if k not in SHOWN and _show(base.get(k, ...)) != _show(v)}
        else:
            run.changed = {k: run.params[k] for k in differ if k in run.params}
        run.changed = dict(sorted(run.changed.items(), key=lambda kv: ("." in kv[0], keys.index(kv[0]))))
    return list(dict.fromkeys(k for r in runs for k in r.changed))


def _show(value: Any) -> str:
    """A param's value as `-S key=value` takes it."""
    if value is ...:
        return "<missing>"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def duration(seconds: float | None) -> str:
    """41.2 → '41s', 185 → '3m05s', 7300 → '2h01m'; None → '–'."""
    if seconds is None:
        return UNKNOWN
    s = round(seconds)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def _fit_items(items: list[str], width: int) -> str:
    """As many whole `key=value` items as fit, then `…`."""
    text = " ".join(items)
    if len(text) <= width:
        return text
    shown: list[str] = []
    for item in items:
        if len(" ".join([*shown, item, "…"])) > width:
            break
        shown.append(item)
    return " ".join([*shown, "…"]) if shown else shorten(text, width)


HEADERS = ("experiment", "data", "model", "strategy", "test", "val", "time", "what it changed")
STRATEGY_SHORT = {"linear_probe": "probe", "two_phase": "2-phase"}  # the column's room goes to what changed
# the text columns' widest and narrowest; when the params need room, data and model give it first,
# then the name (the one `dvc exp apply` takes), then strategy
TEXT_WIDTHS = {"experiment": (24, 18), "data": (14, 8), "model": (18, 10), "strategy": (12, 8)}
SHRINK_ORDER = ((1, 2), (0,), (3,))
PARAMS_MIN, PARAMS_MAX = 20, 40  # the params column's room, taken from the text columns when its values need it
GAP = "  "


def table(runs: list[Run], width: int = WIDTH) -> list[str]:
    """The rows (in order, `changed` set) as lines of at most `width` characters."""
    cells = [(r.name, r.dataset, r.model, STRATEGY_SHORT.get(r.strategy, r.strategy), _acc(r.test_accuracy),
              _acc(r.best_val_accuracy),
              "running" if r.running else duration(r.train_seconds)) for r in runs]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(HEADERS[:7])]
    lows = [low for _, low in TEXT_WIDTHS.values()]
    widths[:4] = [min(w, high) for w, (high, _) in zip(widths, TEXT_WIDTHS.values())]
    used = lambda: 2 + sum(widths) + len(GAP) * len(widths)  # noqa: E731  ("* " mark, then a gap after each)
    short = _short_keys([k for r in runs for k in r.changed])
    natural = max([len(" ".join(f"{short[k]}={_show(v)}" for k, v in r.changed.items())) for r in runs] + [0])
    need = max(PARAMS_MIN, min(natural, PARAMS_MAX))  # what changed is the point: room for it first
    for columns in SHRINK_ORDER:
        while width - used() < need and (excess := {i: widths[i] - lows[i] for i in columns
                                                    if widths[i] > lows[i]}):
            widths[max(excess, key=excess.get)] -= 1
    room = max(width - used(), 0)
    lines = [_line(" ", HEADERS[:7], widths, shorten(HEADERS[7], room))]
    for run, row in zip(runs, cells):
        params = _fit_items([f"{short[k]}={_show(v)}" for k, v in run.changed.items()], room)
        lines.append(_line("*" if run.best else " ", row, widths, params))
    return [shorten(line, width) for line in lines]


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Each dotted key by its last part where no other key shown ends the same (train.optimizer →
    optimizer), for room; the full key otherwise."""
    leaves = [k.rsplit(".", 1)[-1] for k in dict.fromkeys(keys)]
    return {k: leaf if leaves.count(leaf) == 1 else k for k, leaf in zip(dict.fromkeys(keys), leaves)}


def _line(mark: str, cells: tuple[str, ...], widths: list[int], params: str) -> str:
    text = [shorten_middle(c, w).ljust(w) for c, w in zip(cells[:4], widths)]
    numbers = [c.rjust(w) for c, w in zip(cells[4:], widths[4:])]
    return f"{mark} " + GAP.join([*text, *numbers, *([params] if params else [])])


def _acc(value: float | None) -> str:
    return UNKNOWN if value is None else f"{value:.4f}"


def header(shown: list[Run], runs: list[Run]) -> str:
    """What the table holds: `shown` of all `runs`, and what they are."""
    n = sum(r.kind == "experiment" for r in runs)
    b = sum(r.kind == "baseline" for r in runs)
    what = f"{n} experiment{'s' * (n != 1)}, {b} baseline{'s' * (b != 1)}" + (
        ", workspace" if any(r.kind == "workspace" for r in runs) else "")
    count = f"{len(runs)} runs" if len(shown) == len(runs) else f"{len(shown)} of {len(runs)} runs"
    return f"{count} ({what}), best test accuracy first per data set, * best"


FOOTER = "dvc exp apply NAME: make a run the workspace · dvc exp show: every column · mlflow ui: its curves"


# --- the command -------------------------------------------------------------------------------


def show(per_dataset: int | None = None, as_json: bool = False, root: Path | None = None) -> list[Run]:
    """Print the table (or JSON rows) of the repository at or above `root` (default: the working
    directory) and return its rows in order."""
    repo_root, runs = collect(root)
    if not any(r.kind == "experiment" for r in runs) and all(r.test_accuracy is None for r in runs):
        raise UserError("no experiments yet: run one with `dvc exp run` (or `dvc repro`), then "
                        "`python -m pipeline runs`")
    note = add_train_seconds(runs, repo_root)
    shown = order(runs, per_dataset)
    mark_changed(shown)
    if as_json:
        print(json.dumps([{k: v for k, v in asdict(r).items() if k != "params"} for r in shown], indent=1))
        if note:
            print(note, file=sys.stderr)
        return shown
    lines = [header(shown, runs), *table(shown), *([note] if note else []), FOOTER]
    print("\n".join(shorten(line, WIDTH) for line in lines))
    return shown
