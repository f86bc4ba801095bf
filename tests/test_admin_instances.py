"""Students' ComfyUI from the teacher's console: start, stop, and stop the idle ones.

The instances are real emulator processes started by the local launcher (`local_comfy`).
"""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from comfyproxy.models import AuditEvent, ComfyInstance, InstanceState
from comfyproxy.services import instances
from tests.processes import port_open

pytestmark = pytest.mark.usefixtures("fast_password_hashing")

INSTANCE_LIST = "admin:comfyproxy_comfyinstance_changelist"


def run_action(client, action: str, *selected: ComfyInstance):
    return client.post(
        reverse(INSTANCE_LIST),
        {"action": action, "_selected_action": [str(instance.pk) for instance in selected]},
        follow=True,
    )


def shown_messages(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def test_a_teacher_stops_and_starts_a_students_comfyui(local_comfy, teacher, student, client_for):
    instance = instances.start_instance(student)
    client = client_for(teacher)

    response = run_action(client, "stop_selected", instance)

    instance.refresh_from_db()
    assert instance.state == InstanceState.STOPPED
    assert not port_open(instance.port)
    assert shown_messages(response) == [AuditEvent.objects.get(action="stop_instances").summary]

    run_action(client, "start_selected", instance)

    instance.refresh_from_db()
    assert instance.state == InstanceState.RUNNING
    assert port_open(instance.port)
    assert AuditEvent.objects.get(action="start_instances").affected == 1


def test_starting_a_running_comfyui_changes_nothing(local_comfy, teacher, student, client_for):
    instance = instances.start_instance(student)

    response = run_action(client_for(teacher), "start_selected", instance)

    assert AuditEvent.objects.get().affected == 0
    assert "1" in shown_messages(response)[0]
    assert ComfyInstance.objects.get(pk=instance.pk).launcher_handle == instance.launcher_handle


def test_stop_idle_stops_only_instances_without_work_or_activity(
    local_comfy, teacher, student, other_student, client_for, queue_settings
):
    idle = instances.start_instance(student)
    busy = instances.start_instance(other_student)
    queue_settings.idle_stop_minutes = 10
    queue_settings.save()
    ComfyInstance.objects.filter(pk=idle.pk).update(last_activity_at=timezone.now() - timedelta(minutes=30))

    response = client_for(teacher).post(reverse("admin:comfyproxy_stop_idle_instances"), follow=True)

    assert response.redirect_chain == [(reverse(INSTANCE_LIST), 303)]
    assert ComfyInstance.objects.get(pk=idle.pk).state == InstanceState.STOPPED
    assert ComfyInstance.objects.get(pk=busy.pk).state == InstanceState.RUNNING
    event = AuditEvent.objects.get()
    assert (event.action, event.affected) == ("stop_idle", 1)
    assert student.username in event.summary


def test_stop_idle_explains_that_idle_stopping_is_off(
    teacher, student, register_instance, client_for, queue_settings
):
    instance = register_instance(student, 8189)
    ComfyInstance.objects.filter(pk=instance.pk).update(last_activity_at=timezone.now() - timedelta(days=1))

    response = client_for(teacher).post(reverse("admin:comfyproxy_stop_idle_instances"), follow=True)

    assert ComfyInstance.objects.get(pk=instance.pk).state == InstanceState.RUNNING
    assert shown_messages(response)
    assert not AuditEvent.objects.exists()


def test_the_instance_list_offers_stop_idle(teacher, client_for):
    page = client_for(teacher).get(reverse(INSTANCE_LIST)).content.decode()

    assert reverse("admin:comfyproxy_stop_idle_instances") in page


def test_students_cannot_stop_anything(student, other_student, register_instance, client_for, queue_settings):
    queue_settings.idle_stop_minutes = 1
    queue_settings.save()
    instance = register_instance(other_student, 8189)
    ComfyInstance.objects.filter(pk=instance.pk).update(last_activity_at=timezone.now() - timedelta(days=1))
    client = client_for(student)

    assert client.post(reverse("admin:comfyproxy_stop_idle_instances")).status_code == 302
    run_action(client, "stop_selected", instance)

    assert ComfyInstance.objects.get(pk=instance.pk).state == InstanceState.RUNNING
    assert client.get(reverse("admin:comfyproxy_stop_idle_instances")).status_code == 302
