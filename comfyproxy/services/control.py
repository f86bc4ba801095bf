"""What teachers and operators do to the queue while a class runs.

Admin actions, the live board and `manage.py comfy_queue` all call these functions (as
should any API for teachers), so an action means the same thing wherever it is taken. Each
one records an `AuditEvent` (who, when, what, how many), wakes the dispatcher after commit
(it re-reads the settings at its next dispatch, so nothing needs a restart) and returns an
`ActionResult` whose message says what happened ("已取消 3 个任务").
"""

import getpass
import os
from collections.abc import Iterable
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, ngettext

from comfyproxy import errors
from comfyproxy.models import AuditEvent, ComfyInstance, InstanceState, QueueSettings, Task, TaskStatus
from comfyproxy.services import instances as instances_service
from comfyproxy.services import queue
from comfyproxy.services.notify import queue_changed


class InvalidSetting(errors.QueueError):
    status_code = 400
    code = "invalid_setting"
    message = gettext_lazy("That value is not allowed for this setting.")


class TeachersOnly(errors.QueueError):
    status_code = 403
    code = "forbidden"
    message = gettext_lazy("Only teachers can do this.")


@dataclass(frozen=True)
class ConsoleOperator:
    """Someone running manage.py on the server: trusted like a teacher, recorded by login name."""

    name: str
    pk = None
    is_authenticated = True
    is_staff = True

    @classmethod
    def current(cls) -> "ConsoleOperator":
        try:
            return cls(name=getpass.getuser())
        except (OSError, KeyError):
            # No login name in the environment and no passwd entry (some containers).
            return cls(name=f"uid {os.getuid()}")

    def get_username(self) -> str:
        return self.name


@dataclass(frozen=True)
class ActionResult:
    """What an action did, in words a teacher reads and in a number a script checks."""

    action: str
    affected: int
    message: str


def _record(actor, action: str, message: str, affected: int) -> ActionResult:
    is_user = isinstance(actor, get_user_model())
    name = actor.get_username() if is_user else f"console:{actor.get_username()}"
    AuditEvent.objects.create(
        actor=actor if is_user else None,
        actor_name=name,
        action=action,
        summary=message,
        affected=affected,
    )
    return ActionResult(action=action, affected=affected, message=message)


def _require_staff(actor) -> None:
    if actor is None or not actor.is_authenticated:
        raise errors.NotAuthenticated()
    if not actor.is_staff:
        raise TeachersOnly()


def _with_owners(tasks: Iterable[Task]) -> list[Task]:
    ids = [task.pk for task in tasks]
    return list(Task.objects.filter(pk__in=ids).select_related("owner").order_by("queue_order", "queued_at"))


def _join(*parts: str) -> str:
    return " ".join(part for part in parts if part)


# --- Tasks ----------------------------------------------------------------------------------


def cancel_tasks(*, actor, tasks: Iterable[Task]) -> ActionResult:
    """Cancel what is selected: waiting tasks leave the queue now, running ones are interrupted."""
    _require_staff(actor)
    removed = stopping = finished = 0
    with transaction.atomic():
        for task in _with_owners(tasks):
            try:
                task = queue.cancel_task(actor=actor, task=task)
            except errors.TaskAlreadyFinished:
                finished += 1
                continue
            if task.status == TaskStatus.PROCESSING:
                stopping += 1
            else:
                removed += 1
        message = _join(
            ngettext("Cancelled %(count)d task.", "Cancelled %(count)d tasks.", removed) % {"count": removed},
            _stopping_note(stopping),
            _finished_note(finished),
        )
        return _record(actor, "cancel", message, removed + stopping)


def interrupt_tasks(*, actor, tasks: Iterable[Task]) -> ActionResult:
    """Stop selected running tasks. The dispatcher owns them: it interrupts them in ComfyUI."""
    _require_staff(actor)
    stopping = not_running = 0
    with transaction.atomic():
        for task in _with_owners(tasks):
            if task.status != TaskStatus.PROCESSING:
                not_running += 1
                continue
            try:
                task = queue.cancel_task(actor=actor, task=task)
            except errors.TaskAlreadyFinished:
                not_running += 1
                continue
            stopping += task.status == TaskStatus.PROCESSING
        message = _join(
            ngettext(
                "Asked ComfyUI to interrupt %(count)d running task.",
                "Asked ComfyUI to interrupt %(count)d running tasks.",
                stopping,
            )
            % {"count": stopping},
            ngettext(
                "%(count)d selected task was not running.",
                "%(count)d selected tasks were not running.",
                not_running,
            )
            % {"count": not_running}
            if not_running
            else "",
        )
        return _record(actor, "interrupt", message, stopping)


def retry_tasks(*, actor, tasks: Iterable[Task]) -> ActionResult:
    """Queue failed or cancelled tasks again, as new tasks with the same workflow.

    A new task (a new prompt id) rather than requeueing the old row: the old prompt id may
    already be in ComfyUI's /history, and the dispatcher reads an id found there as "already
    ran" when it reconciles after a crash. The failed row also stays as the record of what
    happened. The retry joins the back of the queue under the usual per-student limit; a
    teacher can move it to the front.
    """
    _require_staff(actor)
    if not isinstance(actor, get_user_model()):
        # The new task records who queued it, which must be an account.
        raise TeachersOnly(_("Retrying needs a teacher's account."))
    retried = 0
    refused: list[str] = []
    for task in _with_owners(tasks):
        if task.status not in (TaskStatus.FAILED, TaskStatus.CANCELLED):
            refused.append(f"{task.owner.get_username()}: {errors.TaskNotRetryable.message}")
            continue
        body = {
            "prompt": task.prompt,
            "client_id": task.client_id,
            "extra_data": task.extra_data,
            "partial_execution_targets": task.partial_execution_targets,
        }
        try:
            queue.submit_task(actor=actor, owner=task.owner, body=body)
        except errors.QueueError as error:
            refused.append(f"{task.owner.get_username()}: {error.message}")
            continue
        retried += 1
    message = _join(
        ngettext("Queued %(count)d task again.", "Queued %(count)d tasks again.", retried)
        % {"count": retried},
        ngettext("Not retried (%(count)d): %(why)s", "Not retried (%(count)d): %(why)s", len(refused))
        % {"count": len(refused), "why": "; ".join(refused)}
        if refused
        else "",
    )
    return _record(actor, "retry", message, retried)


def move_to_front(*, actor, tasks: Iterable[Task]) -> ActionResult:
    """Teacher's priority: the selected waiting tasks go before everything queued now, in their order."""
    _require_staff(actor)
    ids = [task.pk for task in tasks]
    with transaction.atomic():
        chosen = list(Task.objects.queued().filter(pk__in=ids).in_queue_order().values_list("pk", flat=True))
        head = Task.objects.queued().in_queue_order().values_list("queue_order", flat=True).first()
        moved = 0
        for offset, pk in enumerate(chosen):
            moved += Task.objects.filter(pk=pk, status=TaskStatus.QUEUED).update(
                queue_order=head - len(chosen) + offset
            )
        if moved:
            queue_changed("reordered")
        not_waiting = len(ids) - moved
        message = _join(
            ngettext(
                "Moved %(count)d task to the front of the queue.",
                "Moved %(count)d tasks to the front of the queue.",
                moved,
            )
            % {"count": moved},
            ngettext(
                "%(count)d selected task was not waiting.",
                "%(count)d selected tasks were not waiting.",
                not_waiting,
            )
            % {"count": not_waiting}
            if not_waiting
            else "",
        )
        return _record(actor, "move_to_front", message, moved)


def _stopping_note(count: int) -> str:
    if not count:
        return ""
    return ngettext(
        "%(count)d running task is being interrupted.",
        "%(count)d running tasks are being interrupted.",
        count,
    ) % {"count": count}


def _finished_note(count: int) -> str:
    if not count:
        return ""
    return ngettext(
        "%(count)d had already finished.",
        "%(count)d had already finished.",
        count,
    ) % {"count": count}


# --- Live settings --------------------------------------------------------------------------


@dataclass(frozen=True)
class SettingRule:
    minimum: int
    maximum: int
    nullable: bool


# Bounds a teacher can set. They catch typos (a cap of 100000), not policy.
INTEGER_SETTINGS = {
    "max_concurrent_override": SettingRule(1, 1000, nullable=True),
    "max_queued_per_student": SettingRule(1, 1000, nullable=True),
    "run_timeout_seconds": SettingRule(1, 24 * 3600, nullable=True),
    "idle_stop_minutes": SettingRule(0, 7 * 24 * 60, nullable=False),
}
BOOLEAN_SETTINGS = ("paused", "free_memory_after_task")
EDITABLE_SETTINGS = (*INTEGER_SETTINGS, *BOOLEAN_SETTINGS)


def _label(field: str) -> str:
    return str(QueueSettings._meta.get_field(field).verbose_name)


def validate_setting(field: str, value):
    """The value to store for one setting, or InvalidSetting with a message naming the setting."""
    if field in BOOLEAN_SETTINGS:
        if not isinstance(value, bool):
            raise InvalidSetting(_("%(setting)s must be yes or no.") % {"setting": _label(field)})
        return value
    rule = INTEGER_SETTINGS.get(field)
    if rule is None:
        raise InvalidSetting(_("There is no setting called %(setting)s.") % {"setting": field})
    if value is None and rule.nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not rule.minimum <= value <= rule.maximum:
        raise InvalidSetting(
            _("%(setting)s must be a whole number from %(minimum)d to %(maximum)d.")
            % {"setting": _label(field), "minimum": rule.minimum, "maximum": rule.maximum}
        )
    return value


def _shown(queue_settings: QueueSettings, field: str) -> str:
    value = getattr(queue_settings, field)
    if isinstance(value, bool):
        return _("yes") if value else _("no")
    if value is None:
        return _("default")
    return str(value)


def update_settings(*, actor, message: str | None = None, **changes) -> ActionResult:
    """Change live settings; the dispatcher applies them at its next dispatch."""
    _require_staff(actor)
    cleaned = {field: validate_setting(field, value) for field, value in changes.items()}
    with transaction.atomic():
        queue_settings, _created = QueueSettings.objects.select_for_update().get_or_create(pk=1)
        described = []
        for field, value in cleaned.items():
            if getattr(queue_settings, field) == value:
                continue
            before = _shown(queue_settings, field)
            setattr(queue_settings, field, value)
            described.append(f"{_label(field)}: {before} → {_shown(queue_settings, field)}")
        if not described:
            return ActionResult(action="settings", affected=0, message=_("Nothing changed."))
        queue_settings.updated_by = actor if isinstance(actor, get_user_model()) else None
        queue_settings.save()
        queue_changed("settings_changed")
        summary = _("Queue settings changed: %(changes)s.") % {"changes": "; ".join(described)}
        return _record(actor, "settings", _join(message or "", summary), len(described))


def pause_queue(*, actor) -> ActionResult:
    """Nothing new starts until resumed; running tasks finish normally."""
    _require_staff(actor)
    if QueueSettings.load().paused:
        return ActionResult(action="pause", affected=0, message=_("The queue was already paused."))
    return update_settings(
        actor=actor,
        paused=True,
        message=_("The queue is paused: nothing new starts, running tasks finish."),
    )


def resume_queue(*, actor) -> ActionResult:
    _require_staff(actor)
    if not QueueSettings.load().paused:
        return ActionResult(action="resume", affected=0, message=_("The queue was not paused."))
    return update_settings(actor=actor, paused=False, message=_("The queue runs again."))


def set_max_concurrent(*, actor, value: int | None) -> ActionResult:
    """The live cap; None returns to the configured default."""
    result = update_settings(actor=actor, max_concurrent_override=value)
    if not result.affected:
        return result
    cap = QueueSettings.load().max_concurrent
    note = ngettext(
        "From now on at most %(count)d workflow runs at once.",
        "From now on at most %(count)d workflows run at once.",
        cap,
    ) % {"count": cap}
    return ActionResult(action=result.action, affected=result.affected, message=_join(note, result.message))


def set_student_limit(*, actor, value: int | None) -> ActionResult:
    return update_settings(actor=actor, max_queued_per_student=value)


def set_run_timeout(*, actor, seconds: int | None) -> ActionResult:
    return update_settings(actor=actor, run_timeout_seconds=seconds)


# --- Instances ------------------------------------------------------------------------------


def _with_users(selected: Iterable[ComfyInstance]) -> list[ComfyInstance]:
    return list(
        ComfyInstance.objects.filter(pk__in=[instance.pk for instance in selected]).select_related("user")
    )


def start_instances(*, actor, instances: Iterable[ComfyInstance]) -> ActionResult:
    """Start the selected students' ComfyUI, one after another (each start waits until it answers)."""
    _require_staff(actor)
    started = already = 0
    refused: list[str] = []
    for instance in _with_users(instances):
        if instance.state == InstanceState.RUNNING:
            already += 1
            continue
        try:
            instances_service.start_instance(instance.user)
        except errors.QueueError as error:
            refused.append(f"{instance.user.get_username()}: {error.message}")
            continue
        started += 1
    message = _join(
        ngettext("Started %(count)d ComfyUI.", "Started %(count)d ComfyUIs.", started) % {"count": started},
        ngettext("%(count)d was already running.", "%(count)d were already running.", already)
        % {"count": already}
        if already
        else "",
        _("Could not start: %(why)s") % {"why": "; ".join(refused)} if refused else "",
    )
    return _record(actor, "start_instances", message, started)


def stop_instances(*, actor, instances: Iterable[ComfyInstance]) -> ActionResult:
    """Stop the selected students' ComfyUI; their waiting tasks fail with a clear reason."""
    _require_staff(actor)
    stopped = 0
    refused: list[str] = []
    for instance in _with_users(instances):
        if instance.state != InstanceState.RUNNING:
            continue
        try:
            instances_service.stop_instance(instance.user, message=_("Stopped by a teacher."))
        except errors.QueueError as error:
            refused.append(f"{instance.user.get_username()}: {error.message}")
            continue
        stopped += 1
    message = _join(
        ngettext("Stopped %(count)d ComfyUI.", "Stopped %(count)d ComfyUIs.", stopped) % {"count": stopped},
        _("Could not stop: %(why)s") % {"why": "; ".join(refused)} if refused else "",
    )
    return _record(actor, "stop_instances", message, stopped)


def stop_idle_instances(*, actor) -> ActionResult:
    """Stop now what the instance monitor would stop as idle (frees GPU memory)."""
    _require_staff(actor)
    minutes = QueueSettings.load().idle_stop_minutes
    if not minutes:
        return ActionResult(
            action="stop_idle",
            affected=0,
            message=_("Idle instances are never stopped: set the idle minutes in the queue settings first."),
        )
    stopped = instances_service.stop_idle_instances()
    names = ", ".join(instance.user.get_username() for instance in stopped)
    message = ngettext(
        "Stopped %(count)d ComfyUI idle for %(minutes)d minutes or more.",
        "Stopped %(count)d ComfyUIs idle for %(minutes)d minutes or more.",
        len(stopped),
    ) % {"count": len(stopped), "minutes": minutes}
    return _record(actor, "stop_idle", _join(message, f"({names})" if names else ""), len(stopped))
