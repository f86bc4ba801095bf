"""The dispatcher's state transitions: the lease, claiming the next task, recording how it ended.

Every write here is fenced by the lease epoch: it happens only while the writer still
holds the lease it acquired, checked inside the same transaction (the lease row is
locked on PostgreSQL; SQLite's IMMEDIATE transactions serialize writers anyway). So a
dispatcher that was paused past its lease and resumes finds its writes refused.
The web side's transitions (submit, cancel) live in `services.queue`.
"""

import functools
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from django.db import connection, transaction
from django.db.models import Exists, F, OuterRef, Q
from django.utils import timezone
from django.utils.translation import gettext as _

from comfyproxy.comfy.client import ComfyError, ComfyRejected, ComfyUnreachable, HistoryEntry
from comfyproxy.models import (
    INSTANCE_LIVE_STATES,
    ComfyInstance,
    DispatcherLease,
    InstanceState,
    QueueSettings,
    Task,
    TaskReason,
    TaskStatus,
)
from comfyproxy.services.queue import typical_run_seconds

# A claim normally takes the first candidate; more are tried only when a concurrent
# cancel (PostgreSQL, READ COMMITTED) took one away between the scan and the UPDATE.
CLAIM_CANDIDATES = 5


@functools.cache
def _hot_statements(vendor: str) -> dict[str, str]:
    """The statements run for every task (fence, claim, submitted, finish), written out once.

    Building them with the ORM was about a third of the dispatcher's CPU per task; these are
    the same statements. Statuses are literals, so SQLite can use the partial index on
    waiting tasks (it cannot tell that a bound parameter matches the index's condition).
    """
    ops = connection.ops
    q = ops.quote_name
    task, lease, instance = Task._meta.db_table, DispatcherLease._meta.db_table, ComfyInstance._meta.db_table
    queued, processing = f"'{TaskStatus.QUEUED}'", f"'{TaskStatus.PROCESSING}'"
    lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
    finish_set = (
        f"SET {q('status')} = %s, {{reason}}, {q('error_message')} = %s, {q('comfy_error')} = %s, "
        f"{q('node_errors')} = %s, {q('outputs')} = %s, {q('finished_at')} = %s "
        f"WHERE {q('id')} = %s AND {q('status')} = {processing}"
    )
    return {
        "fence": f"SELECT 1 FROM {q(lease)} WHERE {q('id')} = 1 AND {q('holder')} = %s AND {q('epoch')} = %s"
        + lock,
        "running_on": f"SELECT {q('instance_id')} FROM {q(task)} WHERE {q('status')} = {processing}",
        # Eligible: the student's instance runs at the task's address and runs nothing of ours.
        "candidates": (
            f"SELECT t.{q('id')} FROM {q(task)} t WHERE t.{q('status')} = {queued} "
            f"AND EXISTS (SELECT 1 FROM {q(instance)} i WHERE i.{q('id')} = t.{q('instance_id')} "
            f"AND i.{q('state')} = '{InstanceState.RUNNING}' AND i.{q('host')} = t.{q('host')} "
            f"AND i.{q('port')} = t.{q('port')}) "
            f"AND NOT EXISTS (SELECT 1 FROM {q(task)} p WHERE p.{q('status')} = {processing} "
            f"AND p.{q('instance_id')} = t.{q('instance_id')}) "
            f"ORDER BY t.{q('queue_order')}, t.{q('queued_at')}, t.{q('id')} LIMIT {CLAIM_CANDIDATES}"
        ),
        "claim": (
            f"UPDATE {q(task)} SET {q('status')} = {processing}, {q('started_at')} = %s, "
            f"{q('dispatch_attempts')} = {q('dispatch_attempts')} + 1 "
            f"WHERE {q('id')} = %s AND {q('status')} = {queued}"
        ),
        "submitted": (
            f"UPDATE {q(task)} SET {q('submitted_at')} = %s, {q('comfy_number')} = %s "
            f"WHERE {q('id')} = %s AND {q('status')} = {processing} AND {q('submitted_at')} IS NULL"
        ),
        "finish": f"UPDATE {q(task)} " + finish_set.format(reason=f"{q('reason')} = %s"),
        # A cancelled task keeps the reason cancel_task recorded (by the student or a teacher).
        "finish_cancelled": f"UPDATE {q(task)} "
        + finish_set.format(
            reason=f"{q('reason')} = CASE WHEN {q('reason')} = '' THEN %s ELSE {q('reason')} END"
        ),
    }


def _execute(name: str, params=()) -> tuple[int, list]:
    """Run one of the hot statements: (rows changed, rows read)."""
    with connection.cursor() as cursor:
        cursor.execute(_hot_statements(connection.vendor)[name], params)
        return cursor.rowcount, cursor.fetchall() if cursor.description else []


def _db(field_name: str, value):
    """A Python value as saving it to the Task column `field_name` would store it."""
    return Task._meta.get_field(field_name).get_db_prep_save(value, connection)


class LeaseLost(Exception):
    """The lease belongs to another dispatcher now: this one must not change anything."""


@dataclass(frozen=True)
class Predecessor:
    """Who held the lease (and its epoch) just before a dispatcher took it over."""

    holder: str
    epoch: int


@dataclass(frozen=True)
class Lease:
    holder: str
    epoch: int
    # The holder this taking replaced, when it was another dispatcher (None: nobody, or us).
    predecessor: Predecessor | None = field(default=None, compare=False)


def new_holder_name() -> str:
    """Unique per process start, so a restarted dispatcher never mistakes the old lease for its own."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


# --- The lease ---------------------------------------------------------------------------


def acquire_lease(holder: str, duration: timedelta) -> Lease | None:
    """Take the lease if it is free or expired; each taking starts a new epoch.

    The Lease names the holder it replaced (read under the same lock as the update): its
    claims that never reached ComfyUI are in doubt until it provably stopped sending
    (see `stopped_sending`).
    """
    with transaction.atomic():
        DispatcherLease.objects.get_or_create(pk=1)
        before = DispatcherLease.objects.select_for_update().values("holder", "epoch").get(pk=1)
        now = timezone.now()
        taken = DispatcherLease.objects.filter(
            Q(expires_at__isnull=True) | Q(expires_at__lte=now), pk=1
        ).update(
            holder=holder,
            epoch=F("epoch") + 1,
            acquired_at=now,
            renewed_at=now,
            expires_at=now + duration,
        )
        if not taken:
            return None
        epoch = DispatcherLease.objects.values_list("epoch", flat=True).get(pk=1)
    replaced = before["holder"] if before["holder"] and before["holder"] != holder else None
    predecessor = Predecessor(replaced, before["epoch"]) if replaced else None
    return Lease(holder=holder, epoch=epoch, predecessor=predecessor)


def renew_lease(lease: Lease, duration: timedelta) -> bool:
    """Extend the lease; False once another dispatcher has taken it (a new epoch).

    A lease that ran out while nobody else took it is still ours: the epoch proves
    that no one else wrote in between. `renewed_at` is the heartbeat /healthz reads.
    """
    now = timezone.now()
    return bool(
        DispatcherLease.objects.filter(pk=1, holder=lease.holder, epoch=lease.epoch).update(
            renewed_at=now, expires_at=now + duration
        )
    )


def release_lease(lease: Lease) -> None:
    """Let a successor take over at once (a clean shutdown)."""
    DispatcherLease.objects.filter(pk=1, holder=lease.holder, epoch=lease.epoch).update(
        expires_at=timezone.now()
    )


def holder_process_gone(holder: str, *, hostname: str | None = None) -> bool:
    """The holder ran on this host and its process no longer exists (or is a zombie).

    Holder names are `host:pid:random` (`new_holder_name`). A holder on another host, or a
    name that does not parse, is never known gone from here. A reused pid only makes us
    wait longer (never shorter), so that is safe.
    """
    parts = holder.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit() or parts[0] != (hostname or socket.gethostname()):
        return False
    pid = int(parts[1])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it exists (another user's process)
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The state follows the command name, which is in parentheses and may hold spaces.
            return stat.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def stopped_sending(
    predecessor: Predecessor,
    *,
    announced: bool,
    waited_seconds: float,
    bound_seconds: float,
    hostname: str | None = None,
) -> bool:
    """Can the previous lease holder still send a POST /prompt it checked its lease for?

    A holder paused (SIGSTOP, a VM freeze) right after its lease check sends its POST when
    it resumes, whatever the lease says; ComfyUI does not de-duplicate prompt ids. So a claim
    it left that ComfyUI does not have is resubmitted only once it provably stopped: its
    process is gone (same host), or it announced that it stopped sending after finding its
    lease lost (`announced`), or — for a holder on another host that never announces (Redis
    down, or it never resumed) — `bound_seconds` passed. That bound is the limit of the
    guarantee: a holder paused longer than it, on another host, and unable to announce,
    can still duplicate a prompt.
    """
    return (
        announced
        or holder_process_gone(predecessor.holder, hostname=hostname)
        or (waited_seconds >= bound_seconds)
    )


def stopped_sending_key(holder: str, epoch: int) -> str:
    """The Redis key a dispatcher sets once nothing it sent under that lease epoch can still go out.

    Per epoch: a holder that lost the lease may take it again later and send again.
    """
    return f"comfyproxy:dispatcher:stopped:{holder}:{epoch}"


def dispatcher_heartbeat() -> DispatcherLease | None:
    """The lease row: who dispatches, and when it last said it is alive (`renewed_at`)."""
    return DispatcherLease.objects.filter(pk=1).first()


def warm_up() -> None:
    """On the dispatcher's database thread at start: open its connection and prepare what
    the first claim and snapshot would otherwise prepare in the middle of a hand-off."""
    connection.ensure_connection()
    _hot_statements(connection.vendor)
    QueueSettings.load()
    typical_run_seconds()  # the snapshot's cache read loads django-redis's serializer


def _fence(lease: Lease) -> None:
    """Inside a write transaction: go on only while the lease is still this epoch's."""
    if not _execute("fence", [lease.holder, lease.epoch])[1]:
        raise LeaseLost(f"lease epoch {lease.epoch} of {lease.holder} is no longer current")


# --- Claiming ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Assignment:
    """A task the dispatcher runs, with the live settings read when it was claimed."""

    task: Task
    run_timeout_seconds: int
    free_memory_after: bool


def _instance_at_task_address(states):
    return ComfyInstance.objects.filter(
        pk=OuterRef("instance_id"), state__in=states, host=OuterRef("host"), port=OuterRef("port")
    )


def fail_orphaned_tasks(lease: Lease) -> int:
    """Queued tasks whose instance is gone (or now lives elsewhere) can never run: end them."""
    with transaction.atomic():
        _fence(lease)
        return (
            Task.objects.queued()
            .filter(~Exists(_instance_at_task_address(INSTANCE_LIVE_STATES)))
            .update(
                status=TaskStatus.FAILED,
                reason=TaskReason.INSTANCE_STOPPED,
                error_message=_("Your ComfyUI stopped before this task could run."),
                finished_at=timezone.now(),
            )
        )


@dataclass(frozen=True)
class Claim:
    """What one claim did: the task it started (if any) and how many slots are still free."""

    assignment: Assignment | None
    free_slots: int


def claim(lease: Lease) -> Claim:
    """Move the oldest eligible queued task to processing, if the cap and pause allow.

    Eligible: its student's instance runs at the task's address and runs nothing else
    for us (one task per instance; a student's second task never blocks the others).
    The cap and pause are read fresh, so a teacher's change applies to the next claim;
    the running count is the processing rows themselves, never a counter.
    """
    with transaction.atomic():
        _fence(lease)
        return _claim_fenced()


def _claim_fenced() -> Claim:
    """`claim` inside a write transaction whose lease fence has passed."""
    # Read the clock once the write lock is ours, so no timestamp precedes a row it follows.
    now = timezone.now()
    queue_settings = QueueSettings.load()
    if queue_settings.paused:
        return Claim(None, free_slots=0)
    running_on = _execute("running_on")[1]
    free_slots = queue_settings.max_concurrent - len(running_on)
    if free_slots <= 0:
        return Claim(None, free_slots=0)
    started_at = _db("started_at", now)
    for (task_id,) in _execute("candidates")[1]:
        if _execute("claim", [started_at, task_id])[0]:
            task = Task.objects.select_related("owner").get(pk=task_id)
            assignment = Assignment(
                task=task,
                run_timeout_seconds=queue_settings.effective_run_timeout_seconds,
                free_memory_after=queue_settings.free_memory_after_task,
            )
            return Claim(assignment, free_slots=free_slots - 1)
    return Claim(None, free_slots=free_slots)


def claim_next_task(lease: Lease) -> Assignment | None:
    """The next task, if one could start now (`claim` also says how many slots stay free)."""
    return claim(lease).assignment


def processing_assignments() -> list[Assignment]:
    """Every task marked processing: what a dispatcher reconciles when it takes the lease."""
    queue_settings = QueueSettings.load()
    return [
        Assignment(
            task=task,
            run_timeout_seconds=queue_settings.effective_run_timeout_seconds,
            free_memory_after=queue_settings.free_memory_after_task,
        )
        for task in Task.objects.processing().select_related("owner").order_by("started_at")
    ]


def cancel_requested_among(task_ids) -> set:
    """Which of these running tasks a student or teacher asked to cancel."""
    return set(
        Task.objects.processing()
        .filter(pk__in=list(task_ids), cancel_requested_at__isnull=False)
        .values_list("pk", flat=True)
    )


def mark_submitted(lease: Lease, task_id, *, number: float | None) -> bool:
    """ComfyUI has the prompt (it accepted it, or it was found there after a crash)."""
    with transaction.atomic():
        _fence(lease)
        changed, _rows = _execute(
            "submitted", [_db("submitted_at", timezone.now()), number, _db("id", task_id)]
        )
        return bool(changed)


# --- How a run ended ------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    status: str
    reason: str = ""
    message: str = ""
    comfy_error: dict | None = None
    node_errors: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)


def _comfy_message(error: dict) -> str:
    message = str(error.get("message") or "")
    details = str(error.get("details") or "")
    return f"{message}: {details}" if message and details else message or details


def completed(entry: HistoryEntry) -> Outcome:
    return Outcome(TaskStatus.COMPLETED, outputs=entry.outputs)


def cancelled() -> Outcome:
    # The reason (by the student or by a teacher) is the one cancel_task recorded.
    return Outcome(TaskStatus.CANCELLED)


def rejected(error: ComfyRejected) -> Outcome:
    return Outcome(
        TaskStatus.FAILED,
        TaskReason.VALIDATION,
        _("ComfyUI rejected the workflow: %(message)s") % {"message": _comfy_message(error.error)},
        comfy_error=error.error,
        node_errors=error.node_errors,
    )


def execution_failed(entry: HistoryEntry) -> Outcome:
    error = entry.execution_error or {}
    return Outcome(
        TaskStatus.FAILED,
        TaskReason.EXECUTION_ERROR,
        _("The workflow failed at node %(node)s (%(type)s): %(error)s")
        % {
            "node": error.get("node_id", "?"),
            "type": error.get("node_type", "?"),
            "error": error.get("exception_message", "").strip(),
        },
        comfy_error=error,
    )


def interrupted() -> Outcome:
    return Outcome(TaskStatus.FAILED, TaskReason.INTERRUPTED, _("The run was interrupted in ComfyUI."))


def timed_out(seconds: int, *, confirmed: bool) -> Outcome:
    message = _("The run took longer than %(seconds)d seconds and was stopped.") % {"seconds": seconds}
    if not confirmed:
        message += " " + _("ComfyUI did not confirm that it stopped.")
    return Outcome(TaskStatus.FAILED, TaskReason.TIMEOUT, message)


def lost() -> Outcome:
    return Outcome(
        TaskStatus.FAILED,
        TaskReason.LOST,
        _("ComfyUI no longer knows this task (it may have restarted). Please queue it again."),
    )


def comfy_failed(error: ComfyError) -> Outcome:
    """ComfyUI could not take or finish the task: it is gone, unreachable, or answered an error."""
    if isinstance(error, ComfyUnreachable) and error.refused:
        return Outcome(
            TaskStatus.FAILED,
            TaskReason.INSTANCE_STOPPED,
            _("Your ComfyUI stopped while this task was running. Start it again and queue the task."),
            comfy_error={"type": "instance_stopped", "message": str(error)},
        )
    if isinstance(error, ComfyUnreachable):
        return Outcome(
            TaskStatus.FAILED,
            TaskReason.COMFY_UNREACHABLE,
            _("ComfyUI did not answer, so the task was stopped. Please try again later."),
            comfy_error={"type": "comfy_unreachable", "message": str(error)},
        )
    return Outcome(
        TaskStatus.FAILED,
        TaskReason.COMFY_SERVER_ERROR,
        _("ComfyUI answered with an error, so the task could not run: %(error)s") % {"error": error},
        comfy_error={"type": "comfy_server_error", "message": str(error)},
    )


def outcome_of(entry: HistoryEntry, *, cancel_requested: bool, timed_out_after: int | None) -> Outcome:
    """What a finished history entry means for the task (an interrupt we sent has a reason)."""
    if entry.succeeded:
        return completed(entry)
    if entry.interrupted:
        if cancel_requested:
            return cancelled()
        if timed_out_after is not None:
            return timed_out(timed_out_after, confirmed=True)
        return interrupted()
    return execution_failed(entry)


# What the dispatcher logs about a finished task; never the workflow or its outputs.
FINISHED_FIELDS = (
    "id",
    "owner__username",
    "host",
    "port",
    "status",
    "reason",
    "error_message",
    "queued_at",
    "started_at",
    "submitted_at",
    "finished_at",
)


def finish_task(lease: Lease, task_id, outcome: Outcome) -> Task | None:
    """Record the end of a processing task; None if it was not processing any more.

    The task returned carries FINISHED_FIELDS only (what the log line needs).
    """
    with transaction.atomic():
        _fence(lease)
        return _finish_fenced(task_id, outcome)


def finish_task_and_claim(lease: Lease, task_id, outcome: Outcome) -> tuple[Task | None, Claim]:
    """`finish_task`, then `claim` for the slot it freed, in one transaction.

    The hand-off's two writes in one: during a burst of completions each would otherwise
    wait for the write lock (and the dispatcher's database thread) on its own.
    """
    return finish_tasks_and_claim(lease, [(task_id, outcome)])[0]


def finish_tasks_and_claim(lease: Lease, ends) -> list[tuple[Task | None, Claim]]:
    """`finish_task_and_claim` for each (task id, outcome) of runs that ended together, in
    order, in one transaction: a class's first runs end within milliseconds of each other,
    and one transaction each queued them behind one another.
    """
    with transaction.atomic():
        _fence(lease)
        return [(_finish_fenced(task_id, outcome), _claim_fenced()) for task_id, outcome in ends]


def _finish_fenced(task_id, outcome: Outcome) -> Task | None:
    """`finish_task` inside a write transaction whose lease fence has passed."""
    cancelled = outcome.status == TaskStatus.CANCELLED
    changed, _rows = _execute(
        "finish_cancelled" if cancelled else "finish",
        [
            outcome.status,
            TaskReason.CANCELLED_BY_OWNER if cancelled else outcome.reason,
            outcome.message,
            _db("comfy_error", outcome.comfy_error),
            _db("node_errors", outcome.node_errors),
            _db("outputs", outcome.outputs),
            _db("finished_at", timezone.now()),
            _db("id", task_id),
        ],
    )
    if not changed:
        return None
    return Task.objects.select_related("owner").only(*FINISHED_FIELDS).get(pk=task_id)
