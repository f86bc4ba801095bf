"""Wake-up signals between processes, sent after the transaction that changed the queue commits.

The signal carries no state: whoever receives it re-reads the database. Losing one (Redis
restarting) only delays the dispatcher until its fallback check, it never loses a task.
"""

import logging

from django.db import transaction
from django_redis import get_redis_connection
from redis.exceptions import RedisError

from comfyproxy.errors import QueueUnavailable

logger = logging.getLogger(__name__)

# The dispatcher subscribes to this channel; every queue change publishes to it.
QUEUE_CHANGED_CHANNEL = "comfyproxy:queue-changed"


def redis_connection():
    return get_redis_connection("default")


def ensure_queue_available() -> None:
    """Refuse new work while Redis is down: live positions and fast hand-off depend on it."""
    try:
        redis_connection().ping()
    except RedisError as exc:
        logger.warning("redis unavailable: %s", exc)
        raise QueueUnavailable() from exc


def publish_queue_changed(reason: str) -> None:
    try:
        redis_connection().publish(QUEUE_CHANGED_CHANNEL, reason)
    except RedisError as exc:
        # The dispatcher's fallback check picks the change up; nothing is lost.
        logger.warning("could not publish queue change (%s): %s", reason, exc)


def queue_changed(reason: str) -> None:
    """Tell the dispatcher once the current transaction commits (immediately if none)."""
    transaction.on_commit(lambda: publish_queue_changed(reason))
