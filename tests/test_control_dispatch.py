"""What a teacher changes in admin is what the dispatcher's next claim obeys: pause, cap, timeout."""

from datetime import timedelta

import pytest
from django.urls import reverse

from comfyproxy.services import dispatch, queue

pytestmark = [pytest.mark.usefixtures("fast_password_hashing"), pytest.mark.postgres]

WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}
}
PORT = 8189


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


def test_pausing_stops_the_next_claim_and_resuming_allows_it(admin_client, three_waiting, lease):
    board_action(admin_client, action="pause")
    assert claimed(lease) is None

    board_action(admin_client, action="resume")
    assert claimed(lease) == str(three_waiting[0].id)


def test_the_cap_set_live_bounds_the_next_claims(admin_client, three_waiting, lease):
    board_action(admin_client, action="set_cap", cap="1")
    assert claimed(lease) == str(three_waiting[0].id)
    assert claimed(lease) is None, "one runs, and the cap is one"

    save_settings(admin_client, max_concurrent_override=2)
    assert claimed(lease) == str(three_waiting[1].id)
    assert claimed(lease) is None


def test_a_lower_cap_lets_running_tasks_finish_and_starts_nothing_new(admin_client, three_waiting, lease):
    board_action(admin_client, action="set_cap", cap="3")
    assert claimed(lease) is not None
    assert claimed(lease) is not None

    board_action(admin_client, action="set_cap", cap="1")

    assert claimed(lease) is None
    assert queue.queue_overview().processing_count == 2


def test_the_run_timeout_set_in_admin_goes_with_the_next_claim(admin_client, three_waiting, lease):
    save_settings(admin_client, run_timeout_seconds=45)

    assert dispatch.claim_next_task(lease).run_timeout_seconds == 45


def test_a_task_moved_to_the_front_is_claimed_first(admin_client, three_waiting, lease):
    board_action(admin_client, action="move_to_front", task=str(three_waiting[2].id))

    assert claimed(lease) == str(three_waiting[2].id)
