"""/metrics (Prometheus text format) and /healthz, for operators; staff or this machine only.

Every figure is computed when Prometheus scrapes, not counted as things happen: the web
workers, the dispatcher and the instance monitor are separate processes, and the database
already holds each task's timestamps, so aggregating them is exact, survives restarts and
needs no shared state (prometheus_client's multiprocess mode would need a shared directory
cleaned on every restart and still miss what another host's dispatcher did). The one
figure only the dispatcher sees, how long a hand-off took, it adds to a small histogram in
Redis with `observe_handoff()`; losing that to a Redis restart reads as a counter reset,
which Prometheus handles.
"""

import ipaddress
import logging
from datetime import timedelta
from functools import wraps

from django.db import DatabaseError, connection
from django.db.models import Count, DurationField, ExpressionWrapper, F, Q, Sum
from django.http import HttpResponse, JsonResponse
from django.utils import timezone
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from redis.exceptions import RedisError

from comfyproxy.models import (
    TERMINAL_STATUSES,
    ComfyInstance,
    DispatcherLease,
    InstanceState,
    Task,
    TaskStatus,
)
from comfyproxy.services.notify import redis_connection
from comfyproxy.services.queue import queue_overview

logger = logging.getLogger(__name__)

# Upper bounds in seconds. Waits span a quick hand-off to a class-long queue; runs span a
# tiny workflow to the run timeout.
WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)
RUN_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
HANDOFF_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
HANDOFF_KEY = "comfyproxy:metrics:handoff_seconds"


def observe_handoff(seconds: float) -> None:
    """Record one hand-off: from the moment a task could start (it arrived while a slot was
    free, or a slot freed while it waited) until the dispatcher claimed it.

    Called by the dispatcher. Best effort: a metric never delays or fails a dispatch.
    """
    bucket = next((str(bound) for bound in HANDOFF_BUCKETS if seconds <= bound), "+Inf")
    try:
        pipeline = redis_connection().pipeline(transaction=False)
        pipeline.hincrby(HANDOFF_KEY, bucket, 1)
        pipeline.hincrbyfloat(HANDOFF_KEY, "sum", seconds)
        pipeline.execute()
    except RedisError as exc:
        logger.debug("could not record a hand-off: %s", exc)


def _duration_histogram(
    name: str, documentation: str, tasks, start: str, end: str, buckets
) -> HistogramMetricFamily:
    """A histogram of end - start over `tasks`, counted by the database in one query."""
    duration = ExpressionWrapper(F(end) - F(start), output_field=DurationField())
    rows = tasks.filter(**{f"{start}__isnull": False, f"{end}__isnull": False}).annotate(duration=duration)
    counts = rows.aggregate(
        total=Count("pk"),
        seconds=Sum("duration"),
        **{
            f"le_{index}": Count("pk", filter=Q(duration__lte=timedelta(seconds=bound)))
            for index, bound in enumerate(buckets)
        },
    )
    cumulative = [(str(float(bound)), counts[f"le_{index}"]) for index, bound in enumerate(buckets)]
    total_seconds = counts["seconds"].total_seconds() if counts["seconds"] else 0.0
    return HistogramMetricFamily(
        name, documentation, buckets=[*cumulative, ("+Inf", counts["total"])], sum_value=total_seconds
    )


def _handoff_histogram() -> HistogramMetricFamily | None:
    try:
        stored = {
            key.decode(): float(value) for key, value in redis_connection().hgetall(HANDOFF_KEY).items()
        }
    except RedisError as exc:
        logger.warning("hand-off metrics unavailable: %s", exc)
        return None
    running_total, buckets = 0, []
    for bound in HANDOFF_BUCKETS:
        running_total += int(stored.get(str(bound), 0))
        buckets.append((str(float(bound)), running_total))
    buckets.append(("+Inf", running_total + int(stored.get("+Inf", 0))))
    return HistogramMetricFamily(
        "comfy_dispatch_handoff_seconds",
        "From a task being able to start (a free slot) until the dispatcher claimed it.",
        buckets=buckets,
        sum_value=stored.get("sum", 0.0),
    )


class QueueCollector:
    """Reads the queue's figures from the database (and Redis) at each scrape."""

    def collect(self):
        overview = queue_overview()
        for name, documentation, value in (
            ("comfy_queue_length", "Tasks waiting in the queue.", overview.queue_length),
            ("comfy_tasks_running", "Tasks running in ComfyUI now.", overview.processing_count),
            ("comfy_max_concurrent", "The cap on tasks running at once.", overview.max_concurrent),
            ("comfy_available_slots", "Free places under the cap.", overview.available_slots),
            ("comfy_queue_paused", "1 while a teacher has paused the queue.", int(overview.paused)),
        ):
            yield GaugeMetricFamily(name, documentation, value=value)

        tasks = Task.objects.all()
        yield _duration_histogram(
            "comfy_task_wait_seconds",
            "How long tasks waited from submission until the dispatcher claimed them.",
            tasks,
            "queued_at",
            "started_at",
            WAIT_BUCKETS,
        )
        yield _duration_histogram(
            "comfy_task_run_seconds",
            "How long tasks ran in ComfyUI, whatever their outcome.",
            tasks.filter(status__in=TERMINAL_STATUSES),
            "submitted_at",
            "finished_at",
            RUN_BUCKETS,
        )

        finished = CounterMetricFamily(
            "comfy_tasks_finished", "Tasks that ended, by outcome.", labels=["status"]
        )
        failures = CounterMetricFamily("comfy_task_failures", "Failed tasks, by reason.", labels=["reason"])
        ends = (
            tasks.filter(status__in=TERMINAL_STATUSES).values_list("status", "reason").annotate(n=Count("pk"))
        )
        by_status = dict.fromkeys(TERMINAL_STATUSES, 0)
        for status, reason, count in ends.order_by():
            by_status[status] += count
            if status == TaskStatus.FAILED:
                failures.add_metric([reason or "unknown"], count)
        for status, count in by_status.items():
            finished.add_metric([status], count)
        yield finished
        yield failures

        instances = GaugeMetricFamily(
            "comfy_instances", "Students' ComfyUI instances, by state.", labels=["state"]
        )
        by_state = dict(ComfyInstance.objects.values_list("state").annotate(n=Count("pk")).order_by())
        for state in InstanceState.values:
            instances.add_metric([state], by_state.get(state, 0))
        yield instances

        heartbeat = dispatcher_status()
        yield GaugeMetricFamily(
            "comfy_dispatcher_up", "1 while a dispatcher holds a current lease.", value=int(heartbeat["ok"])
        )
        if heartbeat.get("heartbeat_age_seconds") is not None:
            yield GaugeMetricFamily(
                "comfy_dispatcher_heartbeat_age_seconds",
                "Seconds since the dispatcher last renewed its lease.",
                value=heartbeat["heartbeat_age_seconds"],
            )

        handoffs = _handoff_histogram()
        if handoffs is not None:
            yield handoffs


registry = CollectorRegistry(auto_describe=False)
registry.register(QueueCollector())


# --- Health ---------------------------------------------------------------------------------


def dispatcher_status() -> dict:
    """Whether a dispatcher holds the lease now, from the heartbeat it writes to the database."""
    lease = DispatcherLease.objects.filter(pk=1).first()
    if lease is None or lease.renewed_at is None:
        return {"ok": False, "error": "no dispatcher has run yet"}
    now = timezone.now()
    return {
        "ok": bool(lease.expires_at and lease.expires_at > now),
        "holder": lease.holder,
        "renewed_at": lease.renewed_at.isoformat(),
        "expires_at": lease.expires_at.isoformat() if lease.expires_at else None,
        "heartbeat_age_seconds": round((now - lease.renewed_at).total_seconds(), 3),
    }


def _check_database() -> dict:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True}


def _check_redis() -> dict:
    try:
        redis_connection().ping()
    except (RedisError, OSError) as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True}


def health() -> dict:
    checks = {"database": _check_database(), "redis": _check_redis()}
    if checks["database"]["ok"]:
        checks["dispatcher"] = dispatcher_status()
    else:
        checks["dispatcher"] = {"ok": False, "error": "the database is unavailable"}
    return {"status": "ok" if all(check["ok"] for check in checks.values()) else "failing", "checks": checks}


# --- Who may read them -------------------------------------------------------------------------


def _is_loopback(address: str) -> bool:
    try:
        parsed = ipaddress.ip_address(address.strip())
    except ValueError:
        return False
    mapped = getattr(parsed, "ipv4_mapped", None)
    return (mapped or parsed).is_loopback


def from_this_machine(request) -> bool:
    """The client itself is on this machine, not only the last hop.

    nginx on the same host connects from loopback too, so a request it forwarded counts
    only if every address it names (X-Forwarded-For, X-Real-IP) is loopback as well;
    a request that carries a `Forwarded` header is never taken as local.
    """
    named = [request.META.get("REMOTE_ADDR", "")]
    named += [hop for hop in request.headers.get("X-Forwarded-For", "").split(",") if hop.strip()]
    if request.headers.get("X-Real-IP"):
        named.append(request.headers["X-Real-IP"])
    return "Forwarded" not in request.headers and all(_is_loopback(address) for address in named)


def operators_only(view):
    @wraps(view)
    def guarded(request, *args, **kwargs):
        # Checked first so that a loopback probe needs no session (and no database).
        if from_this_machine(request) or (request.user.is_authenticated and request.user.is_staff):
            return view(request, *args, **kwargs)
        return JsonResponse(
            {
                "code": "forbidden",
                "message": _("Only teachers, or programs on the server itself, may read this."),
            },
            status=403,
            json_dumps_params={"ensure_ascii": False},
        )

    return guarded


@never_cache
@require_GET
@operators_only
def metrics_view(request):
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


@never_cache
@require_GET
@operators_only
def healthz_view(request):
    """200 when the database, Redis and the dispatcher are all well, else 503 naming what is not."""
    report = health()
    return JsonResponse(report, status=200 if report["status"] == "ok" else 503)
