"""What a teacher changes in admin is what the dispatcher does next: pause, cap, timeout, order.

First against the dispatcher's claim step, then against the running dispatcher and the
ComfyUI emulator, whose own count of runs at once is the judge.
"""

import itertools
from datetime import timedelta

import pytest
from django.urls import reverse

from comfyproxy.emulator.data import load_workflow
from comfyproxy.models import TERMINAL_STATUSES, Task, TaskStatus
from comfyproxy.services import dispatch, queue
from tests.processes import wait_until

pytestmark = pytest.mark.usefixtures("fast_password_hashing")

WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}
}
PORT = 8189
COLOURS = itertools.count(1)


@pytest.fixture
def three_waiting(make_student, register_instance, queue_settings):
    """Three students, each with a running instance and one task, in this order."""
    tasks = []
    for offset in range(3):
        student = make_student()
        register_instance(student, PORT + offset)
        tasks.append(queue.submit_task(actor=student, owner=student, body={"prompt": WORKFLOW}))
    return tasks


@pytest.fixture
def lease(db):
    return dispatch.acquire_lease(dispatch.new_holder_name(), timedelta(seconds=30))


@pytest.fixture
def admin_client(teacher, client_for):
    return client_for(teacher)


def board_action(client, **data):
    response = client.post(reverse("admin:comfyproxy_board_act"), data)
    assert response.status_code == 303


def save_settings(client, **values):
    form = {
        "max_concurrent_override": "",
        "max_queued_per_student": "",
        "run_timeout_seconds": "",
        "idle_stop_minutes": "0",
    }
    form.update({key: str(value) for key, value in values.items()})
    response = client.post(reverse("admin:comfyproxy_queuesettings_change", args=[1]), form)
    assert response.status_code == 302, response.content


def claimed(lease) -> str | None:
    assignment = dispatch.claim_next_task(lease)
    return None if assignment is None else str(assignment.task.id)


@pytest.mark.postgres
def test_pausing_stops_the_next_claim_and_resuming_allows_it(admin_client, three_waiting, lease):
    board_action(admin_client, action="pause")
    assert claimed(lease) is None

    board_action(admin_client, action="resume")
    assert claimed(lease) == str(three_waiting[0].id)


@pytest.mark.postgres
def test_the_cap_set_live_bounds_the_next_claims(admin_client, three_waiting, lease):
    board_action(admin_client, action="set_cap", cap="1")
    assert claimed(lease) == str(three_waiting[0].id)
    assert claimed(lease) is None, "one runs, and the cap is one"

    save_settings(admin_client, max_concurrent_override=2)
    assert claimed(lease) == str(three_waiting[1].id)
    assert claimed(lease) is None


@pytest.mark.postgres
def test_a_lower_cap_lets_running_tasks_finish_and_starts_nothing_new(admin_client, three_waiting, lease):
    board_action(admin_client, action="set_cap", cap="3")
    assert claimed(lease) is not None
    assert claimed(lease) is not None

    board_action(admin_client, action="set_cap", cap="1")

    assert claimed(lease) is None
    assert queue.queue_overview().processing_count == 2


@pytest.mark.postgres
def test_the_run_timeout_set_in_admin_goes_with_the_next_claim(admin_client, three_waiting, lease):
    save_settings(admin_client, run_timeout_seconds=45)

    assert dispatch.claim_next_task(lease).run_timeout_seconds == 45


@pytest.mark.postgres
def test_a_task_moved_to_the_front_is_claimed_first(admin_client, three_waiting, lease):
    board_action(admin_client, action="move_to_front", task=str(three_waiting[2].id))

    assert claimed(lease) == str(three_waiting[2].id)


# --- Against the running dispatcher and the emulator --------------------------------------------


def submitted(task: Task) -> bool:
    return Task.objects.filter(pk=task.pk, submitted_at__isnull=False).exists()


def wait_until_finished(tasks, timeout: float = 60) -> None:
    ids = [task.pk for task in tasks]
    wait_until(
        lambda: not Task.objects.filter(pk__in=ids).exclude(status__in=TERMINAL_STATUSES).exists(),
        timeout=timeout,
        message="every task to finish",
    )


def submit_each(students) -> list[Task]:
    tasks = []
    for student in students:
        graph = load_workflow("basic_invert")
        # A colour of its own, so that ComfyUI's cache never skips the run.
        graph["1"]["inputs"]["color"] = next(COLOURS)
        tasks.append(queue.submit_task(actor=student, owner=student, body={"prompt": graph}))
    return tasks


@pytest.mark.django_db(transaction=True)
def test_the_board_pauses_and_the_settings_page_raises_the_cap_of_a_running_dispatcher(
    classroom, start_dispatcher, admin_client
):
    emulator, students = classroom(3, job_seconds=1.0)
    board_action(admin_client, action="set_cap", cap="1")
    board_action(admin_client, action="pause")
    dispatcher = start_dispatcher()
    tasks = submit_each(students)
    assert dispatcher.run_step(dispatcher.dispatcher.dispatch_step) == 0, "paused: nothing starts"
    assert emulator.stats()["submissions"] == {}

    board_action(admin_client, action="resume")
    wait_until(lambda: submitted(tasks[0]), timeout=20, message="the first task to start")
    assert dispatcher.run_step(dispatcher.dispatcher.dispatch_step) == 0, "the cap of one is full"
    assert not submitted(tasks[1])

    save_settings(admin_client, max_concurrent_override=3)
    wait_until(lambda: submitted(tasks[1]) and submitted(tasks[2]), timeout=20, message="the others to start")
    assert Task.objects.get(pk=tasks[0].pk).status == TaskStatus.PROCESSING, "they run beside the first"
    wait_until_finished(tasks)
    assert emulator.stats()["max_running_seen"] == 3


@pytest.mark.django_db(transaction=True)
def test_a_cap_lowered_in_admin_holds_once_the_running_tasks_finish(
    classroom, start_dispatcher, admin_client
):
    emulator, students = classroom(4, job_seconds=0.5)
    board_action(admin_client, action="set_cap", cap="2")
    start_dispatcher()
    first_two = submit_each(students[:2])
    wait_until(lambda: all(submitted(task) for task in first_two), timeout=20, message="two to start")

    board_action(admin_client, action="set_cap", cap="1")
    wait_until_finished(first_two)
    emulator.reset_stats()
    wait_until_finished(submit_each(students[2:]))

    assert emulator.stats()["max_running_seen"] == 1
