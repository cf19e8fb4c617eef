"""Screenshot a real `mlflow ui` comparing the latest training runs (for documentation/).

Starts `mlflow ui` on 127.0.0.1 against the given store, opens the run-comparison page of
the newest train runs in headless Chromium (Playwright driving Debian's /usr/bin/chromium)
and writes PNGs.

    python scripts/screenshot_mlflow_ui.py [--store sqlite:///mlflow.db] [--out documentation/img]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def wait_for(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="sqlite:///mlflow.db")
    parser.add_argument("--out", type=Path, default=Path("documentation/img"))
    parser.add_argument("--port", type=int, default=5055)
    parser.add_argument("--runs", type=int, default=3, help="how many of the newest train runs to compare")
    args = parser.parse_args()

    import mlflow
    from playwright.sync_api import sync_playwright

    client = mlflow.MlflowClient(args.store)
    experiment = client.get_experiment_by_name("deblur")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'train'",
                              order_by=["attributes.start_time DESC"], max_results=args.runs)
    if len(runs) < 2:
        raise SystemExit("need at least two train runs to compare (run `dvc exp run -S train.lr=...`)")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.store,
                               "--host", "127.0.0.1", "--port", str(args.port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{args.port}"
    try:
        wait_for(base, 60)
        ids = json.dumps([r.info.run_id for r in runs])
        compare = (f"{base}/#/compare-runs?runs={urllib.parse.quote(ids)}"
                   f"&experiments={urllib.parse.quote(json.dumps([experiment.experiment_id]))}")
        args.out.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(compare)
            page.wait_for_timeout(6000)
            page.screenshot(path=str(args.out / "mlflow_ui.png"), full_page=False)
            page.goto(f"{base}/#/experiments/{experiment.experiment_id}/runs/{runs[0].info.run_id}/model-metrics")
            page.wait_for_timeout(6000)
            page.screenshot(path=str(args.out / "mlflow_ui_metrics.png"), full_page=False)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)
    print(f"wrote {args.out / 'mlflow_ui.png'} and {args.out / 'mlflow_ui_metrics.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
