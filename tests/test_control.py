"""Teacher actions as services: what each one does to the queue, what it reports, what it records."""

import pytest
from django.utils import timezone

from comfyproxy.models import AuditEvent, ComfyInstance, QueueSettings, Task, TaskReason, TaskStatus
from comfyproxy.services import control, queue
from comfyproxy.services.notify import QUEUE_CHANGED_CHANNEL, redis_connection

WORKFLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}
}
PORT = 8189

pytestmark = [pytest.mark.usefixtures("fast_password_hashing"), pytest.mark.postgres]


@pytest.fixture
def class_of_three(make_student, register_instance):
    students = [make_student() for _ in range(3)]
    for offset, student in enumerate(students):
        register_instance(student, PORT + offset)
    return students


def submit(student, **body):
    return queue.submit_task(actor=student, owner=student, body={"prompt": WORKFLOW, **body})


@pytest.fixture
def wakeups():
    """Messages the dispatcher would receive on its wake-up channel."""
    pubsub = redis_connection().pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(QUEUE_CHANGED_CHANNEL)
    # The subscription is confirmed by its first (ignored) message.
    pubsub.get_message(timeout=1)

    def next_wakeup(timeout: float) -> str | None:
        message = pubsub.get_message(timeout=timeout)
        return None if message is None else message["data"].decode()

    yield next_wakeup
    pubsub.close()


def test_cancelling_waiting_tasks_removes_them_and_reports_how_many(teacher, class_of_three):
    tasks = [submit(student) for student in class_of_three]

    result = control.cancel_tasks(actor=teacher, tasks=tasks)

    assert result.affected == 3
    assert "3" in result.message
    for task in Task.objects.all():
        assert task.status == TaskStatus.CANCELLED
        assert task.reason == TaskReason.CANCELLED_BY_TEACHER
    event = AuditEvent.objects.get()
    assert (event.actor, event.actor_name, event.action, event.affected) == (teacher, "teacher", "cancel", 3)
    assert event.summary == result.message


def test_cancelling_a_running_task_leaves_the_interrupt_to_the_dispatcher(teacher, student, make_task):
    running = make_task(student, status=TaskStatus.PROCESSING)

    result = control.cancel_tasks(actor=teacher, tasks=[running])

    running.refresh_from_db()
    assert running.status == TaskStatus.PROCESSING
    assert running.cancel_requested_at is not None
    assert running.reason == TaskReason.CANCELLED_BY_TEACHER
    assert result.affected == 1


def test_cancel_skips_finished_tasks_and_says_so(teacher, student, make_task):
    done = make_task(student, status=TaskStatus.COMPLETED)
    waiting = make_task(student)

    result = control.cancel_tasks(actor=teacher, tasks=[done, waiting])

    assert result.affected == 1
    done.refresh_from_db()
    assert done.status == TaskStatus.COMPLETED
    assert AuditEvent.objects.get().affected == 1


def test_interrupt_touches_only_running_tasks(teacher, student, other_student, make_task):
    running = make_task(student, status=TaskStatus.PROCESSING)
    waiting = make_task(other_student)

    result = control.interrupt_tasks(actor=teacher, tasks=[running, waiting])

    assert result.affected == 1
    running.refresh_from_db()
    waiting.refresh_from_db()
    assert running.cancel_requested_at is not None
    assert waiting.status == TaskStatus.QUEUED
    assert waiting.cancel_requested_at is None


def test_retry_queues_a_new_task_with_the_same_workflow(teacher, class_of_three):
    student = class_of_three[0]
    failed = submit(student, client_id="browser-7", extra_data={"extra_pnginfo": {"workflow": {"nodes": []}}})
    Task.objects.filter(pk=failed.pk).update(
        status=TaskStatus.FAILED, reason=TaskReason.COMFY_UNREACHABLE, finished_at=timezone.now()
    )

    result = control.retry_tasks(actor=teacher, tasks=[failed])

    assert result.affected == 1
    retry = Task.objects.exclude(pk=failed.pk).get()
    assert retry.status == TaskStatus.QUEUED
    assert (retry.prompt, retry.client_id, retry.extra_data) == (
        WORKFLOW,
        "browser-7",
        {"extra_pnginfo": {"workflow": {"nodes": []}}},
    )
    assert retry.owner == student
    assert retry.submitted_by == teacher
    failed.refresh_from_db()
    assert failed.status == TaskStatus.FAILED


def test_retry_refuses_what_did_not_fail_and_explains_why(teacher, class_of_three, make_task):
    student = class_of_three[0]
    completed = make_task(student, status=TaskStatus.COMPLETED)
    ComfyInstance.objects.filter(user=class_of_three[1]).update(state="stopped")
    stranded = make_task(class_of_three[1], status=TaskStatus.FAILED, reason=TaskReason.INSTANCE_STOPPED)

    result = control.retry_tasks(actor=teacher, tasks=[completed, stranded])

    assert result.affected == 0
    assert student.username in result.message
    assert class_of_three[1].username in result.message
    assert Task.objects.count() == 2


def test_retry_respects_the_per_student_limit(teacher, class_of_three, queue_settings, make_task):
    student = class_of_three[0]
    queue_settings.max_queued_per_student = 1
    queue_settings.save()
    submit(student)
    failed = make_task(student, status=TaskStatus.FAILED)

    result = control.retry_tasks(actor=teacher, tasks=[failed])

    assert result.affected == 0
    assert Task.objects.filter(owner=student, status=TaskStatus.QUEUED).count() == 1


def test_moving_tasks_to_the_front_keeps_their_own_order(
    teacher, class_of_three, make_student, register_instance
):
    fourth = make_student()
    register_instance(fourth, PORT + 3)
    first, second, third, last = (submit(student) for student in [*class_of_three, fourth])

    result = control.move_to_front(actor=teacher, tasks=[last, third])

    assert result.affected == 2
    order = list(Task.objects.queued().in_queue_order().values_list("pk", flat=True))
    assert order == [third.pk, last.pk, first.pk, second.pk]
    last.refresh_from_db()
    assert queue.queue_position(last) == 2


def test_moving_a_running_task_to_the_front_changes_nothing(teacher, student, make_task):
    running = make_task(student, status=TaskStatus.PROCESSING)

    result = control.move_to_front(actor=teacher, tasks=[running])

    assert result.affected == 0
    running.refresh_from_db()
    assert running.status == TaskStatus.PROCESSING


def test_pause_is_recorded_and_wakes_the_dispatcher_after_commit(
    teacher, queue_settings, wakeups, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        result = control.pause_queue(actor=teacher)
    assert wakeups(timeout=0) is None, "the dispatcher must not hear of it before the commit"
    for callback in callbacks:
        callback()

    assert wakeups(timeout=5) == "settings_changed"
    assert result.affected == 1
    assert QueueSettings.load().paused
    assert QueueSettings.load().updated_by == teacher
    assert queue.queue_overview().paused
    assert AuditEvent.objects.get().action == "settings"


def test_pausing_twice_changes_nothing_the_second_time(teacher, queue_settings):
    control.pause_queue(actor=teacher)
    again = control.pause_queue(actor=teacher)

    assert again.affected == 0
    assert AuditEvent.objects.count() == 1
    assert control.resume_queue(actor=teacher).affected == 1
    assert not QueueSettings.load().paused


def test_waiting_students_are_told_the_queue_is_paused(teacher, class_of_three):
    task = submit(class_of_three[0])
    before = queue.describe_task(task)["message"]

    control.pause_queue(actor=teacher)

    assert queue.describe_task(task)["message"] != before


def test_the_cap_set_live_is_what_the_queue_reports_next(teacher, queue_settings, settings):
    result = control.set_max_concurrent(actor=teacher, value=5)

    assert queue.queue_overview().max_concurrent == 5
    assert "5" in result.message
    control.set_max_concurrent(actor=teacher, value=None)
    assert queue.queue_overview().max_concurrent == settings.COMFY_DEFAULT_MAX_CONCURRENT


@pytest.mark.parametrize("value", [0, -1, 1001, "3", 2.5, True])
def test_a_cap_out_of_range_is_refused_with_a_stable_code(teacher, queue_settings, value):
    with pytest.raises(control.InvalidSetting) as refused:
        control.set_max_concurrent(actor=teacher, value=value)

    assert refused.value.code == "invalid_setting"
    assert refused.value.status_code == 400
    assert QueueSettings.load().max_concurrent_override is None
    assert not AuditEvent.objects.exists()


def test_student_limit_and_run_timeout_are_stored(teacher, queue_settings):
    control.set_student_limit(actor=teacher, value=2)
    control.set_run_timeout(actor=teacher, seconds=90)

    loaded = QueueSettings.load()
    assert loaded.effective_max_queued_per_student == 2
    assert loaded.effective_run_timeout_seconds == 90
    assert AuditEvent.objects.count() == 2


def test_an_unknown_setting_is_refused(teacher, queue_settings):
    with pytest.raises(control.InvalidSetting):
        control.update_settings(actor=teacher, max_concurrent=3)


def test_students_cannot_steer_the_queue(student, make_task):
    task = make_task(student)

    with pytest.raises(control.TeachersOnly) as refused:
        control.cancel_tasks(actor=student, tasks=[task])
    assert (refused.value.code, refused.value.status_code) == ("forbidden", 403)
    for action in (control.pause_queue, control.resume_queue):
        with pytest.raises(control.TeachersOnly):
            action(actor=student)
    task.refresh_from_db()
    assert task.status == TaskStatus.QUEUED
    assert not AuditEvent.objects.exists()


def test_an_operator_at_the_console_is_recorded_by_login_name(student, make_task):
    task = make_task(student)

    control.cancel_tasks(actor=control.ConsoleOperator(name="ops"), tasks=[task])

    event = AuditEvent.objects.get()
    assert event.actor is None
    assert event.actor_name == "console:ops"
