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
from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import Q
from django.utils import timezone
from redis.exceptions import RedisError

from comfyproxy.models import ACTIVE_STATUSES, QueueSettings, Task, TaskStatus
from comfyproxy.services.queue import QueueOverview, describe_task, typical_run_seconds

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

# Only what the snapshot reads: a task row also holds the whole workflow (often
# hundreds of kB of UI graph in extra_data), which a snapshot must never load.
DESCRIBED_FIELDS = (
    "id",
    "queue_order",
    "owner",
    "owner__username",
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
    described = Task.objects.only(*DESCRIBED_FIELDS).select_related("owner")
    if owner_id is None:
        shown = list(described.filter(shown_filter))
        active = [
            (task.id, task.status, task.queue_order, task.queued_at) for task in shown if not task.is_terminal
        ]
    else:
        # Positions and counts need everyone's waiting and running tasks, but only a few
        # columns of them (a class reconnecting at once reads this once per socket).
        active = list(Task.objects.active().values_list("id", "status", "queue_order", "queued_at"))
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
        (task for task in shown if task.status == TaskStatus.QUEUED),
        key=lambda task: rank.get(task.id, unranked),
    )
    running = sorted(
        (task for task in shown if task.status == TaskStatus.PROCESSING), key=lambda t: t.started_at
    )
    finished = sorted((task for task in shown if task.is_terminal), key=lambda t: t.finished_at, reverse=True)
    shown = running + queued + finished
    states = {
        task.id: describe_task(
            task,
            overview=overview,
            position=rank.get(task.id, unranked) if task.status == TaskStatus.QUEUED else 0,
            run_seconds=run_seconds,
        )
        for task in shown
    }

    tasks_by_owner: dict[int, list[dict]] = {}
    finished_shown = Counter()
    for task in shown:
        if task.is_terminal:
            if finished_shown[task.owner_id] == FINISHED_PER_OWNER:
                continue
            finished_shown[task.owner_id] += 1
        tasks_by_owner.setdefault(task.owner_id, []).append(states[task.id])

    board = None
    if owner_id is None:
        board = {
            "running": [states[task.id] for task in running],
            "waiting": [states[task.id] for task in queued],
            "finished": [states[task.id] for task in finished[:FINISHED_ON_BOARD]],
        }
    return QueueSnapshot(as_of, _queue_summary(overview, run_seconds), tasks_by_owner, board)


def read_viewer_state(viewer: Viewer) -> dict:
    """What a socket is sent the moment it connects, as a layer event of the broadcast's shape."""
    if viewer.whole_queue:
        return snapshot_events(read_queue_snapshot())[TEACHERS_GROUP]
    return snapshot_events(read_queue_snapshot(owner_id=viewer.user_id))[OWNERS_GROUP]


def snapshot_events(snapshot: QueueSnapshot) -> dict[str, dict]:
    """The channel-layer event for each group, with every part pre-rendered as JSON bytes."""
    owners_event = {
        "type": SNAPSHOT_EVENT,
        "as_of": snapshot.as_of,
        "queue": _rendered(snapshot.queue),
        # msgpack map keys must be strings.
        "tasks": {str(owner): _rendered(tasks) for owner, tasks in snapshot.tasks_by_owner.items()},
    }
    events = {OWNERS_GROUP: owners_event}
    if snapshot.board is not None:
        events[TEACHERS_GROUP] = {**owners_event, "board": _rendered(snapshot.board)}
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
