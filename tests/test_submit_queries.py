"""What one submission costs the database, and that its cheaper answer says what describe_task says.

A class submits at once (100 a second), so every query on the submit path counts. These run
on SQLite and again on PostgreSQL (`-m postgres` with DATABASE_URL set).
"""

import json
import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone, translation

from comfyproxy import errors
from comfyproxy.models import ComfyInstance, QueueSettings, Task, TaskStatus
from comfyproxy.services import queue

pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("fast_password_hashing")]

WORKFLOW = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}}}
PORT = 8189


@pytest.fixture
def alice(student, register_instance):
    register_instance(student, PORT)
    return student


def submit_as_page(client, username="alice", port=PORT):
    return client.post(
        f"/comfyui/{username}/{port}/prompt",
        data=json.dumps({"prompt": WORKFLOW, "client_id": "page"}),
        content_type="application/json",
    )


def test_a_students_submission_reads_them_and_the_settings_once(alice, comfy_client_for):
    client = comfy_client_for(alice)
    assert submit_as_page(client).status_code == 200  # the instance's activity is now fresh
    with CaptureQueriesContext(connection) as captured:
        response = submit_as_page(client)
    assert response.status_code == 200
    statements = [query["sql"] for query in captured.captured_queries]
    assert sum('"auth_user"' in sql for sql in statements) == 1, statements
    assert sum("comfyproxy_queuesettings" in sql for sql in statements) == 1, statements
    assert not any(sql.startswith("UPDATE") for sql in statements), statements
    # session, user, settings, instance (locked), the student's active count, insert, the
    # reply's counts; plus BEGIN and COMMIT where the backend logs them (SQLite).
    assert len(statements) <= 9, statements
    assert response.json()["queue"]["position"] == 2


def test_a_teacher_submitting_for_a_student_queues_it_as_the_students(alice, teacher, comfy_client_for):
    response = submit_as_page(comfy_client_for(teacher, alice.comfy_instance))
    assert response.status_code == 200
    task = Task.objects.get(pk=response.json()["prompt_id"])
    assert (task.owner, task.submitted_by) == (alice, teacher)


def test_a_submission_refreshes_stale_activity_only(alice):
    stale = timezone.now() - queue.ACTIVITY_RESOLUTION - timedelta(seconds=5)
    ComfyInstance.objects.filter(user=alice).update(last_activity_at=stale)
    queue.submit_task(actor=alice, owner=alice, body={"prompt": WORKFLOW})
    refreshed = ComfyInstance.objects.get(user=alice).last_activity_at
    assert refreshed > stale

    recent = timezone.now() - queue.ACTIVITY_RESOLUTION + timedelta(seconds=10)
    ComfyInstance.objects.filter(user=alice).update(last_activity_at=recent)
    queue.submit_task(actor=alice, owner=alice, body={"prompt": WORKFLOW})
    assert ComfyInstance.objects.get(user=alice).last_activity_at == recent


def test_a_never_active_instance_is_marked_active_by_a_submission(alice):
    ComfyInstance.objects.filter(user=alice).update(last_activity_at=None)
    queue.submit_task(actor=alice, owner=alice, body={"prompt": WORKFLOW})
    assert ComfyInstance.objects.get(user=alice).last_activity_at is not None


def test_the_new_tasks_answer_is_describe_tasks_for_every_place_in_the_queue(
    make_student, make_task, queue_settings
):
    """Ties on queue_order, then on queued_at (including a whole second, which SQLite stores
    without a fraction), are ordered as queue_position orders them."""
    owner = make_student("dora")
    base = timezone.now().replace(microsecond=0) - timedelta(minutes=5)
    for status in (TaskStatus.PROCESSING, TaskStatus.PROCESSING, TaskStatus.COMPLETED, TaskStatus.FAILED):
        make_task(owner, status=status, queued_at=base - timedelta(minutes=1))
    queued = [make_task(owner, queued_at=base + timedelta(seconds=index)) for index in range(8)]
    # Same queue_order: the first two by queued_at (a whole second against a fraction of it),
    # the rest by id, whichever way their ids happen to sort.
    tied_order = queued[3].queue_order
    Task.objects.filter(pk=queued[2].pk).update(queue_order=tied_order, queued_at=base + timedelta(seconds=3))
    Task.objects.filter(pk=queued[3].pk).update(
        queue_order=tied_order, queued_at=base + timedelta(seconds=3, microseconds=1)
    )
    later = {"queue_order": tied_order + 1, "queued_at": base + timedelta(seconds=9)}
    Task.objects.filter(pk__in=[task.pk for task in queued[4:7]]).update(**later)

    for paused in (False, True):
        queue_settings.paused = paused
        queue_settings.max_concurrent_override = 3
        queue_settings.save()
        positions = []
        for task in Task.objects.all():
            expected = queue.describe_task(task)
            assert queue.describe_new_task(task, QueueSettings.load()) == expected
            positions.append(expected["position"])
        assert sorted(position for position in positions if position) == list(range(1, 9))


# --- The storability check: fast for real workflows, the same refusals as before --------------


def nested(depth: int, innermost, opener=list):
    """A value whose innermost item lies at `depth` inside the body (the body is depth 1)."""
    value = innermost
    for _ in range(depth - 4):
        value = [value] if opener is list else {"k": value}
    return {"prompt": {"1": {"inputs": value}}}  # body 1, prompt 2, node 3, inputs' value 4


def refusal_of(body) -> str | None:
    with translation.override("en"):
        try:
            queue.parse_submission(body)
        except errors.InvalidPrompt as error:
            return str(error.details)
    return None


@pytest.mark.parametrize("opener", [list, dict])
def test_nesting_up_to_the_limit_is_stored_and_one_deeper_is_refused(opener):
    limit = queue.MAX_JSON_DEPTH
    for innermost in (1, "text", [], {}):
        assert refusal_of(nested(limit, innermost, opener)) is None, innermost
    for innermost in (1, "text", []):
        assert refusal_of(nested(limit + 1, innermost, opener)) == "The workflow is nested too deeply."


@pytest.mark.parametrize(
    ("body", "refusal"),
    [
        ({"prompt": {"1": {"inputs": {"text": "a\x00b"}}}}, "The workflow contains a NUL character."),
        ({"prompt": {"1": {"in\x00puts": {}}}}, "The workflow contains a NUL character."),
        ({"prompt": {"1": {}}, "extra_data": {"x": ["ok", "\ud800"]}}, "not valid Unicode"),
        ({"prompt": {"1": {"\udfff": 1}}}, "not valid Unicode"),
        ({"prompt": {"1": {"inputs": {"text": "中文 ✓ \U0001f600"}}}}, None),
        ({"prompt": {"1": {"inputs": {"a": None, "b": True, "c": 1.5, "d": -3}}}}, None),
    ],
)
def test_text_no_database_or_utf8_takes_is_refused(body, refusal):
    found = refusal_of(body)
    if refusal is None:
        assert found is None
    else:
        assert found is not None
        assert refusal in found


# --- The per-student limit holds when a student's tabs submit at the same moment ---------------


@pytest.mark.django_db(transaction=True)
def test_simultaneous_submissions_never_pass_the_per_student_limit(make_student, register_instance):
    student = make_student("eve")
    register_instance(student, PORT)
    settings_row = QueueSettings.load()
    settings_row.max_queued_per_student = 1
    settings_row.save()
    tabs = 4
    barrier = threading.Barrier(tabs)
    outcomes = []

    def tab():
        try:
            barrier.wait(timeout=30)
            queue.submit_task(actor=student, owner=student, body={"prompt": WORKFLOW})
            outcomes.append("queued")
        except errors.TooManyTasks:
            outcomes.append("too_many_tasks")
        finally:
            connection.close()

    threads = [threading.Thread(target=tab) for _ in range(tabs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == ["queued"] + ["too_many_tasks"] * (tabs - 1)
    assert Task.objects.filter(owner=student).count() == 1
