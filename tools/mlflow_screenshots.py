"""Photograph the real MLflow UI over this repository's store, for the README's walkthrough.

    python tools/mlflow_screenshots.py [--out docs] [--experiment image-classification]

Starts `mlflow server` on 127.0.0.1 (a free port) over `mlflow.db` at the repository root,
waits for it, and takes screenshots with headless Chromium (`apt-get install chromium`):
the experiment's chart view (docs/mlflow-chart-view.png) and the newest run's page
(docs/mlflow-run-page.png). The server is stopped afterwards. Nothing else is needed.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WINDOW = "1600,1150"
RENDER_BUDGET_MS = 60000  # virtual time for the UI to fetch and draw its charts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"mlflow server did not answer at {url} within {timeout_s:.0f} s")


def screenshot(browser: str, url: str, out: Path) -> None:
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={WINDOW}", "--run-all-compositor-stages-before-draw",
                    f"--virtual-time-budget={RENDER_BUDGET_MS}", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=300)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--experiment", default="image-classification")
    ap.add_argument("--repo", type=Path, default=ROOT, help="the repository whose mlflow.db to show (default: this one)")
    args = ap.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("no Chromium found: apt-get install chromium")
    store = f"sqlite:///{args.repo.resolve() / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(store).get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"no experiment {args.experiment!r} in {store}: run the pipeline first (make repro)")
    runs = MlflowClient(store).search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                                           max_results=1)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
                               "--host", "127.0.0.1", "--port", str(port)], cwd=args.repo,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url)
        args.out.mkdir(parents=True, exist_ok=True)
        eid = experiment.experiment_id
        screenshot(browser, f"{url}/#/experiments/{eid}/runs?compareRunsMode=CHART", args.out / "mlflow-chart-view.png")
        if runs:
            screenshot(browser, f"{url}/#/experiments/{eid}/runs/{runs[0].info.run_id}",
                       args.out / "mlflow-run-page.png")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
