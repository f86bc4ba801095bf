"""Students' ComfyUI instances: which port each one holds, and what happens when one stops."""

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from comfyproxy import errors
from comfyproxy.models import ComfyInstance, InstanceState, Task, TaskReason, TaskStatus
from comfyproxy.services.notify import queue_changed


def port_in_range(port: int) -> bool:
    first, last = settings.COMFY_PORT_RANGE
    return first <= port <= last


def register_instance(*, user, port: int, host: str | None = None, launcher: str = "external") -> ComfyInstance:
    """Record a running instance started outside the teaching system (operators, tests)."""
    if not port_in_range(port):
        first, last = settings.COMFY_PORT_RANGE
        raise errors.QueueError(
            _("Port %(port)d is outside the configured range %(first)d-%(last)d.")
            % {"port": port, "first": first, "last": last}
        )
    host = host or settings.COMFY_GPU_HOST
    now = timezone.now()
    try:
        with transaction.atomic():
            instance, _created = ComfyInstance.objects.select_for_update().get_or_create(
                user=user, defaults={"host": host}
            )
            instance.host = host
            instance.port = port
            instance.state = InstanceState.RUNNING
            instance.launcher = launcher
            instance.state_message = ""
            instance.started_at = now
            instance.stopped_at = None
            instance.last_activity_at = now
            instance.save()
    except IntegrityError:
        raise errors.QueueError(
            _("Port %(port)d is already used by another student's instance.") % {"port": port}
        ) from None
    queue_changed("instance_registered")
    return instance


def mark_instance_stopped(instance: ComfyInstance, *, message: str = "", failed: bool = False) -> int:
    """The instance is gone: free its port and end its waiting tasks with a clear reason.

    A task already running there is left to the dispatcher, which sees ComfyUI vanish and
    fails it itself (it owns running tasks). Returns how many queued tasks were failed.
    """
    now = timezone.now()
    with transaction.atomic():
        ComfyInstance.objects.filter(pk=instance.pk).update(
            state=InstanceState.FAILED if failed else InstanceState.STOPPED,
            stopped_at=now,
            state_message=message,
        )
        ended = Task.objects.filter(instance=instance, status=TaskStatus.QUEUED).update(
            status=TaskStatus.FAILED,
            reason=TaskReason.INSTANCE_STOPPED,
            error_message=_("Your ComfyUI stopped before this task could run."),
            finished_at=now,
        )
        queue_changed("instance_stopped")
    instance.refresh_from_db()
    return ended


def remove_instance(*, user) -> bool:
    instance = ComfyInstance.objects.filter(user=user).first()
    if instance is None:
        return False
    mark_instance_stopped(instance, message=_("Removed by an operator."))
    return True
