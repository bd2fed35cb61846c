"""The scheduler's policy, unit- and property-tested: it is a pure state machine."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.compute.resources import Inventory, Resources
from kiln.compute.scheduler import MILLI, Allocation, Cancel, Release, Scheduler, Submit, Task
from kiln.errors import ValidationError

GiB = 2**30
MACHINE = Inventory(cpu=8, memory_bytes=32 * GiB, gpus=(0, 1, 2, 3))


def task(i: int | str, cpu: float = 1, mem: int = 0, gpu: float = 0, prio: int = 0) -> Task:
    return Task(str(i), Resources(cpu, mem, gpu), prio)


def test_admits_only_what_fits_then_more_as_tasks_end() -> None:
    s = Scheduler(Inventory(cpu=2, memory_bytes=GiB))
    assert [a.task_id for a in s.handle(Submit(task(1)))] == ["1"]
    assert [a.task_id for a in s.handle(Submit(task(2)))] == ["2"]
    assert s.handle(Submit(task(3))) == []
    assert s.queued == 1
    assert [a.task_id for a in s.handle(Release("1"))] == ["3"]


def test_fractional_gpus_pack_onto_one_device_best_fit() -> None:
    s = Scheduler(MACHINE)
    first = s.handle(Submit(task("a", gpu=0.5)))[0]
    second = s.handle(Submit(task("b", gpu=0.25)))[0]
    third = s.handle(Submit(task("c", gpu=0.25)))[0]
    assert {first.gpus[0][0], second.gpus[0][0], third.gpus[0][0]} == {0}
    assert s.free_gpu == [0, MILLI, MILLI, MILLI]
    assert third.cuda_visible_devices == "0"
    whole = s.handle(Submit(task("d", gpu=2)))[0]
    assert whole.cuda_visible_devices == "1,2"
    # best fit: a 0.25 goes to the device with the least room that still fits
    s.handle(Release("b"))
    s.handle(Submit(task("e", gpu=0.5)))  # device 3: 0.5 left
    assert s.handle(Submit(task("f", gpu=0.25)))[0].gpus == ((0, 250),)


def test_priority_then_fifo() -> None:
    s = Scheduler(Inventory(cpu=1, memory_bytes=GiB))
    s.handle(Submit(task("running")))
    for name, prio in [("low1", 0), ("high", 5), ("low2", 0)]:
        s.handle(Submit(task(name, prio=prio)))
    order = []
    current = "running"
    for _ in range(3):
        (nxt,) = s.handle(Release(current))
        order.append(nxt.task_id)
        current = nxt.task_id
    assert order == ["high", "low1", "low2"]


def test_a_large_request_is_not_starved_by_small_ones() -> None:
    s = Scheduler(Inventory(cpu=4, memory_bytes=GiB), max_bypass=3)
    for i in range(4):
        s.handle(Submit(task(f"small{i}")))
    s.handle(Submit(task("big", cpu=4)))
    for i in range(4, 100):
        s.handle(Submit(task(f"small{i}")))
    running = [f"small{i}" for i in range(4)]
    admitted: list[str] = []
    while "big" not in admitted:
        for a in s.handle(Release(running.pop(0))):
            admitted.append(a.task_id)
            running.append(a.task_id)
    assert admitted.index("big") <= 3  # at most max_bypass small tasks went first


def test_cancel_withdraws_a_queued_task_and_duplicates_are_refused() -> None:
    s = Scheduler(Inventory(cpu=1, memory_bytes=GiB))
    s.handle(Submit(task(1)))
    s.handle(Submit(task(2)))
    s.handle(Cancel("2"))
    assert s.handle(Release("1")) == [] and s.queued == 0
    s.handle(Submit(task(3)))
    s.handle(Submit(task(4)))
    for queued_or_running in ("3", "4"):
        with pytest.raises(ValueError, match="already"):
            s.handle(Submit(task(queued_or_running)))
    # once released, the same id may come back: that is how a retry is queued
    s.handle(Release("3"))
    assert s.handle(Submit(task(3))) == []


def test_a_request_larger_than_the_machine_is_refused_at_submit() -> None:
    s = Scheduler(MACHINE)
    with pytest.raises(ValidationError, match="gpu"):
        s.handle(Submit(task(1, gpu=5)))
    with pytest.raises(ValidationError, match="cpu"):
        s.handle(Submit(task(2, cpu=9)))


requests = st.builds(
    Resources,
    cpu=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    memory_bytes=st.sampled_from([0, GiB, 4 * GiB, 16 * GiB]),
    gpu=st.sampled_from([0.0, 0.25, 0.5, 1.0 / 3, 1.0, 2.0]),
)
actions = st.lists(
    st.tuples(st.sampled_from(["submit", "release", "cancel"]), requests, st.integers(0, 2)),
    max_size=120,
)


def check_capacity(s: Scheduler) -> None:
    assert 0 <= s.free_cpu <= MACHINE.cpu * MILLI
    assert 0 <= s.free_memory <= MACHINE.memory_bytes
    assert all(0 <= g <= MILLI for g in s.free_gpu)
    used_cpu = sum(a.cpu_milli for a in s.running.values())
    assert used_cpu + s.free_cpu == MACHINE.cpu * MILLI
    for index in range(len(MACHINE.gpus)):
        used = sum(share for a in s.running.values() for i, share in a.gpus if i == index)
        assert used + s.free_gpu[index] == MILLI


@settings(max_examples=150, deadline=None)
@given(actions)
def test_never_oversubscribed_never_twice_and_everything_ends(script: list) -> None:
    s = Scheduler(MACHINE, max_bypass=8)
    admitted: list[Allocation] = []
    submitted: set[str] = set()
    cancelled: set[str] = set()
    for n, (kind, request, pick) in enumerate(script):
        if kind == "submit":
            submitted.add(str(n))
            admitted += s.handle(Submit(Task(str(n), request, pick)))
        elif kind == "release" and s.running:
            admitted += s.handle(Release(sorted(s.running)[pick % len(s.running)]))
        elif kind == "cancel" and s._queued:
            victim = sorted(s._queued)[pick % len(s._queued)]
            cancelled.add(victim)
            s.handle(Cancel(victim))
        check_capacity(s)
    # drain: finish whatever runs; every queued task must get its turn
    while s.running:
        admitted += s.handle(Release(next(iter(s.running))))
        check_capacity(s)
    ids = [a.task_id for a in admitted]
    assert len(ids) == len(set(ids)), "a task was admitted twice"
    assert set(ids) == submitted - cancelled
    assert s.queued == 0 and s.free_cpu == MACHINE.cpu * MILLI


def test_a_cluster_request_must_fit_one_node() -> None:
    gpu_node = Inventory(cpu=2, memory_bytes=8 * 2**30, gpus=(0,))
    cpu_node = Inventory(cpu=8, memory_bytes=32 * 2**30)
    cluster = Inventory(cpu=10, memory_bytes=40 * 2**30, gpus=(0,), nodes=(gpu_node, cpu_node))
    cluster.check(Resources(cpu=8))
    cluster.check(Resources(cpu=2, gpu=1))
    with pytest.raises(ValidationError, match="cpu: 9 cores requested, the largest node has 8"):
        cluster.check(Resources(cpu=9))  # the totals have 10
    with pytest.raises(ValidationError, match="no single node has all") as info:
        cluster.check(Resources(cpu=4, gpu=1))  # each fits a node, not both together
    assert info.value.field == "cpu"
