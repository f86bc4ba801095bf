"""Students' instances: ports, start, stop, and noticing instances that stopped by themselves.

Instances are real emulator processes started by the local launcher (`local_comfy`).
"""

import os
import signal
import socket
import threading
from datetime import timedelta

import pytest
from django.db import connections
from django.utils import timezone, translation

from comfyproxy import errors
from comfyproxy.launchers import launcher_for
from comfyproxy.models import ComfyInstance, InstanceState, TaskReason, TaskStatus
from comfyproxy.services import instances
from tests.processes import port_open, wait_until

NEVER_LISTENS = "{python} -c 'import time; time.sleep(120)'"
EXITS_AT_ONCE = "{python} -c 'raise SystemExit(3)'"


def process_alive(instance) -> bool:
    return launcher_for(instance).is_alive(instance)


# --- Starting ----------------------------------------------------------------------------


def test_start_runs_comfyui_on_a_port_from_the_range(local_comfy, student):
    instance = instances.start_instance(student)

    assert instance.state == InstanceState.RUNNING
    assert instance.port in local_comfy.ports
    assert instance.launcher == "local"
    assert instance.healthy is True
    assert port_open(instance.port)


def test_a_student_keeps_their_instance_while_it_runs(local_comfy, student):
    first = instances.start_instance(student)
    again = instances.start_instance(student)

    assert again.port == first.port
    assert again.launcher_handle == first.launcher_handle


def test_a_restarted_student_gets_their_previous_port_back(local_comfy, student):
    port = instances.start_instance(student).port
    instances.stop_instance(student)
    assert instances.start_instance(student).port == port


def test_a_port_something_else_listens_on_is_skipped(local_comfy, student, settings):
    settings.COMFY_PORT_RANGE = (local_comfy.ports[0], local_comfy.ports[1])
    with socket.create_server(("127.0.0.1", local_comfy.ports[0])):
        instance = instances.start_instance(student)
    assert instance.port == local_comfy.ports[1]


def test_no_free_port_is_a_clear_refusal(local_comfy, student, other_student, register_instance, settings):
    settings.COMFY_PORT_RANGE = (local_comfy.ports[0], local_comfy.ports[0])
    register_instance(other_student, local_comfy.ports[0])

    with pytest.raises(errors.NoFreePort) as refusal:
        instances.start_instance(student)

    assert refusal.value.status_code == 503
    assert refusal.value.code == "no_free_port"


def test_comfyui_that_never_answers_fails_the_start_and_is_stopped(local_comfy, student, settings):
    settings.COMFY_LOCAL_COMMAND = NEVER_LISTENS
    settings.COMFY_START_TIMEOUT_SECONDS = 1

    with pytest.raises(errors.InstanceStartFailed) as refusal:
        instances.start_instance(student)

    assert refusal.value.code == "gpu_server_unreachable"
    assert refusal.value.status_code == 502
    instance = ComfyInstance.objects.get(user=student)
    assert instance.state == InstanceState.FAILED
    assert not process_alive(instance)


def test_comfyui_that_exits_while_starting_fails_before_the_timeout(local_comfy, student, settings):
    settings.COMFY_LOCAL_COMMAND = EXITS_AT_ONCE
    settings.COMFY_START_TIMEOUT_SECONDS = 120

    with translation.override("en"), pytest.raises(errors.InstanceStartFailed) as refusal:
        instances.start_instance(student)

    assert refusal.value.details == "ComfyUI exited while starting."
    assert ComfyInstance.objects.get(user=student).state == InstanceState.FAILED


def test_a_command_that_cannot_run_fails_the_start(local_comfy, student, settings):
    settings.COMFY_LOCAL_COMMAND = "/nonexistent/comfyui --port {port}"

    with pytest.raises(errors.InstanceStartFailed):
        instances.start_instance(student)

    instance = ComfyInstance.objects.get(user=student)
    assert instance.state == InstanceState.FAILED
    assert "/nonexistent/comfyui" in instance.state_message


def test_a_failed_start_frees_the_port_for_the_next_attempt(local_comfy, student, settings):
    settings.COMFY_PORT_RANGE = (local_comfy.ports[0], local_comfy.ports[0])
    settings.COMFY_LOCAL_COMMAND = EXITS_AT_ONCE
    with pytest.raises(errors.InstanceStartFailed):
        instances.start_instance(student)

    settings.COMFY_LOCAL_COMMAND = "{python} -m comfyproxy.emulator --host {host} --ports {port}"
    assert instances.start_instance(student).port == local_comfy.ports[0]


def test_a_second_start_while_the_first_is_under_way_is_told_to_wait(local_comfy, student):
    ComfyInstance.objects.create(
        user=student, host="127.0.0.1", port=local_comfy.ports[0], state=InstanceState.STARTING
    )
    with pytest.raises(errors.InstanceBusy) as refusal:
        instances.start_instance(student)
    assert refusal.value.status_code == 409


def start_all_at_once(students) -> list:
    """Each student presses start in their own thread (own DB connection) at the same instant."""
    barrier = threading.Barrier(len(students))
    outcomes = [None] * len(students)

    def press_start(index, user):
        try:
            barrier.wait()
            outcomes[index] = instances.start_instance(user)
        except Exception as error:  # reported by the test, not lost in the thread
            outcomes[index] = error
        finally:
            connections.close_all()

    threads = [threading.Thread(target=press_start, args=(i, user)) for i, user in enumerate(students)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return outcomes


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_students_pressing_start_at_the_same_instant_never_share_a_port(local_comfy, make_student):
    # As many students as ports, so that every random pick can collide with another.
    students = [make_student() for _port in local_comfy.ports]

    outcomes = start_all_at_once(students)

    assert all(isinstance(outcome, ComfyInstance) for outcome in outcomes), outcomes
    assert sorted(outcome.port for outcome in outcomes) == list(local_comfy.ports)
    for instance in ComfyInstance.objects.all():
        assert instance.state == InstanceState.RUNNING
        assert process_alive(instance)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_more_students_than_ports_get_a_clear_refusal_not_a_shared_port(local_comfy, make_student, settings):
    settings.COMFY_PORT_RANGE = (local_comfy.ports[0], local_comfy.ports[1])
    students = [make_student() for _ in range(4)]

    outcomes = start_all_at_once(students)

    started = [outcome for outcome in outcomes if isinstance(outcome, ComfyInstance)]
    refused = [outcome for outcome in outcomes if isinstance(outcome, errors.NoFreePort)]
    assert (len(started), len(refused)) == (2, 2), outcomes
    assert {instance.port for instance in started} == set(local_comfy.ports[:2])


# --- Stopping ------------------------------------------------------------------------------


def test_stop_ends_the_process_and_fails_the_waiting_tasks(local_comfy, student, make_task):
    instance = instances.start_instance(student)
    task = make_task(student, port=instance.port)
    task.instance = instance
    task.save()

    instances.stop_instance(student)

    instance.refresh_from_db()
    task.refresh_from_db()
    assert instance.state == InstanceState.STOPPED
    assert not process_alive(instance)
    assert not port_open(instance.port)
    assert (task.status, task.reason) == (TaskStatus.FAILED, TaskReason.INSTANCE_STOPPED)


def test_stopping_what_is_not_running_does_nothing(local_comfy, student):
    assert instances.stop_instance(student) is None
    instances.start_instance(student)
    instances.stop_instance(student)
    assert instances.stop_instance(student).state == InstanceState.STOPPED


def test_a_stopped_students_port_goes_to_the_next_student(local_comfy, student, other_student, settings):
    settings.COMFY_PORT_RANGE = (local_comfy.ports[0], local_comfy.ports[0])
    instances.start_instance(student)
    instances.stop_instance(student)
    assert instances.start_instance(other_student).port == local_comfy.ports[0]


def test_when_the_gpu_server_cannot_be_reached_the_instance_stays_running(local_comfy, student, settings):
    instance = ComfyInstance.objects.create(
        user=student,
        host="127.0.0.1",
        port=local_comfy.ports[0],
        state=InstanceState.RUNNING,
        launcher="ssh",
        launcher_handle={"pid": 4242},
        started_at=timezone.now(),
    )
    settings.COMFY_SSH_HOST = "127.0.0.1"
    settings.COMFY_SSH_PORT = local_comfy.ports[1]  # nothing listens there

    with pytest.raises(errors.InstanceStartFailed):
        instances.stop_instance(student)

    instance.refresh_from_db()
    assert instance.state == InstanceState.RUNNING


# --- Watching ------------------------------------------------------------------------------


def test_a_crashed_instance_is_noticed_and_its_waiting_tasks_fail(local_comfy, student, make_task):
    instance = instances.start_instance(student)
    task = make_task(student, port=instance.port)
    task.instance = instance
    task.save()
    os.kill(instance.launcher_handle["pid"], signal.SIGKILL)
    wait_until(lambda: not process_alive(instance), timeout=5, message="the process to die")

    report = instances.check_instances()

    assert report.stopped == [student.username]
    instance.refresh_from_db()
    task.refresh_from_db()
    assert instance.state == InstanceState.FAILED
    assert (task.status, task.reason) == (TaskStatus.FAILED, TaskReason.INSTANCE_STOPPED)


def test_a_healthy_instance_is_left_running(local_comfy, student):
    instances.start_instance(student)

    report = instances.check_instances()

    assert (report.checked, report.stopped, report.unhealthy) == (1, [], [])
    assert ComfyInstance.objects.get(user=student).state == InstanceState.RUNNING


def test_an_instance_that_hangs_is_unhealthy_but_not_stopped(local_comfy, student):
    instance = instances.start_instance(student)
    pid = instance.launcher_handle["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        report = instances.check_instances()
    finally:
        os.kill(pid, signal.SIGCONT)

    assert report.unhealthy == [student.username]
    instance.refresh_from_db()
    assert (instance.state, instance.healthy) == (InstanceState.RUNNING, False)


def test_an_external_instance_is_stopped_after_two_failed_checks(local_comfy, student, register_instance):
    register_instance(student, local_comfy.ports[0])  # nothing listens there

    assert instances.check_instances().unhealthy == [student.username]
    assert instances.check_instances().stopped == [student.username]
    assert ComfyInstance.objects.get(user=student).state == InstanceState.FAILED


def test_an_abandoned_start_is_finished_off(local_comfy, student, settings):
    long_ago = timezone.now() - timedelta(seconds=settings.COMFY_START_TIMEOUT_SECONDS) - timedelta(minutes=5)
    ComfyInstance.objects.create(
        user=student,
        host="127.0.0.1",
        port=local_comfy.ports[0],
        state=InstanceState.STARTING,
        started_at=long_ago,
    )

    assert instances.check_instances().abandoned == [student.username]
    assert ComfyInstance.objects.get(user=student).state == InstanceState.FAILED


def test_a_check_does_not_touch_an_instance_restarted_meanwhile(local_comfy, student):
    """The monitor read the old run; the student restarted since: the new run is not marked stopped."""
    old_run = instances.start_instance(student)
    instances.stop_instance(student)
    instances.start_instance(student)

    assert instances.mark_instance_stopped(old_run, message="stale") == 0
    assert ComfyInstance.objects.get(user=student).state == InstanceState.RUNNING


# --- Idle instances ------------------------------------------------------------------------


@pytest.fixture
def idle_limit(queue_settings):
    queue_settings.idle_stop_minutes = 30
    queue_settings.save()
    return timedelta(minutes=30)


def make_idle(instance, idle_for: timedelta):
    ComfyInstance.objects.filter(pk=instance.pk).update(last_activity_at=timezone.now() - idle_for)


def test_an_idle_instance_is_stopped(local_comfy, student, idle_limit):
    instance = instances.start_instance(student)
    make_idle(instance, idle_limit + timedelta(minutes=1))

    assert instances.check_instances().idle_stopped == [student.username]

    instance.refresh_from_db()
    assert instance.state == InstanceState.STOPPED
    assert not process_alive(instance)


def test_an_instance_with_a_waiting_task_is_not_idle(local_comfy, student, idle_limit, make_task):
    instance = instances.start_instance(student)
    task = make_task(student, port=instance.port)
    task.instance = instance
    task.save()
    make_idle(instance, idle_limit + timedelta(minutes=1))

    assert instances.stop_idle_instances() == []


def test_presence_keeps_an_instance_from_being_idle(local_comfy, student, idle_limit):
    instance = instances.start_instance(student)
    make_idle(instance, idle_limit + timedelta(minutes=1))

    instances.record_activity(student)

    assert instances.stop_idle_instances() == []


def test_idle_instances_are_kept_when_the_teacher_set_no_limit(local_comfy, student, queue_settings):
    assert queue_settings.idle_stop_minutes == 0
    instance = instances.start_instance(student)
    make_idle(instance, timedelta(days=1))

    assert instances.stop_idle_instances() == []
