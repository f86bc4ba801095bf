"""Live queue state for students and teachers: one broadcast of absolute state per change.

Per-user sends lose updates under load (the channel layer is at-most-once with a shared
capacity); one broadcast that every consumer filters for its own viewer does not. The
dispatcher calls `broadcast_queue_snapshot()` after each change (coalescing bursts on its
side); a socket that (re)connects is sent the same state read from the database at once.

Every consumer in a process decodes every broadcast, so the message is shaped to make that
cheap: each owner's tasks are pre-rendered JSON bytes in one map, and a consumer copies
out its own entry into the frame it sends without decoding anyone else's tasks. Teachers'
sockets listen on their own group, whose message also carries the whole board.
"""

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext as _
from redis.exceptions import RedisError

from comfyproxy.models import ACTIVE_STATUSES, TERMINAL_STATUSES, QueueSettings, Task, TaskStatus
from comfyproxy.services.queue import QueueOverview, estimated_wait_seconds, typical_run_seconds

logger = logging.getLogger(__name__)

# Sockets that show one person's tasks (students, and anyone on a student's ComfyUI page).
OWNERS_GROUP = "comfyproxy.queue.owners"
# Teachers' sockets: their own tasks and the whole queue.
TEACHERS_GROUP = "comfyproxy.queue.teachers"
SNAPSHOT_EVENT = "queue.snapshot"

# Finished tasks stay in the stream this long, so a student sees "completed" or the error.
RECENTLY_FINISHED = timedelta(minutes=5)
FINISHED_PER_OWNER = 5
FINISHED_ON_BOARD = 50

# Only what the snapshot reads, as plain rows (`_SnapshotRow`): a task row also holds the
# whole workflow (often hundreds of kB of UI graph in extra_data), which a snapshot must never
# load, and tuples instead of model instances keep a class-sized snapshot to a few ms.
DESCRIBED_FIELDS = (
    "id",
    "queue_order",
    "owner_id",
    "owner__username",  # replaced by the user model's USERNAME_FIELD, see _described_fields()
    "status",
    "reason",
    "port",
    "queued_at",
    "started_at",
    "finished_at",
    "cancel_requested_at",
    "error_message",
    "comfy_error",
    "node_errors",
)
(
    _ID,
    _QUEUE_ORDER,
    _OWNER_ID,
    _USERNAME,
    _STATUS,
    _REASON,
    _PORT,
    _QUEUED_AT,
    _STARTED_AT,
    _FINISHED_AT,
    _CANCEL_REQUESTED_AT,
    _ERROR_MESSAGE,
    _COMFY_ERROR,
    _NODE_ERRORS,
) = range(len(DESCRIBED_FIELDS))
_TERMINAL = frozenset(TERMINAL_STATUSES)


def _described_fields() -> tuple[str, ...]:
    username = f"owner__{get_user_model().USERNAME_FIELD}"
    return tuple(username if name == "owner__username" else name for name in DESCRIBED_FIELDS)


class _Describer:
    """`queue.describe_task` for snapshot rows, with the same keys, values and messages.

    describe_task works on a model instance and translates its message per call; a snapshot
    describes every task of the class at once, so the translations and the queue-wide
    values are looked up once per snapshot here. tests/test_consumers.py checks that both
    give the same dict for every state a task can be in.
    """

    def __init__(self, overview: QueueOverview, run_seconds: float):
        self.overview = overview
        self.run_seconds = run_seconds
        self.queue_fields = {
            "max_concurrent": overview.max_concurrent,
            "processing_count": overview.processing_count,
            "queue_length": overview.queue_length,
            "paused": overview.paused,
        }
        self.paused_message = _("The queue is paused by the teacher; %(count)d ahead of you.")
        self.starting_message = _("Starting now.")
        self.after_own_run_message = _("Your previous run is still going; this one starts right after it.")
        self.busy_message = _("The system is busy: %(count)d ahead of you in the queue.")
        self.fixed_messages = {
            TaskStatus.COMPLETED: _("Finished."),
            TaskStatus.CANCELLED: _("Cancelled."),
        }
        self.stopping_message = _("Stopping the run…")
        self.running_message = _("Running.")
        self.failed_message = _("The run failed.")

    def message(self, row, position: int, after_own_run: bool) -> str:
        # The same decisions as queue.status_message.
        status = row[_STATUS]
        if status == TaskStatus.QUEUED:
            if self.overview.paused:
                return self.paused_message % {"count": position}
            if position <= self.overview.available_slots:
                return self.after_own_run_message if after_own_run else self.starting_message
            return self.busy_message % {"count": position}
        if status == TaskStatus.PROCESSING:
            return self.stopping_message if row[_CANCEL_REQUESTED_AT] else self.running_message
        fixed = self.fixed_messages.get(status)
        if fixed is not None:
            return fixed
        return row[_ERROR_MESSAGE] or self.failed_message

    def describe(self, row, position: int, *, after_own_run: bool = False) -> dict:
        task_id = str(row[_ID])
        after_own_run = after_own_run and row[_STATUS] == TaskStatus.QUEUED
        started_at, finished_at = row[_STARTED_AT], row[_FINISHED_AT]
        return {
            "task_id": task_id,
            "prompt_id": task_id,
            "status": row[_STATUS],
            "reason": row[_REASON],
            "position": position,
            "estimated_wait_seconds": estimated_wait_seconds(
                position,
                self.overview.max_concurrent,
                self.run_seconds,
                free_slots=self.overview.available_slots,
                after_own_run=after_own_run,
            ),
            "message": self.message(row, position, after_own_run),
            "after_own_run": after_own_run,
            "username": row[_USERNAME],
            "port": row[_PORT],
            "queued_at": row[_QUEUED_AT].isoformat(),
            "started_at": started_at.isoformat() if started_at else None,
            "finished_at": finished_at.isoformat() if finished_at else None,
            "error": row[_COMFY_ERROR],
            "node_errors": row[_NODE_ERRORS] or {},
            **self.queue_fields,
        }


@dataclass(frozen=True)
class Viewer:
    """Whose tasks a socket shows, and whether it also shows the whole queue (teachers)."""

    user_id: int
    whole_queue: bool = False

    @property
    def group(self) -> str:
        return TEACHERS_GROUP if self.whole_queue else OWNERS_GROUP


@dataclass(frozen=True)
class QueueSnapshot:
    as_of: float
    queue: dict
    tasks_by_owner: dict[int, list[dict]]
    board: dict | None


def _rendered(value) -> bytes:
    return json.dumps(value, cls=DjangoJSONEncoder, ensure_ascii=False, separators=(",", ":")).encode()


def _queue_summary(overview: QueueOverview, run_seconds: float) -> dict:
    return {
        "max_concurrent": overview.max_concurrent,
        "processing_count": overview.processing_count,
        "queue_length": overview.queue_length,
        "available_slots": overview.available_slots,
        "paused": overview.paused,
        "typical_run_seconds": run_seconds,
    }


def read_queue_snapshot(*, owner_id: int | None = None) -> QueueSnapshot:
    """The queue as it is now; with `owner_id`, only that person's tasks (and no board).

    The tasks shown come from one statement, so a task claimed while they are read is either
    waiting or running in the snapshot, never both; for the whole queue the counts and
    positions come from that same statement too. `as_of` is taken before reading, so a
    consumer can tell which of two snapshots saw the later state and never replace a newer
    one with an older.
    """
    as_of = time.time()
    queue_settings = QueueSettings.load()
    run_seconds = typical_run_seconds()
    shown_filter = Q(status__in=ACTIVE_STATUSES) | Q(finished_at__gte=timezone.now() - RECENTLY_FINISHED)
    # Sorted below, not by the database: the default ordering would have it scan every task
    # ever run rather than look the shown ones up by index.
    described = Task.objects.order_by().values_list(*_described_fields())
    if owner_id is None:
        shown = list(described.filter(shown_filter))
        active = [
            (row[_ID], row[_STATUS], row[_QUEUE_ORDER], row[_QUEUED_AT])
            for row in shown
            if row[_STATUS] not in _TERMINAL
        ]
    else:
        # Positions and counts need everyone's waiting and running tasks, but only a few
        # columns of them (a class reconnecting at once reads this once per socket).
        active = list(
            Task.objects.active().order_by().values_list("id", "status", "queue_order", "queued_at")
        )
        shown = list(described.filter(shown_filter, owner_id=owner_id))

    # A waiting task's position is its rank among all waiting tasks, whoever owns them.
    waiting = sorted(
        (row for row in active if row[1] == TaskStatus.QUEUED), key=lambda row: (row[2], row[3], row[0])
    )
    rank = {row[0]: position for position, row in enumerate(waiting, start=1)}
    overview = QueueOverview(
        max_concurrent=queue_settings.max_concurrent,
        processing_count=sum(1 for row in active if row[1] == TaskStatus.PROCESSING),
        queue_length=len(waiting),
        paused=queue_settings.paused,
    )
    # Submitted after the positions were read (owner_id only): behind everyone seen.
    unranked = len(rank) + 1
    queued = sorted(
        (row for row in shown if row[_STATUS] == TaskStatus.QUEUED),
        key=lambda row: rank.get(row[_ID], unranked),
    )
    running = sorted(
        (row for row in shown if row[_STATUS] == TaskStatus.PROCESSING), key=lambda row: row[_STARTED_AT]
    )
    finished = sorted(
        (row for row in shown if row[_STATUS] in _TERMINAL), key=lambda row: row[_FINISHED_AT], reverse=True
    )
    describer = _Describer(overview, run_seconds)
    running_states = [describer.describe(row, 0) for row in running]
    # Every running task of an owner is shown (in both modes), so this is complete for them.
    owners_running = {row[_OWNER_ID] for row in running}
    queued_states = [
        describer.describe(row, rank.get(row[_ID], unranked), after_own_run=row[_OWNER_ID] in owners_running)
        for row in queued
    ]
    finished_shown = Counter()
    finished_rows = []
    for position, row in enumerate(finished):
        # Only what some list shows: the newest few per owner, and the board's newest.
        owner_shown = finished_shown[row[_OWNER_ID]] < FINISHED_PER_OWNER
        if owner_shown:
            finished_shown[row[_OWNER_ID]] += 1
        if owner_shown or (owner_id is None and position < FINISHED_ON_BOARD):
            finished_rows.append((row, owner_shown, position))
    tasks_by_owner: dict[int, list[dict]] = {}
    for row, state in zip(running + queued, running_states + queued_states, strict=True):
        tasks_by_owner.setdefault(row[_OWNER_ID], []).append(state)
    board_finished = []
    for row, owner_shown, position in finished_rows:
        state = describer.describe(row, 0)
        if position < FINISHED_ON_BOARD:
            board_finished.append(state)
        if owner_shown:
            tasks_by_owner.setdefault(row[_OWNER_ID], []).append(state)

    board = None
    if owner_id is None:
        board = {"running": running_states, "waiting": queued_states, "finished": board_finished}
    return QueueSnapshot(as_of, _queue_summary(overview, run_seconds), tasks_by_owner, board)


def read_viewer_state(viewer: Viewer) -> dict:
    """What a socket is sent the moment it connects, as a layer event of the broadcast's shape."""
    if viewer.whole_queue:
        return snapshot_events(read_queue_snapshot())[TEACHERS_GROUP]
    return snapshot_events(read_queue_snapshot(owner_id=viewer.user_id))[OWNERS_GROUP]


def snapshot_events(snapshot: QueueSnapshot) -> dict[str, dict]:
    """The channel-layer event for each group, with every part pre-rendered as JSON bytes."""
    # A task's state is in its owner's list and on the board: render each one once and join
    # the lists from the parts (the same bytes as rendering each list whole).
    rendered: dict[int, bytes] = {}

    def rendered_list(states: list[dict]) -> bytes:
        parts = []
        for state in states:
            part = rendered.get(id(state))
            if part is None:
                part = rendered[id(state)] = _rendered(state)
            parts.append(part)
        return b"[" + b",".join(parts) + b"]"

    owners_event = {
        "type": SNAPSHOT_EVENT,
        "as_of": snapshot.as_of,
        "queue": _rendered(snapshot.queue),
        # msgpack map keys must be strings.
        "tasks": {str(owner): rendered_list(tasks) for owner, tasks in snapshot.tasks_by_owner.items()},
    }
    events = {OWNERS_GROUP: owners_event}
    if snapshot.board is not None:
        board = b"".join(
            [
                b'{"running":',
                rendered_list(snapshot.board["running"]),
                b',"waiting":',
                rendered_list(snapshot.board["waiting"]),
                b',"finished":',
                rendered_list(snapshot.board["finished"]),
                b"}",
            ]
        )
        events[TEACHERS_GROUP] = {**owners_event, "board": board}
    return events


def render_frame(event: dict, viewer: Viewer) -> str:
    """The WebSocket text frame for one viewer, spliced from the event's pre-rendered parts.

    `{"type": "queue", "as_of", "queue": {...}, "tasks": [own tasks]}`, and for teachers
    also `"board": {"running", "waiting", "finished"}`.
    """
    parts = [
        b'{"type":"queue","as_of":',
        repr(event["as_of"]).encode(),
        b',"queue":',
        event["queue"],
        b',"tasks":',
        event["tasks"].get(str(viewer.user_id), b"[]"),
    ]
    if viewer.whole_queue:
        parts += [b',"board":', event["board"]]
    parts.append(b"}")
    return b"".join(parts).decode()


async def broadcast_queue_snapshot() -> QueueSnapshot | None:
    """Send every live socket the queue as it is now. Call after the change has committed.

    Best effort, like the channel layer itself: if Redis is unreachable the change is not
    lost, since clients reconcile from the database when they reconnect or poll.
    """
    # Its connection goes back after the read, not held by a thread shared by the process.
    snapshot = await database_sync_to_async(read_queue_snapshot)()
    layer = get_channel_layer()
    try:
        for group, event in snapshot_events(snapshot).items():
            await layer.group_send(group, event)
    except (RedisError, OSError) as exc:
        logger.warning("could not broadcast the queue: %s", exc)
        return None
    return snapshot
