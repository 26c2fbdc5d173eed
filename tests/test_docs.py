"""README.md and docs/*.md say only what is true, checked without training anything:

- every `-S key=value` of a command (fenced or inline code) validates: the command's overrides are
  applied to params.yaml as `dvc exp run -S` applies them (DVC's own Hydra code, sweeps expanded)
  and the result goes through `parse_params`; model names must exist (ours or timm's), and with
  `pretrained=true` have weights to download. A command shown as `$ ...` followed by an `error:`
  line must fail with exactly that error. A command with a placeholder value (`<...>`, `...`, `…`,
  an all-capitals word such as PATH or NAME, or the literal `key=value`) is skipped;
- every ```yaml block whose top-level keys are params keys validates merged over params.yaml;
- every `python -m pipeline SUB` names a subcommand of pipeline/cli.py's parser and passes only
  flags that subcommand takes; `-m stages.X`, `-m pipeline.X`, `python FILE.py` and `make X` name
  what exists;
- every relative link points to a file; nothing names a path outside the repository;
- the README's first screen has the default run, fine-tuning on your photos and a compare command;
- docs/params.md names every params key.

Each failure names the file, the line and the text.
"""
from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.core.errors import UserError
from pipeline.core.params import Params, parse_params, read_yaml
from tests.conftest import ROOT

FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FIRST_SCREEN = 40
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|…|\b[A-Z]{3,}\b|^key=value$")
SEPARATORS = {"|", "||", "&&", ";", ">", "2>", ">>"}


@dataclass(frozen=True)
class Snippet:
    """A piece of code in a doc: a fenced line (continuations joined) or an inline code span."""
    file: Path
    line: int
    text: str
    fence: str | None  # the fence's language ("" for a bare fence); None for inline code
    error: str | None = None  # the `error:` line shown right after a `$ command`

    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}: {self.text.strip()}"


def read(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def fenced(path: Path) -> list[Snippet]:
    out, lang, pending = [], None, None
    lines = read(path)
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            lang = line.strip()[3:].strip() if lang is None else None
            pending = None
            continue
        if lang is None:
            continue
        if pending is not None:  # a continued command (`\` at the end of the line before)
            pending = (pending[0], pending[1] + " " + line.strip())
        else:
            pending = (i + 1, line)
        if pending[1].rstrip().endswith("\\"):
            pending = (pending[0], pending[1].rstrip()[:-1])
            continue
        start, text = pending
        pending = None
        error = None
        if text.startswith("$ "):
            text = text[2:]
            following = lines[start] if start < len(lines) else ""
            error = following.strip() if following.startswith("error:") else None
        out.append(Snippet(path, start, text, lang, error))
    return out


def inline(path: Path) -> list[Snippet]:
    """Inline code spans outside fences (a span may wrap onto the next line)."""
    lines, keep, in_fence = read(path), [], False
    for line in lines:
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            keep.append("")
        else:
            keep.append("" if in_fence else line)
    text = "\n".join(keep)
    return [Snippet(path, text.count("\n", 0, m.start()) + 1, m.group(1).replace("\n", " "), None)
            for m in re.finditer(r"`([^`]+)`", text)]


def snippets() -> list[Snippet]:
    return [s for f in FILES for s in fenced(f) + inline(f)]


def tokens(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in prose-like code: plain words are good enough
        return text.split()


def overrides(words: list[str]) -> list[str]:
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-S", "--set", "--set-param")]


# --- -S values and params blocks ---------------------------------------------------------------

def apply_overrides(values: list[str], tmp_path: Path) -> list[dict]:
    """params.yaml with the overrides applied as `dvc exp run -S` applies them, once per point of
    a sweep (`-S 'lr=0.1,0.01'` queues one experiment per value)."""
    from dvc.utils.hydra import apply_overrides as dvc_apply, get_hydra_sweeps

    raws = []
    for point in get_hydra_sweeps({"params.yaml": values}):
        copy = tmp_path / "params.yaml"
        copy.write_text((ROOT / "params.yaml").read_text())
        dvc_apply(copy, point["params.yaml"])
        raws.append(read_yaml(copy.read_text()))
    return raws


def params_problem(raw: dict, values: list[str]) -> str | None:
    """Why these params are refused, as `check` says it (None when valid)."""
    keys = {v.split("=", 1)[0].lstrip("+~") for v in values}
    try:
        params = parse_params(raw, check_models="model" in keys)  # the registry and timm only where asked
    except UserError as exc:
        return f"error: {exc}"
    if "model" in keys and params.pretrained:
        from pipeline.models import has_pretrained_weights

        if not has_pretrained_weights(params.model):
            return f"model={params.model}: no pretrained weights to download"
    return None


def set_params_problems(words: list[str], tmp_path: Path) -> set[str]:
    """What is wrong with one command's `-S` values: as `python -m pipeline tune` reads them (YAML,
    a dict replaces params.yaml's), or else as `dvc exp run` does."""
    from dvc.exceptions import InvalidArgumentError

    values = overrides(words)
    if [sub for sub, _ in pipeline_calls(words)] == ["tune"]:
        from pipeline.tune import parse_overrides

        try:
            parse_overrides(values, read_yaml((ROOT / "params.yaml").read_text()))
        except UserError as exc:
            return {f"error: {exc}"}
        return set()
    try:
        return {params_problem(raw, values) for raw in apply_overrides(values, tmp_path)} - {None}
    except InvalidArgumentError as exc:
        return {f"DVC refuses it: {exc.__cause__ or exc}"}


def test_every_set_param_validates(tmp_path):
    problems, checked = [], 0
    for s in snippets():
        for words in commands(s):
            values = overrides(words)
            if not values or any(PLACEHOLDER.search(v) for v in values):
                continue
            checked += 1
            check_one(s, set_params_problems(words, tmp_path), problems)
    assert checked >= 10, "the docs' -S commands were not found: is the parsing broken?"
    assert not problems, "\n".join(problems)


def check_one(s: Snippet, found: set[str], problems: list[str]) -> None:
    """A command must pass, or, shown with an `error:` line after it, fail with exactly that line."""
    if s.error is None and found:
        problems.append(f"{s.where()}: {'; '.join(sorted(found))}")
    elif s.error is not None and found != {s.error}:
        problems.append(f"{s.where()}: shown as `{s.error}`, but the pipeline says {sorted(found) or 'nothing'}")


def merged(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def yaml_blocks(path: Path) -> list[tuple[int, str]]:
    blocks, start, body = [], None, []
    for i, line in enumerate(read(path)):
        if start is None and line.strip() in ("```yaml", "```yml"):
            start, body = i + 1, []
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(body)))
            start = None
        elif start is not None:
            body.append(line)
    return blocks


def test_params_blocks_validate():
    base = read_yaml((ROOT / "params.yaml").read_text())
    problems = []
    for path in FILES:
        for line, text in yaml_blocks(path):
            block = read_yaml(text)
            if not isinstance(block, dict) or not set(block) <= set(Params.model_fields):
                continue  # not params (e.g. a dvc.yaml excerpt)
            try:
                parse_params(merged(base, block), check_models="model" in block)
            except UserError as exc:
                problems.append(f"{path.relative_to(ROOT)}:{line}: yaml block: {exc}")
    assert not problems, "\n".join(problems)


# --- commands, files and links ------------------------------------------------------------------

def subcommands() -> dict[str, argparse.ArgumentParser]:
    from pipeline.cli import parser

    [sub] = [a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def commands(s: Snippet) -> list[list[str]]:
    """The snippet's commands as word lists, split at pipes, `&&` and redirections."""
    out, current = [], []
    for w in tokens(s.text):
        if w in SEPARATORS:
            out.append(current)
            current = []
        else:
            current.append(w)
    return [c for c in out + [current] if c]


def pipeline_calls(words: list[str]) -> list[tuple[str, list[str]]]:
    """(subcommand, its arguments) for `python -m pipeline SUB ...`, or `pipeline SUB ...` typed as a command."""
    for i in range(len(words) - 1):
        if words[i:i + 2] == ["-m", "pipeline"] and i + 2 < len(words):
            return [(words[i + 2], words[i + 3:])]
    if words[0] == "pipeline" and len(words) > 1:
        return [(words[1], words[2:])]
    return []


def test_commands_name_what_exists():
    subs = subcommands()
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    problems = []
    for s in snippets():
        for words in commands(s):
            for sub, args in pipeline_calls(words):
                if sub not in subs:
                    problems.append(f"{s.where()}: no subcommand `{sub}` (there are: {', '.join(subs)})")
                    continue
                known = subs[sub]._option_string_actions
                bad = [a for a in args if a.startswith("-") and a != "-" and a.split("=")[0] not in known]
                if bad:
                    problems.append(f"{s.where()}: `pipeline {sub}` takes no {', '.join(bad)}")
            for i, w in enumerate(words[:-1]):
                nxt = words[i + 1]
                if w == "-m" and nxt.startswith(("stages.", "pipeline.")):
                    module = ROOT / nxt.replace(".", "/")
                    if not (module.with_suffix(".py").is_file() or (module / "__init__.py").is_file()):
                        problems.append(f"{s.where()}: no module {nxt}")
                if w in ("python", "python3", "bash") and nxt.endswith((".py", ".sh")) and not (ROOT / nxt).is_file():
                    problems.append(f"{s.where()}: no file {nxt}")
            if words[0] == "make" and len(words) > 1 and words[1] not in targets:
                problems.append(f"{s.where()}: no Makefile target `{words[1]}` (there are: {', '.join(sorted(targets))})")
    assert not problems, "\n".join(problems)


def test_the_module_docstring_names_every_subcommand():
    import ast

    doc = ast.get_docstring(ast.parse((ROOT / "pipeline" / "__main__.py").read_text())) or ""
    missing = [sub for sub in subcommands() if sub not in doc]
    assert not missing, f"pipeline/__main__.py's docstring does not name: {', '.join(missing)}"


def test_relative_links_point_to_files():
    problems = []
    for path in FILES:
        for i, line in enumerate(read(path), 1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target) or target.startswith("#"):
                    continue
                if not (path.parent / target.split("#")[0]).exists():
                    problems.append(f"{path.relative_to(ROOT)}:{i}: link to a missing file: {target}")
    assert not problems, "\n".join(problems)


def test_no_path_outside_the_repository():
    problems = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}" for path in FILES
                for i, line in enumerate(read(path), 1) if "../shared" in line or "/work/" in line]
    assert not problems, "paths outside the repository:\n" + "\n".join(problems)


def test_the_readme_first_screen_has_the_three_commands():
    screen = read(ROOT / "README.md")[:FIRST_SCREEN]
    text = "\n".join(screen)
    finetune = [line for line in screen if "dvc exp run" in line and "dataset=folder" in line
                and ("pretrained=true" in line or "weights=" in line)]
    assert "make repro" in text, f"README.md lines 1-{FIRST_SCREEN}: no `make repro`"
    assert finetune, f"README.md lines 1-{FIRST_SCREEN}: no `dvc exp run -S dataset=folder ... -S pretrained=true`"
    assert re.search(r"python -m pipeline runs|dvc exp show|mlflow ui", text), \
        f"README.md lines 1-{FIRST_SCREEN}: no command that compares runs"


def test_params_page_names_every_key():
    text = (ROOT / "docs" / "params.md").read_text()
    missing = []
    for key, field in Params.model_fields.items():
        section = field.annotation if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields") else None
        names = [f"{key}.{sub}" for sub in section.model_fields] if section else [key]
        missing += [n for n in names if f"`{n}`" not in text and f"`{n.split('.')[-1]}`" not in text]
    assert not missing, f"docs/params.md does not name these params keys: {', '.join(missing)}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_fence_is_closed(path):
    fences = [i for i, line in enumerate(read(path), 1) if line.lstrip().startswith("```")]
    assert len(fences) % 2 == 0, f"{path.relative_to(ROOT)}:{fences[-1]}: a code fence that is never closed"


def test_the_lr_auto_figures_are_the_codes():
    """docs/models-and-transfer.md states the AdamW rates `lr: auto` picks; the code's tables hold them."""
    from pipeline.training.strategy import BASE, NO_BATCHNORM, PROBE

    text = (ROOT / "docs" / "models-and-transfer.md").read_text()
    section = " ".join(text[text.index("## `lr: auto`"):].split("\n## ")[0].split())
    for said, table in (("AdamW {} from scratch", BASE), ("{} for models without BatchNorm", NO_BATCHNORM),
                        ("{} for a linear probe", PROBE)):
        said = said.format(f"{table['adamw']:.0e}".replace("e-0", "e-"))  # 0.003 as the page writes it: 3e-3
        assert said in section, f"docs/models-and-transfer.md, `lr: auto`: no {said!r}"
