"""The teacher's console in admin: every page and action opens for staff, none for students."""

import json
import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from comfyproxy.models import AuditEvent, QueueSettings, Task, TaskReason, TaskStatus
from comfyproxy.services import control

pytestmark = pytest.mark.usefixtures("fast_password_hashing")

PORT = 8189


@pytest.fixture
def classroom(student, other_student, register_instance, make_task):
    """Two students with an instance each and tasks in every state."""
    alice, bob = student, other_student
    register_instance(alice, PORT)
    register_instance(bob, PORT + 1)
    return {
        "running": make_task(alice, status=TaskStatus.PROCESSING),
        "waiting": make_task(bob),
        "failed": make_task(alice, status=TaskStatus.FAILED, reason=TaskReason.TIMEOUT),
        "completed": make_task(bob, status=TaskStatus.COMPLETED),
    }


def admin_pages(tasks) -> list[str]:
    task = tasks["running"]
    instance = task.owner.comfy_instance
    today = timezone.localdate()
    return [
        reverse("admin:index"),
        reverse("admin:app_list", args=["comfyproxy"]),
        reverse("admin:comfyproxy_task_changelist"),
        reverse("admin:comfyproxy_task_changelist") + "?status__exact=queued",
        reverse("admin:comfyproxy_task_changelist") + "?q=alice",
        reverse("admin:comfyproxy_task_changelist") + f"?owner__id__exact={task.owner_id}",
        reverse("admin:comfyproxy_task_changelist")
        + f"?queued_at__year={today.year}&queued_at__month={today.month}"
        f"&queued_at__day={today.day}",
        reverse("admin:comfyproxy_task_change", args=[task.pk]),
        reverse("admin:comfyproxy_comfyinstance_changelist"),
        reverse("admin:comfyproxy_comfyinstance_changelist") + "?state__exact=running",
        reverse("admin:comfyproxy_comfyinstance_change", args=[instance.pk]),
        reverse("admin:comfyproxy_queuesettings_change", args=[1]),
        reverse("admin:comfyproxy_auditevent_changelist"),
        reverse("admin:comfyproxy_board"),
        reverse("admin:comfyproxy_usage"),
        reverse("admin:comfyproxy_usage_csv"),
    ]


def test_every_console_page_opens_for_a_teacher(teacher, client_for, classroom, queue_settings):
    control.pause_queue(actor=teacher)
    client = client_for(teacher)
    event = AuditEvent.objects.get()

    for url in [*admin_pages(classroom), reverse("admin:comfyproxy_auditevent_change", args=[event.pk])]:
        response = client.get(url)
        assert response.status_code == 200, url


def test_no_console_page_opens_for_a_student(student, client_for, classroom, queue_settings):
    client = client_for(student)

    for url in admin_pages(classroom):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("admin:login")), url


def test_the_settings_list_opens_the_single_settings_row(teacher, client_for):
    response = client_for(teacher).get(reverse("admin:comfyproxy_queuesettings_changelist"))

    assert response.status_code == 302
    assert response["Location"] == reverse("admin:comfyproxy_queuesettings_change", args=[1])


def test_the_admin_index_links_to_the_board_and_the_usage_page(teacher, client_for):
    page = client_for(teacher).get(reverse("admin:index")).content.decode()

    assert reverse("admin:comfyproxy_board") in page
    assert reverse("admin:comfyproxy_usage") in page


def test_staff_without_permissions_sees_neither_board_nor_usage(client_for, classroom):
    assistant = get_user_model().objects.create_user("assistant", is_staff=True)
    client = client_for(assistant)

    assert client.get(reverse("admin:comfyproxy_board")).status_code == 403
    assert client.get(reverse("admin:comfyproxy_usage")).status_code == 403
    response = client.post(reverse("admin:comfyproxy_board_act"), {"action": "pause"})
    assert response.status_code == 403
    assert not QueueSettings.load().paused


def test_a_teacher_with_view_permission_only_cannot_act(client_for, classroom):
    viewer = get_user_model().objects.create_user("viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_task"))
    client = client_for(viewer)

    assert client.get(reverse("admin:comfyproxy_board")).status_code == 200
    response = client.post(
        reverse("admin:comfyproxy_board_act"), {"action": "cancel", "task": str(classroom["waiting"].pk)}
    )
    assert response.status_code == 403
    assert Task.objects.get(pk=classroom["waiting"].pk).status == TaskStatus.QUEUED


def test_the_day_filter_shows_one_class_day(teacher, client_for, student, make_task):
    today = make_task(student)
    yesterday = make_task(student, queued_at=timezone.now() - timedelta(days=1))
    client = client_for(teacher)
    url = reverse("admin:comfyproxy_task_changelist")

    shown = client.get(url, {"day": timezone.localdate().isoformat()}).context["cl"].result_list
    assert list(shown) == [today]
    earlier = (timezone.localdate() - timedelta(days=1)).isoformat()
    assert list(client.get(url, {"day": earlier}).context["cl"].result_list) == [yesterday]


def test_a_malformed_day_is_not_an_error(teacher, client_for):
    response = client_for(teacher).get(reverse("admin:comfyproxy_task_changelist"), {"day": "last tuesday"})

    assert response.status_code == 302
    assert response["Location"].endswith("?e=1")


# --- Actions on the task list -----------------------------------------------------------------


def run_action(client, action: str, *tasks: Task):
    return client.post(
        reverse("admin:comfyproxy_task_changelist"),
        {"action": action, "_selected_action": [str(task.pk) for task in tasks]},
        follow=True,
    )


def shown_messages(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def test_cancel_action_reports_what_it_did_and_records_it(teacher, client_for, classroom):
    response = run_action(
        client_for(teacher), "cancel_selected", classroom["waiting"], classroom["completed"]
    )

    assert response.status_code == 200
    assert Task.objects.get(pk=classroom["waiting"].pk).status == TaskStatus.CANCELLED
    event = AuditEvent.objects.get()
    assert (event.actor, event.action, event.affected) == (teacher, "cancel", 1)
    assert shown_messages(response) == [event.summary]


def test_interrupt_action_flags_the_running_task(teacher, client_for, classroom):
    run_action(client_for(teacher), "interrupt_selected", classroom["running"])

    assert Task.objects.get(pk=classroom["running"].pk).cancel_requested_at is not None


def test_retry_action_queues_the_failed_task_again(teacher, client_for, classroom):
    run_action(client_for(teacher), "retry_selected", classroom["failed"])

    retried = Task.objects.filter(owner=classroom["failed"].owner, status=TaskStatus.QUEUED).get()
    assert retried.prompt == classroom["failed"].prompt
    assert retried.submitted_by == teacher


def test_move_to_front_action_puts_the_task_first(teacher, client_for, classroom, make_task):
    later = make_task(classroom["running"].owner)

    run_action(client_for(teacher), "move_selected_to_front", later)

    assert Task.objects.queued().in_queue_order().first() == later


def test_a_student_cannot_run_admin_actions(student, client_for, classroom):
    response = run_action(client_for(student), "cancel_selected", classroom["waiting"])

    assert response.redirect_chain[0][0].startswith(reverse("admin:login"))
    assert Task.objects.get(pk=classroom["waiting"].pk).status == TaskStatus.QUEUED


def test_task_pages_are_read_only(teacher, client_for, classroom):
    client = client_for(teacher)
    task = classroom["waiting"]

    page = client.get(reverse("admin:comfyproxy_task_change", args=[task.pk])).content.decode()
    assert 'name="status"' not in page
    response = client.post(reverse("admin:comfyproxy_task_change", args=[task.pk]), {"status": "completed"})
    assert response.status_code == 403
    assert client.get(reverse("admin:comfyproxy_task_add")).status_code == 403
    assert client.get(reverse("admin:comfyproxy_task_delete", args=[task.pk])).status_code == 403
    assert Task.objects.get(pk=task.pk).status == TaskStatus.QUEUED


# --- Lists without N+1 queries ------------------------------------------------------------------

# Session, user, two counts, the page (owners joined), the student filter's choices.
# Per-row queries would make it grow with the tasks shown.
TASK_LIST_QUERIES = 6
# Session, user, two counts, the page (users joined, active tasks counted), the launcher filter.
INSTANCE_LIST_QUERIES = 6
# Session, user, two counts, the page (actors joined), the date hierarchy (2), the action filter.
AUDIT_LIST_QUERIES = 8


def test_the_task_list_costs_the_same_queries_for_3_or_30_tasks(
    teacher, client_for, make_student, make_task, django_assert_num_queries
):
    client = client_for(teacher)
    url = reverse("admin:comfyproxy_task_changelist")
    students = [make_student() for _ in range(3)]
    for student in students:
        make_task(student, status=TaskStatus.PROCESSING)
    with django_assert_num_queries(TASK_LIST_QUERIES):
        assert client.get(url).status_code == 200

    for index in range(27):
        make_task(students[index % 3] if index % 2 else make_student())
    with django_assert_num_queries(TASK_LIST_QUERIES):
        assert client.get(url).status_code == 200


def test_the_instance_list_costs_the_same_queries_for_2_or_20_instances(
    teacher, client_for, make_student, register_instance, make_task, django_assert_num_queries
):
    client = client_for(teacher)
    url = reverse("admin:comfyproxy_comfyinstance_changelist")
    for offset in range(2):
        register_instance(make_student(), PORT + offset)
    with django_assert_num_queries(INSTANCE_LIST_QUERIES):
        assert client.get(url).status_code == 200

    for offset in range(2, 20):
        student = make_student()
        register_instance(student, PORT + offset)
        make_task(student)
    with django_assert_num_queries(INSTANCE_LIST_QUERIES):
        assert client.get(url).status_code == 200


def test_the_audit_list_costs_the_same_queries_for_1_or_10_events(
    teacher, client_for, make_task, student, django_assert_num_queries
):
    client = client_for(teacher)
    url = reverse("admin:comfyproxy_auditevent_changelist")
    control.pause_queue(actor=teacher)
    with django_assert_num_queries(AUDIT_LIST_QUERIES):
        assert client.get(url).status_code == 200

    for _ in range(9):
        control.cancel_tasks(actor=teacher, tasks=[make_task(student)])
    with django_assert_num_queries(AUDIT_LIST_QUERIES):
        assert client.get(url).status_code == 200


# --- Settings through admin ---------------------------------------------------------------------


def settings_form(**changes) -> dict:
    form = {
        "max_concurrent_override": "",
        "max_queued_per_student": "",
        "run_timeout_seconds": "",
        "idle_stop_minutes": "0",
    }
    form.update({key: str(value) for key, value in changes.items()})
    return {key: value for key, value in form.items() if value != "False"}


def test_saving_settings_goes_through_the_service(teacher, client_for, queue_settings):
    response = client_for(teacher).post(
        reverse("admin:comfyproxy_queuesettings_change", args=[1]),
        settings_form(max_concurrent_override=4, paused="on"),
        follow=True,
    )

    assert response.status_code == 200
    loaded = QueueSettings.load()
    assert (loaded.max_concurrent, loaded.paused, loaded.updated_by) == (4, True, teacher)
    event = AuditEvent.objects.get()
    assert (event.action, event.affected) == ("settings", 2)
    assert shown_messages(response) == [event.summary]


def test_a_bad_setting_is_shown_beside_its_field_and_not_saved(teacher, client_for, queue_settings):
    response = client_for(teacher).post(
        reverse("admin:comfyproxy_queuesettings_change", args=[1]), settings_form(max_concurrent_override=0)
    )

    assert response.status_code == 200
    assert response.context["adminform"].form.errors["max_concurrent_override"]
    assert QueueSettings.load().max_concurrent_override is None
    assert not AuditEvent.objects.exists()


# --- The live board's page and buttons ----------------------------------------------------------


def board_config(response) -> dict:
    match = re.search(
        r'<script id="comfy-board-config" type="application/json">(.*?)</script>',
        response.content.decode(),
        re.S,
    )
    return json.loads(match.group(1))


def test_the_board_page_starts_from_the_teacher_frame(teacher, client_for, classroom):
    config = board_config(client_for(teacher).get(reverse("admin:comfyproxy_board")))

    frame = config["initial"]
    assert frame["type"] == "queue"
    assert [task["task_id"] for task in frame["board"]["running"]] == [str(classroom["running"].pk)]
    assert [task["task_id"] for task in frame["board"]["waiting"]] == [str(classroom["waiting"].pk)]
    assert frame["queue"]["processing_count"] == 1
    assert config["socketPath"] == "/ws/comfy_proxy/queue/"
    assert config["canAct"] is True


def post_board(client, **data):
    return client.post(reverse("admin:comfyproxy_board_act"), data, follow=True)


def test_board_buttons_pause_resume_and_set_the_cap(teacher, client_for, queue_settings):
    client = client_for(teacher)

    response = post_board(client, action="pause")
    assert response.redirect_chain == [(reverse("admin:comfyproxy_board"), 303)]
    assert QueueSettings.load().paused
    post_board(client, action="resume")
    assert not QueueSettings.load().paused
    post_board(client, action="set_cap", cap="3")
    assert QueueSettings.load().max_concurrent == 3
    post_board(client, action="set_cap", cap="")
    assert QueueSettings.load().max_concurrent_override is None
    assert AuditEvent.objects.count() == 4


def test_board_buttons_act_on_one_task(teacher, client_for, classroom):
    client = client_for(teacher)

    post_board(client, action="interrupt", task=str(classroom["running"].pk))
    post_board(client, action="cancel", task=str(classroom["waiting"].pk))

    assert Task.objects.get(pk=classroom["running"].pk).cancel_requested_at is not None
    assert Task.objects.get(pk=classroom["waiting"].pk).status == TaskStatus.CANCELLED


@pytest.mark.parametrize(
    "data",
    [
        {"action": "explode"},
        {"action": "cancel"},
        {"action": "cancel", "task": "not-a-uuid"},
        {"action": "cancel", "task": "00000000-0000-0000-0000-000000000000"},
        {"action": "set_cap", "cap": "0"},
        {"action": "set_cap", "cap": "many"},
    ],
)
def test_bad_board_input_is_answered_with_a_message_not_an_error(teacher, client_for, queue_settings, data):
    response = post_board(client_for(teacher), **data)

    assert response.status_code == 200
    assert response.redirect_chain[-1][0] == reverse("admin:comfyproxy_board")
    assert shown_messages(response)
    assert not AuditEvent.objects.exists()


def test_the_board_action_view_takes_only_posts(teacher, client_for):
    assert client_for(teacher).get(reverse("admin:comfyproxy_board_act")).status_code == 405
