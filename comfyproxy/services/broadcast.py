"""Live queue state for students and teachers: one broadcast of absolute state per change.

Per-user sends lose updates under load (the channel layer is at-most-once with a shared
capacity); one broadcast that every consumer filters for its own user does not. The
database stays the truth: a client that (re)connects is sent the current state at once.
"""

from datetime import timedelta

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.utils import timezone

from comfyproxy.models import Task
from comfyproxy.services.queue import describe_task, queue_overview, typical_run_seconds

QUEUE_GROUP = "comfyproxy.queue"
# Finished tasks stay in the stream this long, so a student sees "completed" or the error.
RECENTLY_FINISHED = timedelta(minutes=5)


def build_queue_snapshot() -> dict:
    overview = queue_overview()
    run_seconds = typical_run_seconds()
    since = timezone.now() - RECENTLY_FINISHED
    queued = list(Task.objects.queued().in_queue_order().select_related("owner"))
    running = list(Task.objects.processing().order_by("started_at").select_related("owner"))
    finished = list(
        Task.objects.finished().filter(finished_at__gte=since).order_by("-finished_at").select_related("owner")
    )
    by_owner: dict[str, list[dict]] = {}
    waiting, active = [], []
    for rank, task in enumerate(queued, start=1):
        state = describe_task(task, overview=overview, position=rank, run_seconds=run_seconds)
        waiting.append(state)
        by_owner.setdefault(str(task.owner_id), []).append(state)
    for task in running:
        state = describe_task(task, overview=overview, position=0, run_seconds=run_seconds)
        active.append(state)
        by_owner.setdefault(str(task.owner_id), []).append(state)
    for task in finished:
        state = describe_task(task, overview=overview, position=0, run_seconds=run_seconds)
        by_owner.setdefault(str(task.owner_id), []).append(state)
    return {
        "queue": {
            "max_concurrent": overview.max_concurrent,
            "processing_count": overview.processing_count,
            "queue_length": overview.queue_length,
            "available_slots": overview.available_slots,
            "paused": overview.paused,
            "typical_run_seconds": run_seconds,
        },
        "running": active,
        "waiting": waiting,
        "by_owner": by_owner,
        "generated_at": timezone.now().isoformat(),
    }


def snapshot_for_user(snapshot: dict, user_id: int, *, is_staff: bool) -> dict:
    message = {"type": "queue", "queue": snapshot["queue"], "tasks": snapshot["by_owner"].get(str(user_id), [])}
    if is_staff:
        message["running"] = snapshot["running"]
        message["waiting"] = snapshot["waiting"]
    return message


async def broadcast_queue_snapshot() -> dict:
    snapshot = await sync_to_async(build_queue_snapshot, thread_sensitive=True)()
    await get_channel_layer().group_send(QUEUE_GROUP, {"type": "queue.snapshot", "snapshot": snapshot})
    return snapshot


__all__ = ["QUEUE_GROUP", "broadcast_queue_snapshot", "build_queue_snapshot", "snapshot_for_user"]
