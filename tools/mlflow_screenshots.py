"""Photograph the real MLflow UI over this repository's store, for the README's walkthrough.

    python tools/mlflow_screenshots.py [--out docs] [--experiment NAME] [--repo PATH]

Starts `mlflow server` on 127.0.0.1 (a free port) over `mlflow.db` at the repository root,
waits for it, and drives headless Chromium (`apt-get install chromium`) over its DevTools
protocol: the experiment's chart view (docs/mlflow-chart-view.png), its runs table best first
(docs/mlflow-runs-table.png) and the newest run's page (docs/mlflow-run-page.png), each opened at
the addresses the pipeline prints at the end of a run (`?workflowType=machine_learning`). The browser is a new one,
as a first-time user's, except that its *MLflow Assistant* panel, which opens on a browser's
first visit, is marked as seen (`--assistant` keeps it). The server is stopped afterwards.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.endblock import UI_VIEW as VIEW  # noqa: E402  (the addresses the pipeline prints)
from pipeline.runview import SHARED_VIEW  # noqa: E402
WIDTH, HEIGHT = 1600, 1150
SETTLE_S = 12  # the UI fetches runs and metric histories after it has loaded
SEEN_ASSISTANT = {"mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true", "mlflow.assistant.panelOpen_v1": "false"}


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


class Browser:
    """Headless Chromium and one page of it, over the DevTools protocol (aiohttp's websocket)."""

    def __init__(self, executable: str, profile: Path):
        port = free_port()
        self.proc = subprocess.Popen([executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                      "--no-first-run", "--disable-background-networking", "--disable-component-update",
                                      "--disable-sync", f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
                                      f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.endpoint = f"http://127.0.0.1:{port}"
        self.ids = iter(range(1, 1 << 30))

    async def open(self, session) -> None:
        for _ in range(100):
            try:
                with urllib.request.urlopen(self.endpoint + "/json/list", timeout=2) as r:
                    pages = [t for t in json.load(r) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.2)
        else:
            raise SystemExit("Chromium did not start its DevTools endpoint")
        self.ws = await session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1,
                        mobile=False)

    async def call(self, method: str, **params):
        msg_id = next(self.ids)
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        async for msg in self.ws:
            data = json.loads(msg.data)
            if data.get("id") == msg_id:
                if "error" in data:
                    raise SystemExit(f"{method}: {data['error']}")
                return data.get("result", {})

    async def shoot(self, url: str, out: Path) -> None:
        await self.call("Page.navigate", url="about:blank")  # a new document: addresses that differ only
        await asyncio.sleep(0.5)                             # after '#' would not load the page again
        await self.call("Page.navigate", url=url)
        await asyncio.sleep(SETTLE_S)
        shot = await self.call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))
        print(f"wrote {out}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def photograph(browser_path: str, shots: list[tuple[str, Path]], assistant: bool) -> None:
    import aiohttp

    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:  # its helpers may still write
        browser = Browser(browser_path, Path(profile))
        try:
            async with aiohttp.ClientSession() as session:
                await browser.open(session)
                if not assistant:  # a first visit opens the panel and records it; then it is closed
                    await browser.call("Page.navigate", url=shots[0][0])
                    await asyncio.sleep(SETTLE_S / 2)
                    script = "".join(f"localStorage.setItem({k!r}, {v!r});" for k, v in SEEN_ASSISTANT.items())
                    await browser.call("Runtime.evaluate", expression=script)
                for address, out in shots:
                    await browser.shoot(address, out)
        finally:
            browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--experiment", default=None, help="default: the experiment of the newest run")
    ap.add_argument("--repo", type=Path, default=ROOT, help="the repository whose mlflow.db to show (default: this one)")
    ap.add_argument("--assistant", action="store_true", help="leave the MLflow Assistant panel as a first visit has it")
    args = ap.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("no Chromium found: apt-get install chromium")
    store = f"sqlite:///{args.repo.resolve() / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    experiments = [client.get_experiment_by_name(args.experiment)] if args.experiment else client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments if e], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"no finished run in {store}: run the pipeline first (make repro)")
    eid, run_id = runs[0].info.experiment_id, runs[0].info.run_id
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
                               "--host", "127.0.0.1", "--port", str(port)], cwd=args.repo,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url)
        args.out.mkdir(parents=True, exist_ok=True)
        shots = [(f"{url}/#/experiments/{eid}/runs?{VIEW}&compareRunsMode=CHART", args.out / "mlflow-chart-view.png"),
                 (f"{url}/#/experiments/{eid}/runs?viewStateShareKey={SHARED_VIEW}&{VIEW}",
                  args.out / "mlflow-runs-table.png"),
                 (f"{url}/#/experiments/{eid}/runs/{run_id}?{VIEW}", args.out / "mlflow-run-page.png")]
        asyncio.run(photograph(browser, shots, args.assistant))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
