"""The server's admission (:class:`kiln.server.quotas.Admissions`) over a real store,
SQLite and PostgreSQL: quotas against the pool, refusals with reasons, leases, a
restart that keeps every decision, budgets, explain and what-if."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.errors import NotFoundError, ValidationError
from kiln.observe.cost import Prices
from kiln.record.store import open_sql_store
from kiln.record.store.base import BudgetRow, PoolRow, QueueRow
from kiln.record.store.sql import SqlStore
from kiln.server.quotas import Admissions, period_start

GIB = 2**30


def rid(n: int) -> str:
    return f"{n:032x}"


def ask(n: int, *, cpu: float = 1.0, gpu: float = 0.0, timeout_s: float | None = None,
        priority: int = 0) -> dict[str, object]:  # fmt: skip
    return {"id": rid(n), "cpu": cpu, "memory_bytes": 0, "gpu": gpu, "timeout_s": timeout_s,
            "priority": priority}  # fmt: skip


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStore]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    opened = open_sql_store(url or f"sqlite:///{tmp_path / 'kiln.db'}", actor="root")
    yield opened
    opened.close()


def two_queues(store: SqlStore, admission: Admissions, *, gpu: float = 2.0) -> None:
    admission.set_pool(store, PoolRow("box", {"cpu": 8000, "gpu": round(gpu * 1000)}))
    store.add_project("blue", "root")
    for project in ("default", "blue"):
        admission.set_queue(store.in_project(project),
                            QueueRow(project, "box", {"cpu": 4000, "gpu": round(gpu * 500)},
                                     cohort="lab"))  # fmt: skip


def test_quotas_hold_and_borrowers_are_preempted_by_the_lender(store: SqlStore) -> None:
    admission = Admissions(store, None, lease_s=60)
    two_queues(store, admission)
    red, blue = store, store.in_project("blue")
    first = admission.submit(red, "ann", False, "box", [ask(1, gpu=1), ask(2, gpu=1)])
    assert [a["state"] for a in first] == ["admitted", "admitted"]  # the second borrows
    third = admission.submit(red, "ann", False, "box", [ask(3, gpu=1)])
    assert third[0]["state"] == "pending"
    reason = third[0]["reason"]
    assert reason["resource"] == "gpu" and reason["missing"] == 1.0
    assert {h["id"] for h in reason["held_by"]} == {rid(1), rid(2)}
    guess = admission.what_if(blue, "bo", False, "box", ask(0, gpu=1))
    # another project's run is counted, never named
    assert guess["admitted"] and guess["preempted"] == [
        {"project": "default", "requests": {"cpu": 1.0, "gpu": 1.0}}
    ]
    assert admission.listing(red)[1]["state"] == "admitted"  # what-if changed nothing
    mine = admission.submit(blue, "bo", False, "box", [ask(4, gpu=1)])
    assert mine[0]["state"] == "admitted"
    told = admission.sync(red, [rid(1), rid(2), rid(3)], [])
    assert told["admitted"] == [rid(1)]
    assert told["preempt"] == [{"id": rid(2), "cause": "preempted by a run of project blue "
                                "(reclaim)"}]  # fmt: skip
    assert admission.sync(red, [rid(2)], [])["preempt"] == []  # told once
    # blue sees none of red's workloads; red cannot end blue's
    assert [w["id"] for w in admission.listing(blue)] == [rid(4)]
    admission.sync(red, [], [rid(4)])
    assert admission.explain(blue, rid(4))["state"] == "admitted"
    with pytest.raises(NotFoundError):
        admission.explain(blue, rid(1))


def test_what_cannot_ever_fit_is_refused_with_the_reason(store: SqlStore) -> None:
    admission = Admissions(store, None, lease_s=60)
    two_queues(store, admission)
    said = "3 is more than pool 'box' can give: 1 of its 2; the other queues hold 1"
    with pytest.raises(ValidationError, match=said):
        admission.set_queue(store, QueueRow("default", "box", {"gpu": 3000}))
    big = admission.submit(store, "ann", False, "box", [ask(1, gpu=3)])
    assert big[0]["state"] == "refused" and "at most 2 on pool 'box'" in big[0]["reason"]
    with pytest.raises(NotFoundError, match="no pool 'gone'"):
        admission.submit(store, "ann", False, "gone", [ask(2)])
    store.add_project("green", "root")
    with pytest.raises(ValidationError, match="project 'green' has no queue on pool 'box'"):
        admission.submit(store.in_project("green"), "ann", False, "box", [ask(2)])
    blue = store.in_project("blue")
    admission.submit(blue, "bo", False, "box", [ask(5)])
    admission.sync(blue, [], [rid(5)])
    # blue's run id, sent by another project, is that project's own: blue's row stays
    assert admission.submit(store, "ann", False, "box", [ask(5)])[0]["state"] == "admitted"
    assert admission.explain(blue, rid(5))["state"] == "finished"
    assert admission.explain(store, rid(5))["state"] == "admitted"


def test_a_lease_not_renewed_is_reclaimed(store: SqlStore) -> None:
    admission = Admissions(store, None, lease_s=0.5)
    two_queues(store, admission, gpu=1.0)
    blue = store.in_project("blue")
    admission.submit(store, "ann", False, "box", [ask(1, gpu=1)])  # its own and blue's
    waiting = admission.submit(store, "ann", False, "box", [ask(2, gpu=1)])
    assert waiting[0]["state"] == "pending"
    time.sleep(0.6)  # every lease has run out
    assert admission.sync(blue, [], [])["unknown"] == []
    assert admission.listing(store) == []
    gone = admission.explain(store, rid(1))
    assert gone["state"] == "finished" and "lease not renewed" in gone["cause"]


def test_a_restarted_server_keeps_every_decision(store: SqlStore) -> None:
    admission = Admissions(store, None, lease_s=60)
    two_queues(store, admission)
    admission.submit(store, "ann", False, "box", [ask(1, gpu=1), ask(2, gpu=1), ask(3, gpu=1)])
    before = {w["id"]: w["state"] for w in admission.listing(store)}
    assert before == {rid(1): "admitted", rid(2): "admitted", rid(3): "pending"}
    again = Admissions(store, None, lease_s=60)  # what a new server process loads
    assert {w["id"]: w["state"] for w in again.listing(store)} == before
    again.sync(store, [rid(2), rid(3)], [rid(1)])
    assert again.sync(store, [rid(2), rid(3)], [])["admitted"] == [rid(2), rid(3)]


def test_budgets_count_the_most_a_live_run_may_cost(store: SqlStore) -> None:
    prices = Prices(cpu_hour=3.6)  # one core for one second: $0.001
    admission = Admissions(store, prices, lease_s=60)
    two_queues(store, admission)
    with pytest.raises(ValidationError, match="no price table"):
        Admissions(store, None).set_budget(store, BudgetRow("default", "", 1.0))
    admission.set_budget(store, BudgetRow("default", "", 2.5, period="day"))
    ok = admission.submit(
        store, "ann", False, "box", [ask(1, timeout_s=1000), ask(2, timeout_s=1000)]
    )
    assert [a["state"] for a in ok] == ["admitted", "admitted"]  # $1 each at most
    over = admission.submit(store, "ann", False, "box", [ask(3, timeout_s=1000)])
    assert over[0]["state"] == "refused"
    assert "may cost up to $1" in over[0]["reason"] and "$0.5 of $2.5 per day" in over[0]["reason"]
    untimed = admission.submit(store, "ann", False, "box", [ask(4)])
    assert "give the function a timeout" in untimed[0]["reason"]
    admission.sync(store, [], [rid(1), rid(2)])  # they ended at once: cost about nothing
    assert admission.budgets(store)[0]["spent"] < 0.01
    assert admission.submit(store, "ann", False, "box", [ask(5, timeout_s=1000)])[0]["state"] == (
        "admitted")  # fmt: skip
    # another project's budget is its own
    blue = store.in_project("blue")
    assert admission.submit(blue, "bo", False, "box", [ask(6)])[0]["state"] == "admitted"


def test_agents_rank_below_humans_and_never_preempt_them(store: SqlStore) -> None:
    admission = Admissions(store, None, lease_s=60)
    two_queues(store, admission, gpu=1.0)
    blue = store.in_project("blue")
    admission.submit(store, "ann", False, "box", [ask(1, gpu=1), ask(2, gpu=1)])  # borrows
    bot = admission.submit(blue, "bot", True, "box", [ask(3, gpu=1, priority=100)])
    assert bot[0]["state"] == "pending"  # it may not reclaim from a human
    assert admission.explain(blue, rid(3))["priority"] == 100 - 1000


def test_budget_periods_start_where_people_count_them() -> None:
    now = 1_733_310_000.0  # 2024-12-04 11:00 UTC, a Wednesday
    assert time.gmtime(period_start("day", now))[:6] == (2024, 12, 4, 0, 0, 0)
    assert time.gmtime(period_start("week", now))[:6] == (2024, 12, 2, 0, 0, 0)
    assert time.gmtime(period_start("month", now))[:6] == (2024, 12, 1, 0, 0, 0)
    assert period_start("total", now) == 0.0


def test_a_batch_and_a_reused_id_never_overshoot_a_budget(store: SqlStore) -> None:
    admission = Admissions(store, Prices(cpu_hour=3.6), lease_s=60)
    two_queues(store, admission)
    admission.set_budget(store, BudgetRow("default", "", 1.0, period="total"))
    batch = admission.submit(store, "ann", False, "box",
                             [ask(i, timeout_s=1000) for i in range(1, 5)])  # fmt: skip
    assert [a["state"] for a in batch] == ["admitted", "refused", "refused", "refused"]
    admission.sync(store, [], [rid(1)])
    again = admission.submit(store, "ann", False, "box", [ask(1, cpu=0.001, timeout_s=1)])
    assert again[0] == {
        "id": rid(1),
        "state": "refused",
        "reason": "this run already ran to its end; a new run has a new id",
    }
    assert admission.explain(store, rid(1))["state"] == "finished"  # its row is kept
    with pytest.raises(NotFoundError, match="no principal 'ghost'"):
        admission.set_budget(store, BudgetRow("default", "ghost", 1.0))


def test_a_run_preempted_under_a_budget_asks_again_within_it(store: SqlStore) -> None:
    admission = Admissions(store, Prices(gpu_hour={"default": 3.6}), lease_s=60)  # $0.001/GPU-s
    two_queues(store, admission, gpu=1.0)
    blue = store.in_project("blue")
    admission.set_budget(store, BudgetRow("default", "", 0.15, period="total"))
    assert admission.submit(store, "ann", False, "box", [ask(1, cpu=0, gpu=1, timeout_s=100)])[
        0]["state"] == "admitted"  # borrowing blue's half; it may cost $0.10  # fmt: skip
    admission.submit(blue, "bo", False, "box", [ask(2, cpu=0, gpu=0.5)])  # reclaims it
    told = admission.sync(store, [rid(1)], [], running=[rid(1)])
    assert told["preempt"][0]["cause"] == "preempted by a run of project blue (reclaim)"
    assert told["unknown"] == []
    assert admission.listing(store) == []  # it ended: its next attempt asks again
    cost = admission.explain(store, rid(1))["cost"]
    again = admission.submit(store, "ann", False, "box", [ask(1, cpu=0, gpu=1, timeout_s=100)])
    assert again[0]["state"] == "pending"  # blue holds its half back
    mine = admission.explain(store, rid(1))
    assert mine["cost"] == cost and mine["max_cost"] == pytest.approx(cost + 0.1)
    other = admission.submit(store, "ann", False, "box", [ask(3, cpu=0, gpu=1, timeout_s=100)])
    assert other[0]["state"] == "refused"  # $0.10 more would be over $0.15
    assert "over project default's budget" in other[0]["reason"]


def test_a_run_that_runs_unadmitted_is_told_to_stop(store: SqlStore) -> None:
    """A preemption whose notice a restarted server never sent is sent again."""
    admission = Admissions(store, None, lease_s=60)
    two_queues(store, admission, gpu=1.0)
    admission.submit(store, "ann", False, "box", [ask(1, gpu=1)])
    admission.submit(store, "ann", False, "box", [ask(2, gpu=1, priority=5)])  # preempts 1
    restarted = Admissions(store, None, lease_s=60)
    told = restarted.sync(store, [rid(1), rid(2)], [], running=[rid(1), rid(2)])
    assert told["admitted"] == [rid(2)]
    assert told["preempt"] == [{"id": rid(1), "cause": "preempted by a run of project "
                                "default (priority)"}]  # fmt: skip


def test_pools_hold_their_queues_and_leases_lapse_unattended(store: SqlStore) -> None:
    admission = Admissions(store, None, lease_s=0.3)
    two_queues(store, admission)
    with pytest.raises(ValidationError, match="queues' nominal quotas hold 8: lower them"):
        admission.set_pool(store, PoolRow("box", {"cpu": 2000, "gpu": 2000}))
    tiny = admission.submit(store, "ann", False, "box", [ask(1, cpu=0.0001)])
    assert admission.explain(store, rid(1))["requests"] == {"cpu": 0.001}  # never free
    assert tiny[0]["state"] == "admitted"
    deadline = time.monotonic() + 30  # nobody calls: the server's own reaper reclaims it
    while admission.listing(store) and time.monotonic() < deadline:
        time.sleep(0.1)
    gone = admission.explain(store, rid(1))
    assert gone["state"] == "finished" and "lease not renewed" in gone["cause"]
    admission.close()
