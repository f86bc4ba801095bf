"""A student's second workflow waits for their first (one run at a time on their ComfyUI):
with slots free it must say so, not "starting now". On SQLite and PostgreSQL."""

import json
import math

import pytest
from django.utils import timezone

from comfyproxy.models import Task, TaskStatus
from comfyproxy.services import broadcast
from comfyproxy.services import queue as queue_service

pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("fast_password_hashing")]

WORKFLOW = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}}}
AFTER_OWN_RUN = "你的上一个任务还在运行，本任务会在它之后开始。"
STARTING = "即将开始"


@pytest.fixture
def class_with_free_slots(make_student, register_instance, queue_settings):
    queue_settings.max_concurrent_override = 3
    queue_settings.save()
    alice, bob = make_student("alice"), make_student("bob")
    register_instance(alice, 8189)
    register_instance(bob, 8190)
    return alice, bob


def submit_as_page(client, user, port):
    return client.post(
        f"/comfyui/{user.username}/{port}/prompt",
        data=json.dumps({"prompt": WORKFLOW, "client_id": "page"}),
        content_type="application/json",
    )


def test_the_reply_says_a_second_workflow_waits_for_the_first(
    class_with_free_slots, make_task, comfy_client_for
):
    alice, bob = class_with_free_slots
    make_task(alice, status=TaskStatus.PROCESSING)

    own = submit_as_page(comfy_client_for(alice), alice, 8189).json()["queue"]
    other = submit_as_page(comfy_client_for(bob), bob, 8190).json()["queue"]

    assert (own["position"], own["message"]) == (1, AFTER_OWN_RUN)
    assert (other["position"], other["message"]) == (2, STARTING)
    # Starting now waits for nothing; after one's own run, for about a run.
    assert other["estimated_wait_seconds"] == 0
    assert own["estimated_wait_seconds"] == math.ceil(queue_service.typical_run_seconds()) > 0


def test_status_and_the_snapshot_say_the_same(class_with_free_slots, make_task, client_for):
    alice, bob = class_with_free_slots
    make_task(alice, status=TaskStatus.PROCESSING)
    waiting_own = make_task(alice)
    waiting_other = make_task(bob)

    status = client_for(alice).get(f"/api/v1/comfy_proxy/status/{waiting_own.id}").json()
    assert (status["after_own_run"], status["message"]) == (True, AFTER_OWN_RUN)
    assert queue_service.describe_task(waiting_other)["after_own_run"] is False

    snapshot = broadcast.read_queue_snapshot()
    waiting = {state["task_id"]: state for state in snapshot.board["waiting"]}
    assert waiting[str(waiting_own.id)]["message"] == AFTER_OWN_RUN
    assert waiting[str(waiting_other.id)]["message"] == STARTING
    # A reconnecting student's own snapshot reads only their tasks, and still knows.
    (own_state,) = [
        state
        for state in broadcast.read_queue_snapshot(owner_id=alice.pk).tasks_by_owner[alice.pk]
        if state["status"] == TaskStatus.QUEUED
    ]
    assert own_state["after_own_run"] is True


def test_once_the_first_run_ends_the_second_is_starting(class_with_free_slots, make_task):
    alice, _bob = class_with_free_slots
    first = make_task(alice, status=TaskStatus.PROCESSING)
    second = make_task(alice)
    assert queue_service.describe_task(second)["message"] == AFTER_OWN_RUN

    Task.objects.filter(pk=first.pk).update(status=TaskStatus.COMPLETED, finished_at=timezone.now())

    assert queue_service.describe_task(second)["message"] == STARTING


@pytest.mark.parametrize(
    ("position", "free_slots", "after_own_run", "runs"),
    [
        (1, 2, False, 0),  # a slot is free: it starts now
        (2, 2, False, 0),
        (2, 2, True, 1),  # a slot is free, but its owner's run goes first
        (3, 2, False, 1),  # one slot must free up
        (12, 2, False, 1),  # ten slots must free up: one round of the cap
        (13, 2, False, 2),
        (10, 0, False, 1),
        (11, 0, False, 2),
    ],
)
def test_the_wait_estimate_counts_rounds_of_runs_beyond_the_free_slots(
    position, free_slots, after_own_run, runs
):
    estimate = queue_service.estimated_wait_seconds(
        position, 10, 30.0, free_slots=free_slots, after_own_run=after_own_run
    )
    assert estimate == runs * 30
