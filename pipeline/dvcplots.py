"""What `dvc plots show` / `dvc plots diff` draw, readable and offline.

- **Templates** (`.dvc/plots/*.json`, named in dvc.yaml's `plots:`), derived here from
  dvc-render's own so that they follow its placeholders: per-epoch curves with whole-number
  epoch ticks (and a log-scale variant for losses); confusion matrices whose zero cells are
  blank, whose correct (diagonal) and wrong cells have their own colour scales (a single
  error is as visible as a full diagonal), with every non-zero count printed. The files are
  committed; `tests/test_views.py` checks that they equal what this module derives.
- **The page** (`.dvc/plots_offline.html`, `plots.html_template` in .dvc/config): DVC's own
  page loads vega from a CDN and is blank offline. This one inlines the vega, vega-lite and
  vega-embed bundle that the `vl-convert-python` package ships, so it draws with no network.
  It is generated (about 1 MB, git-ignored) by `python -m pipeline.dvcplots`, which `make
  install` and the check stage run when it is missing or from another vl-convert version.

    python -m pipeline.dvcplots          # write the templates and the page
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

TEMPLATE_DIR = Path(".dvc/plots")
PAGE = Path(".dvc/plots_offline.html")
VEGA_LITE = "5.8"  # DVC's templates are vega-lite 5 (they use `selection`, removed in 6)
X, Y = "<DVC_METRIC_X>", "<DVC_METRIC_Y>"


def _walk(node: Any, fn: Callable[[dict], None]) -> None:
    if isinstance(node, dict):
        fn(node)
        for value in node.values():
            _walk(value, fn)
    elif isinstance(node, list):
        for value in node:
            _walk(value, fn)


def epochs_template(log_y: bool = False) -> dict:
    """DVC's `linear` template with whole-number epoch ticks (and a log y axis)."""
    from dvc_render.vega_templates import LinearTemplate

    content = copy.deepcopy(LinearTemplate.DEFAULT_CONTENT)

    def patch(node: dict) -> None:
        if node.get("field") == X and node.get("type") == "quantitative":
            node["axis"] = {"tickMinStep": 1, "format": "d"}
        if log_y and node.get("field") == Y and "scale" in node:
            node["scale"] = {"type": "log"}

    _walk(content, patch)
    return content


def confusion_template(normalized: bool) -> dict:
    """DVC's `confusion` / `confusion_normalized` template with blank zero cells, diagonal and
    off-diagonal cells in two colour scales, and the value printed in every non-zero cell."""
    from dvc_render.vega_templates import ConfusionTemplate, NormalizedConfusionTemplate

    content = copy.deepcopy((NormalizedConfusionTemplate if normalized else ConfusionTemplate).DEFAULT_CONTENT)
    content.pop("params", None)  # the "show values" checkbox: values are always shown
    spec = content["spec"]
    value = "percent_of_y" if normalized else "xy_count"
    legend = "fraction of the true class" if normalized else "images"
    same = f"datum['{X}'] == datum['{Y}']"

    def cells(test: str, scheme: str, title: str) -> dict:
        scale = {"scheme": scheme, "domain": [0, 1]} if normalized else {"scheme": scheme, "domainMin": 0, "nice": True}
        return {"transform": [{"filter": f"datum.xy_count > 0 && ({test})"}],
                "mark": "rect", "width": "<DVC_METRIC_PLOT_WIDTH>", "height": "<DVC_METRIC_PLOT_HEIGHT>",
                "encoding": {"color": {"field": value, "type": "quantitative", "scale": scale,
                                       "legend": {"title": f"{title} ({legend})"}}}}

    text = {"transform": [{"filter": "datum.xy_count > 0"}], "mark": {"type": "text", "fontSize": 10},
            "encoding": {"text": {"field": value, "type": "quantitative", "format": ".2f" if normalized else "d"},
                         "color": {"value": "black"}}}
    hover = [layer for layer in spec["layer"][1:] if layer.get("mark") != "text"]  # tooltip and highlight
    spec["layer"] = [cells(same, "blues", "correct"), cells(f"!({same})", "oranges", "wrong"), *hover, text]
    spec["resolve"] = {"scale": {"color": "independent"}}
    return content


def templates() -> dict[str, dict]:
    return {"epochs": epochs_template(), "epochs_log": epochs_template(log_y=True),
            "confusion_readable": confusion_template(normalized=False),
            "confusion_normalized_readable": confusion_template(normalized=True)}


def template_text(content: dict) -> str:
    return json.dumps(content, indent=2) + "\n"


def page(bundle: str, version: str) -> str:
    """DVC's HTML page (its `{plot_divs}` placeholder) with the libraries inlined; no `{scripts}`
    placeholder, so DVC adds no CDN links."""
    bundle = bundle.replace("</script", "<\\/script")  # an inline script ends at the first "</script"
    return (f"<!DOCTYPE html>\n<!-- vega bundle of vl-convert-python {version}, vega-lite {VEGA_LITE}: "
            "python -m pipeline.dvcplots -->\n<html>\n<head>\n<meta charset=\"utf-8\">\n{refresh_tag}\n"
            "<title>DVC plots</title>\n<style>body{font-family:sans-serif} table{border-spacing:15px}</style>\n"
            f"<script type=\"text/javascript\">\n{bundle}\n</script>\n</head>\n<body>\n{{plot_divs}}\n</body>\n</html>\n")


def _version() -> str:
    from importlib.metadata import version

    return version("vl-convert-python")


def page_is_current(path: Path = PAGE) -> bool:
    if not path.exists():
        return False
    with open(path, encoding="utf-8") as f:
        f.readline()
        return f"vl-convert-python {_version()}," in f.readline()


def write_page(path: Path = PAGE) -> None:
    import vl_convert

    from pipeline.core.io import atomic_path

    text = page(vl_convert.javascript_bundle(vl_version=VEGA_LITE), _version())
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def ensure_page(path: Path = PAGE) -> None:
    """Write the offline page where it is missing or from another vl-convert version."""
    if path.parent.exists() and not page_is_current(path):
        write_page(path)


def write_templates(folder: Path = TEMPLATE_DIR) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in templates().items():
        (folder / f"{name}.json").write_text(template_text(content))


if __name__ == "__main__":
    write_templates()
    write_page()
    print(f"wrote {TEMPLATE_DIR}/*.json and {PAGE}")
