"""The live queue's reads look tasks up by index, never by reading the class's history.

On SQLite a task's workflow and UI graph (tens of KB) spill into overflow pages, and the
columns stored after them (status, queue order, times) are reached only through those
pages: a statement that scans the task table reads every workflow ever submitted. With
300 waiting and 3,000 finished tasks of 60 kB each, the queue snapshot took 60 ms of CPU
that way (10-16 ms now), and a submission's counts 4.0 ms (0.15 ms):
`bench/dispatcher_cpu.py --extra-kb 60 --history 3000`. SQLite's own query plans show it.
"""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from comfyproxy.models import TaskStatus
from comfyproxy.services import broadcast
from comfyproxy.services import queue as queue_service

TASK_TABLE = "comfyproxy_task"


@pytest.fixture(autouse=True)
def _sqlite_only():
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's query plans")


@pytest.fixture
def class_with_history(make_student, make_task):
    alice, bob = make_student("alice"), make_student("bob")
    long_ago = timezone.now() - timedelta(days=1)
    for owner in (alice, bob):
        make_task(owner, status=TaskStatus.COMPLETED, queued_at=long_ago, finished_at=long_ago)
    make_task(alice, status=TaskStatus.PROCESSING)
    waiting = make_task(bob)
    make_task(alice, status=TaskStatus.FAILED)
    return alice, waiting


def plans_of(run) -> dict[str, list[str]]:
    """Each statement `run` executes on the task table, with SQLite's plan for it."""
    with CaptureQueriesContext(connection) as captured:
        run()
    plans = {}
    with connection.cursor() as cursor:
        for query in captured.captured_queries:
            if TASK_TABLE not in query["sql"]:
                continue
            cursor.execute("EXPLAIN QUERY PLAN " + query["sql"])
            plans[query["sql"]] = [row[3] for row in cursor.fetchall()]
    assert plans, "no statement read the task table"
    return plans


def assert_no_scan_of_tasks(plans: dict[str, list[str]]) -> None:
    for sql, steps in plans.items():
        scans = [step for step in steps if step.startswith(f"SCAN {TASK_TABLE}")]
        assert not scans, (steps, sql)


def test_the_queue_snapshot_reads_only_the_tasks_it_shows(class_with_history):
    snapshot = broadcast.read_queue_snapshot()
    assert snapshot.queue["queue_length"] == 1
    assert_no_scan_of_tasks(plans_of(broadcast.read_queue_snapshot))


def test_one_students_snapshot_reads_only_the_tasks_it_needs(class_with_history):
    alice, _waiting = class_with_history
    assert_no_scan_of_tasks(plans_of(lambda: broadcast.read_queue_snapshot(owner_id=alice.pk)))


def test_a_new_submissions_counts_come_from_an_index_alone(class_with_history):
    _alice, waiting = class_with_history
    assert queue_service._queue_counts(waiting) == (1, 1, 0, 0)
    (steps,) = plans_of(lambda: queue_service._queue_counts(waiting)).values()
    assert any("USING COVERING INDEX task_status_owner_order_idx" in step for step in steps), steps
