"""params.yaml, rendered from the `Params` model of pipeline/core/params.py: every key with its default,
and its `description` as the comment beside it (a section's docstring beside the section).

`python -m pipeline params --write` writes it; tests/test_params.py fails when the committed
params.yaml is not what `render_params_yaml()` returns."""
from __future__ import annotations

import inspect
import json
import textwrap
from decimal import Decimal
from typing import Any

import yaml
from pydantic import BaseModel

from pipeline.core.params import Params, read_yaml

WIDTH = 116          # the longest line
TOP_COLUMN = 21      # where the comments of top-level keys and of section names start
SECTION_COLUMN = 23  # where those of the keys inside a section start
TOP_LEVEL = "--- frequently changed (top-level, so `-S key=value` works as typed) ---"
SOURCE = "Written by `python -m pipeline params --write` from pipeline/core/params.py: change defaults and comments there."


def render_params_yaml() -> str:
    """The text of params.yaml: a header, the top-level keys, then one block per section."""
    lines = [f"# {line}".rstrip() for line in inspect.cleandoc(Params.__doc__ or "").splitlines()]
    lines += [f"# {SOURCE}", "", f"# {TOP_LEVEL}"]
    for name, field in Params.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            lines += ["", *_commented(f"{name}:", TOP_COLUMN, type(default).__doc__), *_section(default)]
        else:
            lines += _commented(f"{name}: {_value(default)}", TOP_COLUMN, field.description)
    return "\n".join(lines) + "\n"


def _section(section: BaseModel) -> list[str]:
    lines = []
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, dict):  # a mapping (tune.space): one entry per line
            lines += _commented(f"  {name}:", SECTION_COLUMN, field.description)
            lines += [f"    {_value(key)}: {_value(entry)}" for key, entry in value.items()]
        else:
            lines += _commented(f"  {name}: {_value(value)}", SECTION_COLUMN, field.description)
    return lines


def _commented(code: str, column: int, text: str | None) -> list[str]:
    """`code` with `text` as its comment from `column` on (two spaces after code that reaches it),
    wrapped at WIDTH with the continuation lines' comments at `column`."""
    if not text:
        return [code]
    start = code.ljust(column) if len(code) < column else code + "  "
    words = " ".join(text.split()).replace(" = ", "\xa0=\xa0")  # "0 = off" stays on one line
    lines = textwrap.wrap(words, WIDTH, initial_indent=start + "# ", subsequent_indent=" " * column + "# ",
                          break_long_words=False, break_on_hyphens=False)
    return [line.replace("\xa0", " ") for line in lines]


def _value(value: Any) -> str:
    """YAML flow style as a person writes it: null, true, 0.00001 (not 1e-05), [0.25, 1.0], {low: 1, high: 2}."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = format(Decimal(repr(value)), "f")
        return text if "." in text else text + ".0"
    if isinstance(value, list):
        return "[" + ", ".join(map(_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_value(k)}: {_value(v)}" for k, v in value.items()) + "}"
    return value if _reads_back(value) else json.dumps(value, ensure_ascii=False)  # JSON's quoting is YAML's


def _reads_back(text: str) -> bool:
    """Whether `text` written plain, also inside [...], is read as this same string."""
    try:
        return read_yaml(f"[{text}]") == [text]
    except yaml.YAMLError:
        return False
