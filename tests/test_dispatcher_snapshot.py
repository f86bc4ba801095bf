"""The queue snapshot the dispatcher broadcasts (services.broadcast), against describe_task.

The snapshot describes tasks from plain rows with its own describer, for speed; every state
it shows must be exactly what `queue.describe_task` says of the same task. Runs on SQLite
and again on PostgreSQL (`-m postgres` with DATABASE_URL set).
"""

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from comfyproxy.models import QueueSettings, Task, TaskReason, TaskStatus
from comfyproxy.services import broadcast
from comfyproxy.services import queue as queue_service

pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("fast_password_hashing")]


@pytest.fixture
def every_state(make_student, make_task, queue_settings):
    """Three running tasks (one being cancelled), four waiting, and every way of ending."""
    queue_settings.max_concurrent_override = 5
    queue_settings.save()
    people = [make_student(f"s{index}") for index in range(4)]
    start = timezone.now() - timedelta(minutes=2)

    def at(seconds):
        return start + timedelta(seconds=seconds)

    make_task(people[0], status=TaskStatus.PROCESSING, queued_at=at(0))
    make_task(people[1], status=TaskStatus.PROCESSING, queued_at=at(1))
    stopping = make_task(people[2], status=TaskStatus.PROCESSING, queued_at=at(2))
    Task.objects.filter(pk=stopping.pk).update(
        cancel_requested_at=at(30), reason=TaskReason.CANCELLED_BY_TEACHER
    )
    for index in range(4):
        make_task(people[index], queued_at=at(10 + index))
    make_task(people[0], status=TaskStatus.COMPLETED, queued_at=at(3), finished_at=at(20))
    make_task(people[1], status=TaskStatus.CANCELLED, reason=TaskReason.CANCELLED_BY_OWNER, queued_at=at(4))
    failed = make_task(people[2], status=TaskStatus.FAILED, reason=TaskReason.VALIDATION, queued_at=at(5))
    Task.objects.filter(pk=failed.pk).update(
        error_message="ComfyUI 拒绝了工作流：节点 3 缺少输入",
        comfy_error={"type": "prompt_outputs_failed_validation", "message": "bad"},
        node_errors={"3": {"errors": [{"message": "Required input is missing"}]}},
    )
    make_task(people[3], status=TaskStatus.FAILED, reason=TaskReason.LOST, queued_at=at(6))
    # Ended before the window a snapshot shows.
    make_task(people[3], status=TaskStatus.COMPLETED, queued_at=at(0), finished_at=start - timedelta(hours=1))
    return people


def assert_described_as_describe_task(snapshot: broadcast.QueueSnapshot) -> list[dict]:
    overview = queue_service.QueueOverview(
        max_concurrent=snapshot.queue["max_concurrent"],
        processing_count=snapshot.queue["processing_count"],
        queue_length=snapshot.queue["queue_length"],
        paused=snapshot.queue["paused"],
    )
    states = [state for part in ("running", "waiting", "finished") for state in snapshot.board[part]]
    for state in states:
        task = Task.objects.select_related("owner").get(pk=state["task_id"])
        expected = queue_service.describe_task(
            task,
            overview=overview,
            position=queue_service.queue_position(task),
            run_seconds=snapshot.queue["typical_run_seconds"],
        )
        assert state == expected
    return states


def test_every_state_is_described_exactly_as_describe_task_does(every_state):
    snapshot = broadcast.read_queue_snapshot()

    states = assert_described_as_describe_task(snapshot)

    assert [state["status"] for state in states] == ["processing"] * 3 + ["queued"] * 4 + [
        "failed",
        "failed",
        "cancelled",
        "completed",
    ]
    assert [state["position"] for state in snapshot.board["waiting"]] == [1, 2, 3, 4]
    # Two free slots: the first two waiting start now, the others wait.
    waiting = [state["message"] for state in snapshot.board["waiting"]]
    assert waiting[0] == waiting[1]
    assert len(set(waiting)) == 3
    assert snapshot.board["running"][2]["message"] != snapshot.board["running"][0]["message"]
    assert snapshot.board["finished"][1]["message"] == "ComfyUI 拒绝了工作流：节点 3 缺少输入"
    assert snapshot.board["finished"][1]["node_errors"] == {
        "3": {"errors": [{"message": "Required input is missing"}]}
    }


def test_a_paused_queue_is_described_as_describe_task_does(every_state):
    QueueSettings.objects.filter(pk=1).update(paused=True)

    snapshot = broadcast.read_queue_snapshot()

    assert_described_as_describe_task(snapshot)
    assert snapshot.queue["paused"] is True


def test_each_owner_sees_their_own_tasks_in_the_same_states_as_the_board(every_state):
    snapshot = broadcast.read_queue_snapshot()
    by_id = {state["task_id"]: state for part in snapshot.board.values() for state in part}

    for person in every_state:
        mine = snapshot.tasks_by_owner[person.pk]
        assert {state["username"] for state in mine} == {person.username}
        assert all(by_id[state["task_id"]] == state for state in mine)
        own = broadcast.read_queue_snapshot(owner_id=person.pk)
        assert own.tasks_by_owner == {person.pk: mine}
        assert own.board is None


def test_the_rendered_event_is_the_snapshot_as_json(every_state):
    snapshot = broadcast.read_queue_snapshot()

    events = broadcast.snapshot_events(snapshot)

    owners, teachers = events[broadcast.OWNERS_GROUP], events[broadcast.TEACHERS_GROUP]
    for owner, tasks in snapshot.tasks_by_owner.items():
        assert owners["tasks"][str(owner)] == broadcast._rendered(tasks)
    assert teachers["board"] == broadcast._rendered(snapshot.board)
    assert json.loads(teachers["board"]) == json.loads(json.dumps(snapshot.board, default=str))
