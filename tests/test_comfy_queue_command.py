"""`manage.py comfy_queue`: the operator's view of the queue and the changes it makes."""

import getpass
import io
import json

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from comfyproxy.models import AuditEvent, QueueSettings, Task, TaskStatus

pytestmark = [pytest.mark.usefixtures("fast_password_hashing"), pytest.mark.postgres]


def comfy_queue(*args) -> str:
    out = io.StringIO()
    call_command("comfy_queue", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def busy_queue(student, other_student, make_student, make_task, queue_settings):
    """One running, three waiting (bob twice), one failed; the cap is 2."""
    queue_settings.max_concurrent_override = 2
    queue_settings.save()
    carol = make_student("carol")
    return {
        "running": make_task(student, status=TaskStatus.PROCESSING),
        "waiting": [make_task(other_student), make_task(carol), make_task(other_student)],
        "failed": make_task(carol, status=TaskStatus.FAILED, reason="timeout"),
    }


def test_status_gives_the_monitor_numbers(busy_queue):
    assert json.loads(comfy_queue("status", "--json")) == {
        "queue_length": 3,
        "processing_count": 1,
        "max_concurrent": 2,
        "available_slots": 1,
        "paused": False,
    }
    table = comfy_queue("status")
    assert "queue_length      3" in table
    assert "available_slots   1" in table


def test_list_shows_running_then_the_queue_in_order(busy_queue):
    rows = json.loads(comfy_queue("list", "--json"))

    assert [(row["username"], row["status"], row["position"]) for row in rows] == [
        ("alice", "processing", 0),
        ("bob", "queued", 1),
        ("carol", "queued", 2),
        ("bob", "queued", 3),
    ]
    table = comfy_queue("list").splitlines()
    assert table[0].split() == [
        "POSITION",
        "TASK",
        "STUDENT",
        "STATUS",
        "PORT",
        "WAITED_S",
        "RUNNING_S",
        "REASON",
    ]
    assert str(busy_queue["waiting"][0].id)[:8] in table[2]


def test_list_by_status_and_limit(busy_queue):
    failed = json.loads(comfy_queue("list", "--status", "failed", "--json"))
    assert [row["task_id"] for row in failed] == [str(busy_queue["failed"].id)]
    assert failed[0]["reason"] == "timeout"
    assert len(json.loads(comfy_queue("list", "--limit", "2", "--json"))) == 2
    assert comfy_queue("list", "--status", "cancelled") == "no tasks\n"


def test_cancel_by_id_and_by_short_id(busy_queue):
    first, second, _third = busy_queue["waiting"]

    result = json.loads(comfy_queue("cancel", str(first.id), str(second.id)[:8], "--json"))

    assert result["action"] == "cancel"
    assert result["affected"] == 2
    assert Task.objects.get(pk=first.pk).status == TaskStatus.CANCELLED
    assert Task.objects.get(pk=second.pk).status == TaskStatus.CANCELLED
    event = AuditEvent.objects.get()
    assert event.actor is None
    assert event.actor_name == f"console:{getpass.getuser()}"


def test_cancel_every_task_of_one_student(busy_queue, other_student):
    comfy_queue("cancel", "--user", "bob")

    assert not Task.objects.active().filter(owner=other_student).exists()
    assert Task.objects.queued().count() == 1


def test_cancel_everything_waiting_leaves_running_tasks_alone(busy_queue):
    message = comfy_queue("cancel", "--all-waiting")

    assert "3" in message
    assert Task.objects.queued().count() == 0
    assert Task.objects.get(pk=busy_queue["running"].pk).cancel_requested_at is None


def test_pause_resume_and_set_cap_change_the_live_settings(busy_queue):
    comfy_queue("pause")
    assert QueueSettings.load().paused
    assert json.loads(comfy_queue("status", "--json"))["paused"] is True
    comfy_queue("resume")
    assert not QueueSettings.load().paused
    comfy_queue("set-cap", "5")
    assert QueueSettings.load().max_concurrent == 5
    comfy_queue("set-cap", "default")
    assert QueueSettings.load().max_concurrent_override is None
    assert AuditEvent.objects.count() == 4


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["cancel", "zzz"], "is not a task id"),
        (["cancel", "00000000-0000-0000-0000-000000000000"], "no task"),
        (["cancel", "ffffffff"], "no task"),
        (["cancel", "--user", "nobody"], "user_not_found"),
        (["set-cap", "many"], "whole number"),
        (["set-cap", "0"], "invalid_setting"),
        (["list", "--limit", "0"], "--limit"),
    ],
)
def test_bad_input_is_a_clear_command_error(busy_queue, args, complaint):
    with pytest.raises(CommandError, match=complaint):
        comfy_queue(*args)
    assert not AuditEvent.objects.exists()
