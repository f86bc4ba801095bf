"""Submitting, cancelling and describing tasks: the only code that changes them on the web side.

The dispatcher's own transitions (claim, submitted, finished) live in `services.dispatch`.
"""

import math
import statistics
import time
from dataclasses import dataclass
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext as _

from comfyproxy import errors
from comfyproxy.models import (
    ComfyInstance,
    InstanceState,
    QueueSettings,
    Task,
    TaskReason,
    TaskStatus,
)
from comfyproxy.services.notify import ensure_queue_available, queue_changed

# Nesting deeper than this is not a ComfyUI workflow (API-format graphs are ~4 levels deep).
MAX_JSON_DEPTH = 64
MAX_NODES = 10_000
# Used for the wait estimate until the class has finished a few runs.
DEFAULT_RUN_SECONDS = 30.0
RUN_TIME_SAMPLE = 50
# A submission refreshes its instance's last_activity_at at most this often: the idle stop
# counts whole minutes (and never stops an instance with a task waiting or running), so a
# write per submission in a burst buys nothing.
ACTIVITY_RESOLUTION = timedelta(seconds=30)


@dataclass(frozen=True)
class Submission:
    """A ComfyUI /prompt body reduced to what is forwarded (never `number` or `front`)."""

    prompt: dict
    client_id: str
    extra_data: dict
    partial_execution_targets: list | None


def parse_submission(body) -> Submission:
    if not isinstance(body, dict):
        raise errors.InvalidPrompt(details=_("The body must be a JSON object."))
    if "prompt" not in body:
        raise errors.NoPrompt()
    # First, so that no refusal below quotes text that cannot be written back.
    _check_storable(body)
    prompt = body["prompt"]
    if not isinstance(prompt, dict) or not prompt:
        raise errors.InvalidPrompt(details=_("`prompt` must be a non-empty object of nodes."))
    if len(prompt) > MAX_NODES:
        raise errors.InvalidPrompt(details=_("The workflow has too many nodes."))
    for node_id, node in prompt.items():
        if not isinstance(node, dict):
            raise errors.InvalidPrompt(details=_("Node %(node)s is not an object.") % {"node": node_id})
    client_id = body.get("client_id") or ""
    if not isinstance(client_id, str) or len(client_id) > 200:
        raise errors.InvalidPrompt(details=_("`client_id` must be a short string."))
    extra_data = body.get("extra_data") or {}
    if not isinstance(extra_data, dict):
        raise errors.InvalidPrompt(details=_("`extra_data` must be an object."))
    targets = body.get("partial_execution_targets")
    if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise errors.InvalidPrompt(details=_("`partial_execution_targets` must be a list of node ids."))
    return Submission(prompt, client_id, extra_data, targets)


def _check_storable(value) -> None:
    """Refuse what no database column takes and no UTF-8 can carry to ComfyUI: absurd
    nesting, NUL characters and lone surrogates (which JSON's "\\ud800" escape yields)."""
    if not _plainly_storable(value):
        _refuse_unstorable(value)


def _plainly_storable(value) -> bool:
    """The common case, fast: a real workflow's UI graph is thousands of strings, and checking
    them one by one cost more than parsing the JSON. Collects them level by level and checks
    them all at once; False means "look closer" (`_refuse_unstorable` then says what is wrong),
    also for any type JSON does not produce."""
    strings = []
    level = [[value]]  # containers, each of whose items lie at `depth`
    depth = 1
    while level:
        below = []
        for container in level:
            if not container:
                continue
            if depth > MAX_JSON_DEPTH:
                return False
            if type(container) is dict:
                strings.extend(container)
                items = container.values()
            else:
                items = container
            for item in items:
                kind = type(item)
                if kind is str:
                    strings.append(item)
                elif kind is dict or kind is list:
                    below.append(item)
                elif kind not in _JSON_SCALARS:
                    return False
        level = below
        depth += 1
    try:
        text = "".join(strings)
    except TypeError:  # a key that is not text (never from JSON)
        return False
    if "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_JSON_SCALARS = frozenset({int, float, bool, type(None)})


def _refuse_unstorable(value) -> None:
    """Walks `value` item by item and refuses the first thing it cannot store."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise errors.InvalidPrompt(details=_("The workflow is nested too deeply."))
        if isinstance(item, dict):
            for key, child in item.items():
                _check_text(key)
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            _check_text(item)


def _check_text(text: str) -> None:
    if "\x00" in text:
        raise errors.InvalidPrompt(details=_("The workflow contains a NUL character."))
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise errors.InvalidPrompt(
                details=_("The workflow contains text that is not valid Unicode.")
            ) from None


def resolve_owner(username: str, *, actor=None):
    """The user named in a path. `actor`, when it is that user (a student's own page), is
    returned as it is, without a second query for the same row."""
    if actor is not None and actor.is_authenticated and actor.get_username() == username:
        return actor
    user_model = get_user_model()
    if "\x00" in username:
        # No username holds one, and PostgreSQL refuses the query outright.
        raise errors.UserNotFound()
    try:
        return user_model.objects.get(**{user_model.USERNAME_FIELD: username})
    except user_model.DoesNotExist:
        raise errors.UserNotFound() from None


def authorize(actor, owner) -> None:
    """A student acts only for themselves; teachers (staff) act for any student."""
    if actor is None or not actor.is_authenticated:
        raise errors.NotAuthenticated()
    if actor.pk != owner.pk and not actor.is_staff:
        raise errors.NotYourInstance()


def _next_queue_order() -> int:
    # Microseconds: FIFO by arrival; ties (same microsecond) fall back to queued_at, id.
    return time.time_ns() // 1000


def submit_task(*, actor, owner, body, port: int | None = None) -> Task:
    """Store a workflow for the dispatcher. `port`, when given, must be the owner's running instance."""
    task, _queue_settings = _submit(actor=actor, owner=owner, body=body, port=port)
    return task


def submit_and_describe(*, actor, username: str, body, port: int | None = None) -> dict:
    """What the submit endpoints do: queue the workflow for `username`'s instance and answer
    with the new task as `describe_task` shows it, in as few queries as possible (a class
    submits at once: every query here is paid a hundred times a second)."""
    owner = resolve_owner(username, actor=actor)
    task, queue_settings = _submit(actor=actor, owner=owner, body=body, port=port)
    return describe_new_task(task, queue_settings)


def _submit(*, actor, owner, body, port: int | None) -> tuple[Task, QueueSettings]:
    authorize(actor, owner)
    submission = parse_submission(body)
    ensure_queue_available()
    queue_settings = QueueSettings.load()
    with transaction.atomic():
        # Locks the student's instance row (PostgreSQL) so two tabs cannot both slip
        # under the per-student limit; SQLite's IMMEDIATE transactions serialize anyway.
        instance = ComfyInstance.objects.select_for_update().filter(user=owner).first()
        if (
            instance is None
            or instance.state != InstanceState.RUNNING
            or (port is not None and instance.port != port)
        ):
            raise errors.InstanceNotRunning()
        limit = queue_settings.effective_max_queued_per_student
        active = Task.objects.active().filter(owner=owner).count()
        if active >= limit:
            raise errors.TooManyTasks(errors.TooManyTasks.message % {"count": active})
        task = Task.objects.create(
            owner=owner,
            submitted_by=actor,
            instance=instance,
            host=instance.host,
            port=instance.port,
            client_id=submission.client_id,
            prompt=submission.prompt,
            extra_data=submission.extra_data,
            partial_execution_targets=submission.partial_execution_targets,
            queue_order=_next_queue_order(),
        )
        now = timezone.now()
        if instance.last_activity_at is None or instance.last_activity_at < now - ACTIVITY_RESOLUTION:
            ComfyInstance.objects.filter(pk=instance.pk).update(last_activity_at=now)
        queue_changed("submitted")
    return task, queue_settings


def get_task_for(actor, task_id) -> Task:
    try:
        task = Task.objects.select_related("owner").get(pk=task_id)
    except (Task.DoesNotExist, ValidationError, ValueError, TypeError):
        raise errors.TaskNotFound() from None
    authorize(actor, task.owner)
    return task


def cancel_task(*, actor, task: Task) -> Task:
    """Remove a queued task at once; ask the dispatcher to interrupt a running one."""
    authorize(actor, task.owner)
    reason = TaskReason.CANCELLED_BY_OWNER if actor.pk == task.owner_id else TaskReason.CANCELLED_BY_TEACHER
    now = timezone.now()
    removed = Task.objects.filter(pk=task.pk, status=TaskStatus.QUEUED).update(
        status=TaskStatus.CANCELLED, reason=reason, finished_at=now, cancel_requested_at=now
    )
    if not removed:
        # Claimed meanwhile, or already running: the dispatcher owns it now and will
        # interrupt it in ComfyUI, then record it as cancelled.
        flagged = Task.objects.filter(
            pk=task.pk, status=TaskStatus.PROCESSING, cancel_requested_at__isnull=True
        ).update(cancel_requested_at=now, reason=reason)
        if not flagged and not Task.objects.filter(pk=task.pk, status=TaskStatus.PROCESSING).exists():
            raise errors.TaskAlreadyFinished()
    queue_changed("cancelled")
    task.refresh_from_db()
    return task


# --- Reading the queue -----------------------------------------------------------------


def queue_position(task: Task) -> int:
    """1-based place among waiting tasks (what "前方还有 N 人排队" shows); 0 once it left the queue."""
    if task.status != TaskStatus.QUEUED:
        return 0
    return Task.objects.queued().filter(_ahead_of(task)).count() + 1


def _ahead_of(task: Task) -> Q:
    """Tasks before `task` in queue order (queue_order, then queued_at, then id)."""
    return (
        Q(queue_order__lt=task.queue_order)
        | Q(queue_order=task.queue_order, queued_at__lt=task.queued_at)
        | Q(queue_order=task.queue_order, queued_at=task.queued_at, id__lt=task.id)
    )


def typical_run_seconds() -> float:
    """Median run time of the class's recent completed runs, for wait estimates."""
    cached = cache.get("typical_run_seconds")
    if cached is not None:
        return cached
    recent = (
        Task.objects.filter(status=TaskStatus.COMPLETED, submitted_at__isnull=False)
        .order_by("-finished_at")
        .values_list("submitted_at", "finished_at")[:RUN_TIME_SAMPLE]
    )
    durations = [(end - start).total_seconds() for start, end in recent]
    value = statistics.median(durations) if durations else DEFAULT_RUN_SECONDS
    cache.set("typical_run_seconds", value, timeout=10)
    return value


def estimated_wait_seconds(
    position: int,
    max_concurrent: int,
    run_seconds: float,
    *,
    free_slots: int = 0,
    after_own_run: bool = False,
) -> int:
    """About how long a waiting task waits: nothing if a slot is free for it (about one run if
    it must first wait for its owner's run), else a run for each round of `max_concurrent`
    slots that must free up before its turn."""
    if position <= 0:
        return 0
    if position <= free_slots:
        return math.ceil(run_seconds) if after_own_run else 0
    return math.ceil(math.ceil((position - free_slots) / max(max_concurrent, 1)) * run_seconds)


@dataclass(frozen=True)
class QueueOverview:
    max_concurrent: int
    processing_count: int
    queue_length: int
    paused: bool

    @property
    def available_slots(self) -> int:
        return max(self.max_concurrent - self.processing_count, 0)


def queue_overview() -> QueueOverview:
    queue_settings = QueueSettings.load()
    return QueueOverview(
        max_concurrent=queue_settings.max_concurrent,
        processing_count=Task.objects.processing().count(),
        queue_length=Task.objects.queued().count(),
        paused=queue_settings.paused,
    )


def describe_new_task(task: Task, queue_settings: QueueSettings) -> dict:
    """`describe_task` of a task just submitted: the queue's counts and the task's place come
    from one query (describe_task alone takes three, and loads the settings again)."""
    processing, queued, ahead, own_running = _queue_counts(task)
    overview = QueueOverview(
        max_concurrent=queue_settings.max_concurrent,
        processing_count=processing,
        queue_length=queued,
        paused=queue_settings.paused,
    )
    # As queue_position: from the task as submitted (queued), even if claimed meanwhile.
    position = ahead + 1 if task.status == TaskStatus.QUEUED else 0
    return describe_task(task, overview=overview, position=position, after_own_run=own_running > 0)


def _queue_counts(task: Task) -> tuple[int, int, int, int]:
    """(processing, queued, queued ahead of `task` as `_ahead_of` orders them, processing of
    `task`'s owner) in one statement.

    Written as SQL because the ORM spends about 4 ms of CPU building this aggregate (three
    filtered counts), far more than the database takes to run it. Values are prepared by the
    model's own fields, so they compare exactly as the ORM's lookups would.
    """
    meta = Task._meta
    column = {name: connection.ops.quote_name(meta.get_field(name).column) for name in _COUNTED_FIELDS}
    status, order, queued_at, pk, owner = (column[name] for name in _COUNTED_FIELDS)
    sql = (
        f"SELECT COUNT(CASE WHEN {status} = %s THEN 1 END),"
        f" COUNT(CASE WHEN {status} = %s AND {owner} = %s THEN 1 END),"
        f" COUNT(CASE WHEN {status} = %s THEN 1 END),"
        f" COUNT(CASE WHEN {status} = %s AND ({order} < %s"
        f" OR ({order} = %s AND {queued_at} < %s)"
        f" OR ({order} = %s AND {queued_at} = %s AND {pk} < %s)) THEN 1 END)"
        f" FROM {connection.ops.quote_name(meta.db_table)} WHERE {status} IN (%s, %s)"
    )
    processing, queued = TaskStatus.PROCESSING.value, TaskStatus.QUEUED.value
    queued_at_value = meta.get_field("queued_at").get_db_prep_value(task.queued_at, connection)
    pk_value = meta.get_field("id").get_db_prep_value(task.pk, connection)
    params = [
        processing,
        processing,
        task.owner_id,
        queued,
        queued,
        task.queue_order,
        task.queue_order,
        queued_at_value,
        task.queue_order,
        queued_at_value,
        pk_value,
        queued,
        processing,
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return row[0], row[2], row[3], row[1]


_COUNTED_FIELDS = ("status", "queue_order", "queued_at", "id", "owner")


def status_message(task: Task, position: int, overview: QueueOverview, *, after_own_run: bool = False) -> str:
    if task.status == TaskStatus.QUEUED:
        if overview.paused:
            return _("The queue is paused by the teacher; %(count)d ahead of you.") % {"count": position}
        if position <= overview.available_slots:
            if after_own_run:
                # A free slot, but the student's ComfyUI runs one workflow at a time.
                return _("Your previous run is still going; this one starts right after it.")
            return _("Starting now.")
        return _("The system is busy: %(count)d ahead of you in the queue.") % {"count": position}
    if task.status == TaskStatus.PROCESSING:
        if task.cancel_requested_at:
            return _("Stopping the run…")
        return _("Running.")
    if task.status == TaskStatus.COMPLETED:
        return _("Finished.")
    if task.status == TaskStatus.CANCELLED:
        return _("Cancelled.")
    return task.error_message or _("The run failed.")


def describe_task(
    task: Task,
    *,
    overview: QueueOverview | None = None,
    position: int | None = None,
    run_seconds: float | None = None,
    after_own_run: bool | None = None,
) -> dict:
    """The task as students, the API and the WebSocket see it.

    `after_own_run`: a waiting task whose owner has a run going, which it must wait for
    whatever the free slots (one run at a time on a student's ComfyUI).
    """
    overview = overview or queue_overview()
    if position is None:
        position = queue_position(task)
    if run_seconds is None:
        run_seconds = typical_run_seconds() if position else 0.0
    if task.status != TaskStatus.QUEUED:
        after_own_run = False
    elif after_own_run is None:
        after_own_run = Task.objects.processing().filter(owner_id=task.owner_id).exists()
    return {
        "task_id": str(task.id),
        "prompt_id": str(task.id),
        "status": task.status,
        "reason": task.reason,
        "position": position,
        "estimated_wait_seconds": estimated_wait_seconds(
            position,
            overview.max_concurrent,
            run_seconds,
            free_slots=overview.available_slots,
            after_own_run=after_own_run,
        ),
        "message": status_message(task, position, overview, after_own_run=after_own_run),
        "after_own_run": after_own_run,
        "username": task.owner.get_username(),
        "port": task.port,
        "queued_at": task.queued_at.isoformat(),
        "started_at": task.started_at.isoformat() if task.started_at else None,
        "finished_at": task.finished_at.isoformat() if task.finished_at else None,
        "error": task.comfy_error,
        "node_errors": task.node_errors or {},
        "max_concurrent": overview.max_concurrent,
        "processing_count": overview.processing_count,
        "queue_length": overview.queue_length,
        "paused": overview.paused,
    }


def queued_tasks_in_order():
    return Task.objects.queued().in_queue_order().select_related("owner")
