"""MLflow's half of the browser benchmark: the same runs in MLflow 3's own UI.

``populate`` writes the runs straight into MLflow's SQLite tables (MLflow makes the
schema and the experiment; the rows go in with ``executemany``), ``start`` serves them
with ``mlflow server`` and ``ui_times`` times its runs table in a Playwright page.
MLflow runs from its own virtualenv (``bench_server.mlflow_python``), never Kiln's.

.venv/bin/python bench/_mlflow_ui.py --runs 2000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import tempfile
import textwrap
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from bench_server import free_port, mlflow_python, wait_up

if TYPE_CHECKING:
    from playwright.sync_api import Page

SCREEN = Path(__file__).parent / "screens" / "mlflow-runs.png"
WAIT_MS = 600_000
# The first row's run name in MLflow's AG Grid (the name column is pinned left).
FIRST_ROW = """name => {
  const a = document.querySelector(
    '.ag-pinned-left-cols-container .ag-row[row-index="0"] a[href*="/runs/"]');
  return a !== null && a.offsetParent !== null && a.textContent.trim() === name;
}"""
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]  # fmt: skip

POPULATE = textwrap.dedent(
    """
    import json, sqlite3, sys, time
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking import MlflowClient
    db, root, n, analyze = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    uri = f"sqlite:///{db}"
    store = SqlAlchemyStore(uri, root)
    exp = store.create_experiment("bench")
    store.engine.dispose()
    LR = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3]
    BATCH = [16, 32, 64, 128]
    acc = lambda i: (i * 7919) % 10007 / 10007
    loss = lambda i: (i * 104729) % 10009 / 10009
    ids = [f"{i:032x}" for i in range(n)]
    now = int(time.time() * 1000) - n
    con = sqlite3.connect(db)
    con.execute("PRAGMA synchronous=OFF")
    with con:
        con.executemany(
            "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name,"
            " user_id, status, start_time, end_time, source_version, lifecycle_stage,"
            " artifact_uri, experiment_id) VALUES (?,?,'LOCAL','','','bench','FINISHED',?,?,"
            " '','active',?,?)",
            ((r, f"run-{i}", now + i, now + i + 1, f"{root}/{exp}/{r}/artifacts", exp)
             for i, r in enumerate(ids)))
        con.executemany(
            "INSERT INTO tags (key, value, run_uuid) VALUES (?,?,?)",
            (row for i, r in enumerate(ids)
             for row in (("mlflow.runName", f"run-{i}", r), ("sweep", f"s{i // 1000}", r))))
        con.executemany(
            "INSERT INTO params (key, value, run_uuid) VALUES (?,?,?)",
            (row for i, r in enumerate(ids)
             for row in (("lr", str(LR[i % 8]), r), ("batch", str(BATCH[i % 4]), r),
                         ("seed", str(i), r))))
        for table in ("metrics", "latest_metrics"):
            con.executemany(
                f"INSERT INTO {table} (key, value, timestamp, step, is_nan, run_uuid)"
                " VALUES (?,?,?,0,0,?)",
                (row for i, r in enumerate(ids)
                 for row in (("accuracy", acc(i), now + i, r), ("loss", loss(i), now + i, r))))
    if analyze:
        con.execute("ANALYZE")
    con.close()
    top = MlflowClient(tracking_uri=uri).search_runs(
        [exp], order_by=["metrics.accuracy DESC"], max_results=5)
    assert top[0].data.metrics["accuracy"] == max(map(acc, range(n))), top[0]
    assert top[0].info.run_name.startswith("run-") and len(top) == 5
    print(json.dumps({"experiment_id": exp, "top": top[0].info.run_name}))
    """
)


def populate(db: Path, n_runs: int, *, analyze: bool = True) -> str:
    """Write ``n_runs`` finished runs into a new MLflow database at ``db``; returns the
    id of their experiment, "bench".

    With ``analyze`` the database gets SQLite's statistics, which MLflow never gathers.
    Without them SQLite (3.40 here) joins the metric a search sorts on by scanning all of
    its rows for every run: one sorted search of 100,000 runs takes minutes, not 0.1 s.
    """
    root = db.parent / "mlartifacts"
    done = subprocess.run(
        [str(mlflow_python()), "-c", POPULATE, str(db), str(root), str(n_runs),
         "1" if analyze else "0"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return str(json.loads(done.stdout.splitlines()[-1])["experiment_id"])


def start(db: Path, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``mlflow server`` on ``db`` with one worker; returns it and its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(mlflow_python().with_name("mlflow")), "server", "--backend-store-uri",
         f"sqlite:///{db}", "--default-artifact-root", str(work / "mlartifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    wait_up(url + "/health")
    return proc, url


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End the server and the workers it started, killing them if a query holds them."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def top_run(url: str, experiment_id: str, order_by: str) -> str:
    """The name of the run MLflow's search API puts first, ties broken as the UI's are."""
    body = {"experiment_ids": [experiment_id], "order_by": [order_by], "max_results": 1}
    found = httpx.post(f"{url}/api/2.0/mlflow/runs/search", json=body, timeout=600)
    return str(found.raise_for_status().json()["runs"][0]["info"]["run_name"])


def ui_times(page: Page, url: str, experiment_id: str) -> dict[str, float]:
    """Seconds until MLflow's runs table shows the top run by accuracy, sorted through the
    URL: on a page that has not loaded MLflow (``first_page_s``) and again with its
    assets cached (``reload_page_s``); then from a click that sorts by loss (descending,
    the selector's direction) until the first row is the run with the highest loss."""
    best = top_run(url, experiment_id, "metrics.`accuracy` DESC")
    worst = top_run(url, experiment_id, "metrics.`loss` DESC")
    sorted_url = f"{url}/#/experiments/{experiment_id}/runs?" + urllib.parse.urlencode(
        {"orderByKey": "metrics.`accuracy`", "orderByAsc": "false"}
    )
    times: dict[str, float] = {}
    for key in ("first_page_s", "reload_page_s"):
        page.goto("about:blank")
        t = time.perf_counter()
        page.goto(sorted_url)
        page.wait_for_function(FIRST_ROW, arg=best, timeout=WAIT_MS)
        times[key] = time.perf_counter() - t
    page.get_by_test_id("sort-select-dropdown").click()
    by_loss = page.get_by_test_id("sort-select-loss")
    by_loss.click(trial=True)  # waits until the menu is open and still, without clicking
    t = time.perf_counter()
    by_loss.click()
    page.wait_for_function(FIRST_ROW, arg=worst, timeout=WAIT_MS)
    times["resort_s"] = time.perf_counter() - t
    return times


def screenshot(page: Page) -> None:
    """Save the table as ``ui_times`` left it, with the metric and parameter columns that
    MLflow hides by default in view, and without the assistant's pane."""
    page.get_by_role("button", name="Close").click()
    page.get_by_role("button", name="Columns").click()
    for group in ("Metrics", "Parameters"):
        page.get_by_title(re.compile(f"^{group} ")).click()
    page.keyboard.press("Escape")
    page.locator(".ag-body-horizontal-scroll-viewport").evaluate(
        "e => { e.scrollLeft = e.scrollWidth; }"
    )  # the run names stay pinned on the left
    page.wait_for_timeout(500)
    SCREEN.parent.mkdir(exist_ok=True)
    page.screenshot(path=SCREEN)


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--no-analyze", action="store_true", help="MLflow's database as is")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        experiment_id = populate(work / "mlflow.db", args.runs, analyze=not args.no_analyze)
        result = {"runs": args.runs, "populate_s": time.perf_counter() - t}
        proc, url = start(work / "mlflow.db", work)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
                )
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                result |= ui_times(page, url, experiment_id)
                screenshot(page)
                browser.close()
        finally:
            stop(proc)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
