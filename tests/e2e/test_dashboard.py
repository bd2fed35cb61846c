"""The web dashboard, driven in Debian's Chromium by Playwright against a real ``kiln
server`` with tokens: the runs table (sort, filter, pages), a run's chart and logs,
compare, approvals by role, a trace's why view, and one project's data never shown to
another. Also the API it stands on (groups, columns, series) and ``kiln ui``."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import ServerProcess
from kiln.record.model import RunStatus
from kiln.record.store.base import WriteBatch
from kiln.record.store.http import HttpStore
from kiln.record.store.rows import ArtifactRow, RunRow, RunUpdate, SpanRow

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]  # fmt: skip
RUNS = 400
LRS = [0.1, 0.01, 0.001, 0.0001]
HOSTILE = '<img src=x onerror="window.pwned=1">'


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def rid(n: int, prefix: str = "a") -> str:
    return f"{prefix}{n:031x}"


def acc(i: int) -> float:
    return ((i * 7919) % 1009) / 1009


class World:
    """A server with two projects, principals of each role, and records to look at."""

    def __init__(self, server: ServerProcess, home: Path) -> None:
        self.server, self.url = server, server.url
        assert server.enrolment is not None
        self.http = httpx.Client(base_url=server.url, timeout=30)
        self.admin = self.call("POST", "/enrol", server.enrolment, {"name": "root"})["token"]
        self.tokens = {"admin": self.admin}
        for role in ("viewer", "approver"):
            self.call("POST", "/principals", self.admin, {"name": role, "role": role})
            made = self.call("POST", "/tokens", self.admin, {"principal": role, "role": role})
            self.tokens[role] = made["token"]
        made = self.call("POST", "/projects", self.admin, {"name": "blue"})
        self.tokens["blue"] = made["token"]["token"]
        self.store = HttpStore(server.url, cache=home / "c1", token=self.admin)
        self.blue = HttpStore(server.url, cache=home / "c2", token=self.tokens["blue"])
        self.record()

    def call(self, method: str, path: str, token: str, body: Any = None) -> Any:
        answer = self.http.request(method, f"/api/v1{path}", headers=bearer(token), json=body)
        assert answer.status_code < 300, answer.text
        return answer.json() if answer.content else None

    def record(self) -> None:
        new = [RunRow(id=rid(i), app="vision", name=f"run-{i}", status=RunStatus.SUCCEEDED,
                      created_at=1_700_000_000.0 + i, started_at=1_700_000_000.0 + i,
                      ended_at=1_700_000_010.0 + i, params={"lr": LRS[i % 4], "depth": i % 7},
                      tags={"team": "blue" if i % 2 else "red"})
               for i in range(RUNS)]  # fmt: skip
        new[7] = new[7].model_copy(update={"params": {**new[7].params, "note": HOSTILE}})
        summaries = [(rid(i), "vision", "acc", acc(i)) for i in range(RUNS)]
        summaries += [(rid(i), "vision", "loss", 1 - acc(i)) for i in range(RUNS)]
        metrics = [(rid(i), "loss", s, 1.0, (1 - acc(i)) + 1 / (s + 1)) for i in range(3)
                   for s in range(50)]  # fmt: skip
        logs = [
            (rid(1), 1.0 + e, "stdout", f"epoch {e} loss {1 / (e + 1):.3f}\n") for e in range(5)
        ]
        logs.append((rid(1), 9.0, "stderr", f"{HOSTILE}\n"))
        self.store.write(WriteBatch(new_runs=new, summaries=summaries, metrics=metrics, logs=logs))
        # a model whose production alias needs one approval, and one pending request
        sha = self.store.blob_store.put_bytes(b"weights")
        self.store.write(WriteBatch(artifacts=[ArtifactRow(
            run_id=rid(1), direction="out", name="model.pkl", kind="file", sha256=sha, size=7,
        )]))  # fmt: skip
        self.call("POST", "/models/vision/versions", self.admin,
                  {"app": "vision", "run_id": rid(1), "artifact": "model.pkl"})  # fmt: skip
        self.call("PUT", "/models/vision/policies/production", self.admin,
                  {"policy": {"approvals": {"count": 1}, "allow_dirty": True}})  # fmt: skip
        asked = self.call("POST", "/models/vision/promote", self.admin,
                          {"version": 1, "alias": "production", "reason": "best acc"})  # fmt: skip
        self.request_id = asked["value"]["id"]
        attrs = {"input.value": '{"image": [1, 2, 3]}', "output.value": '{"label": "cat"}',
                 "kiln.endpoint.model": "vision:1"}  # fmt: skip
        self.trace = "ab" * 16
        self.store.write_spans([SpanRow(
            trace_id=self.trace, span_id="cd" * 8, name="POST /predict", endpoint="vision",
            model_name="vision", model_version=1, run_id=rid(1), start_ns=1_700_000_100 * 10**9,
            duration_ns=2_500_000, status="ok", attributes=attrs,
        )])  # fmt: skip
        # another project's run, whose name and id must never show in the default project
        self.blue.write(WriteBatch(
            new_runs=[RunRow(id=rid(1, "b"), app="secret", name="blue-secret",
                             status=RunStatus.RUNNING, created_at=1.0)],
            updates=[RunUpdate(id=rid(1, "b"), status=RunStatus.SUCCEEDED, ended_at=2.0)],
            summaries=[(rid(1, "b"), "secret", "acc", 0.99)],
        ))  # fmt: skip

    def close(self) -> None:
        self.store.close()
        self.blue.close()
        self.http.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    home = tmp_path_factory.mktemp("dashboard")
    server = ServerProcess(f"sqlite:///{home / 'kiln.db'}", home, auth=True).start()
    try:
        made = World(server, home)
        yield made
        made.close()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield launched
        launched.close()


@pytest.fixture
def open_as(world: World, browser: Any) -> Iterator[Any]:
    """A fresh tab signed in as a role (its own sessionStorage), failing the test on any
    script error."""
    contexts: list[Any] = []
    errors: list[str] = []

    def open_page(who: str, fragment: str = "#/runs") -> Any:
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{world.url}/#token={world.tokens[who]}")
        page.wait_for_selector("#who[data-role]")
        page.goto(f"{world.url}/{fragment}")
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert errors == []


def first_ids(page: Any, n: int) -> list[str]:
    rows = page.locator(".vt-row")
    return [rows.nth(i).get_attribute("data-id") for i in range(n)]


def test_the_runs_table_sorts_filters_and_pages_through_the_server(
    world: World, open_as: Any
) -> None:
    page = open_as("viewer")
    page.wait_for_selector("[data-ready] .vt-row")
    assert page.inner_text("#count") == f"{RUNS} runs"
    assert page.locator(".vt-row").count() < 60  # only the rows in view exist
    by_acc = sorted(range(RUNS), key=lambda i: -acc(i))
    page.click('.vt-head [data-sort="metrics.acc"]')
    expect(page.locator(".vt-row").first).to_have_attribute("data-id", rid(by_acc[0]))
    assert first_ids(page, 3) == [rid(i) for i in by_acc[:3]]
    page.click('.vt-head [data-sort="metrics.acc"]')  # again: ascending
    expect(page.locator(".vt-row").first).to_have_attribute("data-id", rid(by_acc[-1]))
    # filter: a metric comparison, a param and a tag
    page.fill("#filter", "acc>0.5 lr=0.01 team=blue")
    page.press("#filter", "Enter")
    wanted = [i for i in range(RUNS) if acc(i) > 0.5 and LRS[i % 4] == 0.01 and i % 2]
    expect(page.locator("#count")).to_have_text(f"{len(wanted)} runs")
    assert len(wanted) > 10
    # scrolled to the end, the last run of the order is there (fetched page by page)
    page.fill("#filter", "")
    page.press("#filter", "Enter")
    expect(page.locator("#count")).to_have_text(f"{RUNS} runs")
    page.eval_on_selector(".vt-body", "el => { el.scrollTop = el.scrollHeight; }")
    last = rid(by_acc[0])  # ascending by acc: the best comes last
    page.wait_for_selector(f'.vt-row[data-id="{last}"]')
    # a bad filter is refused with the field named, before any request
    page.fill("#filter", "status:exploded")
    page.press("#filter", "Enter")
    assert "status" in page.inner_text("[role=alert]")
    # a param holding markup is shown as text
    page.goto(f"{world.url}/#/runs?q=run-7&cols=params.note")
    page.wait_for_selector("[data-ready] .vt-row")
    assert HOSTILE in page.inner_text(".vt-body")
    assert page.locator(".vt-body img").count() == 0


def test_grouping_shows_mean_median_and_range_per_group(world: World, open_as: Any) -> None:
    page = open_as("viewer", "#/runs?group=params.lr&cols=metrics.acc")
    page.wait_for_selector("#groups")
    rows = page.locator("#groups tbody tr")
    assert rows.count() == 4
    text = page.inner_text("#groups")
    for lr in LRS:
        group = [acc(i) for i in range(RUNS) if LRS[i % 4] == lr]
        assert f"{min(group):.5g}".rstrip("0") in text or f"{min(group):.4g}" in text


def test_a_run_page_shows_its_chart_and_logs(world: World, open_as: Any) -> None:
    page = open_as("viewer", f"#/run/{rid(1)}?tab=metrics")
    chart = page.wait_for_selector('[data-chart="loss"] canvas')
    assert chart.bounding_box()["width"] > 300
    page.goto(f"{world.url}/#/run/{rid(1)}?tab=logs")
    page.wait_for_selector("#logs span")
    logs = page.inner_text("#logs")
    assert "epoch 4 loss 0.200" in logs and HOSTILE in logs
    assert page.locator("#logs img").count() == 0
    page.goto(f"{world.url}/#/run/{rid(1)}?tab=overview")
    assert "0.01" in page.inner_text("#params")


def test_a_running_runs_logs_appear_as_it_prints(world: World, open_as: Any) -> None:
    run = rid(9, "d")
    world.store.write(WriteBatch(
        new_runs=[RunRow(id=run, app="live", status=RunStatus.RUNNING, created_at=2.0)],
        logs=[(run, 1.0, "stdout", "starting\n")],
    ))  # fmt: skip
    page = open_as("viewer", f"#/run/{run}?tab=logs")
    expect(page.locator("#logs")).to_contain_text("starting")
    world.store.write(WriteBatch(logs=[(run, 2.0, "stdout", "step 1 done\n")]))
    expect(page.locator("#logs")).to_contain_text("step 1 done")
    world.store.write(WriteBatch(updates=[RunUpdate(id=run, status=RunStatus.SUCCEEDED,
                                                    ended_at=3.0)]))  # fmt: skip
    expect(page.locator("[data-live]")).to_have_text("The run ended: succeeded.")


def test_three_runs_compared_side_by_side(world: World, open_as: Any) -> None:
    page = open_as("viewer", "#/runs?sort=name")
    page.wait_for_selector("[data-ready] .vt-row")
    for i in range(3):
        page.locator(".vt-row").nth(i).locator("input[type=checkbox]").check()
    chosen = first_ids(page, 3)
    page.click("#compare")
    page.wait_for_selector("#diff-table")
    heads = page.locator("#diff-table thead th a")
    assert [heads.nth(i).get_attribute("data-run") for i in range(3)] == chosen
    page.wait_for_selector('#overlaid [data-chart="loss"] canvas')
    assert page.locator("#parallel").get_attribute("data-lines") == "3"
    assert page.locator("#pareto canvas").count() == 1


def test_a_page_loading_late_never_pulls_the_address_back(world: World, open_as: Any) -> None:
    # the runs page writes its state into the address when its data arrives; if the
    # user has gone elsewhere by then, the address (and so the page shown) stays theirs
    page = open_as("viewer", "#/runs")
    page.wait_for_selector("[data-ready] .vt-row")
    moved = page.evaluate("""() => {
        location.hash = "#/model/vision";
        setHashQuery("#/runs", new URLSearchParams("cols=params.lr"));
        return location.hash;
    }""")
    assert moved == "#/model/vision"
    page.wait_for_selector("#versions")


def test_an_approver_approves_and_a_viewer_sees_no_button(world: World, open_as: Any) -> None:
    viewer = open_as("viewer", "#/model/vision")
    viewer.wait_for_selector("#versions")
    assert viewer.locator("[data-approve]").count() == 0
    assert viewer.locator("[data-rollback]").count() == 0
    assert world.request_id in viewer.inner_text("#requests")  # shown, not actionable
    approver = open_as("approver", "#/models")
    approver.click(f'[data-approve="{world.request_id}"]')
    expect(approver.locator("[data-approve]")).to_have_count(0)
    assert world.call("GET", "/models/vision/aliases", world.admin) == {"production": 1}
    events = world.call("GET", "/audit/events?action=promotion.approve", world.admin)["events"]
    assert [e["actor"] for e in events][:1] == ["approver"]


def test_a_traces_why_view_names_everything_behind_the_answer(world: World, open_as: Any) -> None:
    page = open_as("viewer", "#/traces")
    page.click(f'[data-trace="{world.trace}"]')
    page.wait_for_selector("#why")
    assert '"label": "cat"' in page.inner_text("#why-output")
    text = page.inner_text("#why")
    assert "vision:1" in text and rid(1)[:8] in text


def test_another_projects_data_never_appears(world: World, open_as: Any) -> None:
    page = open_as("admin", "#/runs?q=blue-secret")
    expect(page.locator("#count")).to_have_text("0 runs")
    page.goto(f"{world.url}/#/run/{rid(1, 'b')}")
    assert "404" in page.wait_for_selector("[role=alert]").inner_text()
    blue = open_as("blue", "#/runs")
    blue.wait_for_selector("[data-ready] .vt-row")
    assert blue.inner_text("#count") == "1 runs"
    assert "blue-secret" in blue.inner_text(".vt-body")
    blue.goto(f"{world.url}/#/model/vision")
    assert "404" in blue.wait_for_selector("[role=alert]").inner_text()


def test_a_page_without_a_token_asks_for_one(world: World, browser: Any) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(world.url + "/")
    forged = world.tokens["viewer"][:-4] + "AAAA"  # a real token's id, a wrong secret
    page.fill("#token", forged)
    page.click("button[type=submit]")
    assert "not valid" in page.wait_for_selector(".error-box").inner_text()
    page.fill("#token", world.tokens["viewer"])
    page.click("button[type=submit]")
    page.wait_for_selector("[data-ready] .vt-row")
    headers = httpx.get(world.url + "/").headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert httpx.get(world.url + "/ui/../kiln.db").status_code == 404
    context.close()


# -- the API the pages stand on ------------------------------------------------------


def test_series_keep_each_buckets_extremes_and_are_exact_on_zoom(
    world: World,
) -> None:
    run = rid(5, "c")
    points = [(run, "y", s, 1.0, math.sin(s / 500)) for s in range(20_000)]
    points[12_345] = (run, "y", 12_345, 1.0, 50.0)  # a spike
    points[777] = (run, "y", 777, 1.0, -50.0)  # and a dip
    world.store.write(WriteBatch(new_runs=[RunRow(id=run, app="s", status=RunStatus.RUNNING,
                                                  created_at=1.0)]))  # fmt: skip
    for start in range(0, len(points), 5000):
        world.store.write(WriteBatch(metrics=points[start : start + 5000]))
    asked = {"runs": [run], "keys": ["y"], "points": 400}
    cut = world.call("POST", "/runs:series", world.admin, asked)["series"][0]
    assert cut["total"] == 20_000 and len(cut["points"]) <= 400
    assert [12_345, 50.0] in cut["points"] and [777, -50.0] in cut["points"]
    assert [p[0] for p in cut["points"]] == sorted(p[0] for p in cut["points"])
    zoom = world.call("POST", "/runs:series", world.admin, {
        "runs": [run], "keys": ["y"], "points": 400, "min_step": 12_300, "max_step": 12_399,
    })["series"][0]  # fmt: skip
    assert zoom["total"] == 100 and [p[0] for p in zoom["points"]] == list(range(12_300, 12_400))
    too_many = {"runs": [run] * 500, "keys": ["y", "z", "w"], "points": 100}
    refused = world.http.post("/api/v1/runs:series", headers=bearer(world.admin), json=too_many)
    assert refused.status_code == 422 and "at most 1000 series" in refused.text
    # another project's run is not found, and its points are not given
    theirs = world.call("POST", "/runs:series", world.tokens["blue"],
                        {"runs": [run], "keys": ["y"]})  # fmt: skip
    assert theirs == {"series": []}


def test_groups_columns_and_totals_of_a_filter(world: World) -> None:
    groups = world.call("POST", "/runs:groups", world.admin, {
        "query": {"app": "vision"}, "by": "params.lr", "metrics": ["acc"],
    })["groups"]  # fmt: skip
    assert sorted(g["value"] for g in groups) == sorted(LRS)
    for g in groups:
        values = [acc(i) for i in range(RUNS) if LRS[i % 4] == g["value"]]
        spread = g["metrics"]["acc"]
        assert g["runs"] == len(values) and spread["n"] == len(values)
        assert spread["min"] == min(values) and spread["max"] == max(values)
        assert math.isclose(spread["mean"], sum(values) / len(values))
    columns = world.call("POST", "/runs:columns", world.admin, {"app": "vision"})
    assert columns == {"params": ["depth", "lr", "note"], "tags": ["team"],
                       "metrics": ["acc", "loss"]}  # fmt: skip
    found = world.call("POST", "/runs:search", world.admin, {
        "metrics": [{"key": "acc", "op": ">=", "value": 0.9}], "total": True, "limit": 5,
        "order_by": "-acc",
    })  # fmt: skip
    assert found["total"] == sum(acc(i) >= 0.9 for i in range(RUNS)) and len(found["runs"]) == 5
    bad = world.http.post("/api/v1/runs:groups", headers=bearer(world.admin),
                          json={"by": "metrics.acc"})  # fmt: skip
    assert bad.status_code == 422 and "by" in bad.text
    blue = world.call("POST", "/runs:columns", world.tokens["blue"], {})
    assert blue["metrics"] == ["acc"] and blue["params"] == []


def kiln_ui(home: Path, actor: str = "ada") -> tuple[subprocess.Popen[str], str, str]:
    """``kiln ui --no-browser`` on ``home``: the process, its address, the link's code."""
    env = {**os.environ, "KILN_HOME": str(home), "KILN_ACTOR": actor}
    env.pop("KILN_SERVER", None)
    command = [sys.executable, "-m", "kiln", "ui", "--no-browser"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(r"(http://127\.0\.0\.1:\d+)/#code=(\S+)", line)
        if found:
            return proc, found.group(1), found.group(2)
    proc.wait(timeout=60)
    proc.stdout.close()
    raise AssertionError("kiln ui ended before printing its address")


def ui_tokens(home: Path) -> list[Any]:
    from kiln.record.store.sql import SqlStore

    with SqlStore(f"sqlite:///{home / 'kiln.db'}") as store:
        return [t for t in store.tokens() if t.name == "kiln ui"]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_kiln_ui_signs_in_once_and_revokes_its_token_when_stopped(
    tmp_path: Path, stop: signal.Signals
) -> None:
    proc, address, code = kiln_ui(tmp_path / "home")
    try:
        handed = httpx.post(f"{address}/api/v1/handoff", json={"code": code})
        token = handed.json()["token"]
        me = httpx.get(f"{address}/api/v1/whoami", headers=bearer(token)).json()
        assert (me["name"], me["role"]) == ("ada", "admin")  # a new store's first admin
        again = httpx.post(f"{address}/api/v1/handoff", json={"code": code})
        assert again.status_code == 401 and "used already" in again.text
        assert httpx.get(f"{address}/api/v1/whoami").status_code == 401
    finally:
        proc.send_signal(stop)
        proc.wait(timeout=60)
        assert proc.stdout is not None
        proc.stdout.close()
    [row] = ui_tokens(tmp_path / "home")
    assert row.revoked_at is not None and row.revoked_at <= time.time()


def test_kiln_ui_on_a_store_with_principals_needs_one_of_them(tmp_path: Path) -> None:
    proc, _, _ = kiln_ui(tmp_path / "home", actor="ada")
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.stdout is not None
    proc.stdout.close()
    env = {**os.environ, "KILN_HOME": str(tmp_path / "home"), "KILN_ACTOR": "mallory"}
    env.pop("KILN_SERVER", None)
    done = subprocess.run([sys.executable, "-m", "kiln", "ui", "--no-browser"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0 and "KILN_ACTOR" in done.stderr and "ada" in done.stderr
    assert "enrol" not in done.stdout + done.stderr and len(ui_tokens(tmp_path / "home")) == 1


def test_an_enrolment_token_stops_working_once_an_admin_exists(
    tmp_path: Path, start_server: Any
) -> None:
    server = start_server(auth=True)  # prints an enrolment token; nobody uses it
    proc, address, _ = kiln_ui(server.home, actor="ada")  # the same store: ada is admin
    try:
        late = httpx.post(f"{address}/api/v1/enrol", json={"name": "mallory"},
                          headers=bearer(server.enrolment or ""))  # fmt: skip
        assert late.status_code == 401, late.text
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        assert proc.stdout is not None
        proc.stdout.close()
    from kiln.record.store.sql import SqlStore

    with SqlStore(server.store_url) as store:
        assert [p.name for p in store.principals()] == ["ada"]


def test_the_queues_page_shows_quotas_and_why_a_run_waits(world: World, open_as: Any) -> None:
    world.call("PUT", "/pools/lab", world.admin, {"cpu": 4, "gpu": 1, "gpu_type": "H100"})
    world.call("PUT", "/queues/lab", world.admin, {"cpu": 2, "gpu": 1})
    asked = world.call("POST", "/workloads", world.admin, {"pool": "lab", "workloads": [
        {"id": rid(50, "c"), "gpu": 1.0}, {"id": rid(51, "c"), "gpu": 1.0}]})  # fmt: skip
    assert [w["state"] for w in asked["workloads"]] == ["admitted", "pending"]
    page = open_as("viewer", "#/queues")
    page.wait_for_selector("#workloads")
    assert "4 cpu, 1 gpu" in page.inner_text("#pools") and "H100" in page.inner_text("#pools")
    assert "2 cpu, 1 gpu" in page.inner_text("#queues")
    waiting = page.inner_text("#workloads")
    assert "needs 1 more gpu in queue default" in waiting and rid(50, "c")[:8] in waiting
    blue = open_as("blue", "#/queues")
    blue.wait_for_selector("#pools")
    assert rid(50, "c")[:8] not in blue.inner_text("main")  # another project's work
    assert "Nothing admitted or waiting." in blue.inner_text("main")
    world.call("POST", "/workloads:sync", world.admin, {"ended": [rid(50, "c"), rid(51, "c")]})


def test_a_person_approves_an_agents_promotion_on_the_approvals_page(
    world: World, open_as: Any
) -> None:
    agent = {"name": "bot", "kind": "agent", "sponsor": "approver", "role": "member"}
    world.call("POST", "/principals", world.admin, agent)
    bot = world.call("POST", "/tokens", world.admin, {"principal": "bot"})["token"]
    body = {"version": 1, "alias": "staging", "reason": HOSTILE}
    asked = world.http.post("/api/v1/models/vision/promote", json=body, headers=bearer(bot))
    assert asked.status_code == 403, asked.text
    viewer = open_as("viewer", "#/approvals")
    viewer.wait_for_selector("#approvals")
    shown = viewer.inner_text("#approvals")
    assert '"alias": "staging"' in shown and "window.pwned=1" in shown  # text, not markup
    assert viewer.evaluate("() => window.pwned") is None
    assert viewer.locator("[data-approve]").count() == 0
    page = open_as("approver", "#/approvals")
    page.wait_for_selector("[data-approve]")
    page.click("[data-approve]")
    expect(page.locator("[data-approve]")).to_have_count(0)
    assert "approved" in page.inner_text("#decided")
    done = world.http.post("/api/v1/models/vision/promote", json=body, headers=bearer(bot))
    assert done.status_code == 200, done.text
    assert world.call("GET", "/models/vision/aliases", world.admin)["staging"] == 1
