"""/metrics (Prometheus text format) and /healthz, for operators; staff or this machine only.

The figures come from the database when Prometheus scrapes, not from counters kept as
things happen: the web workers, the dispatcher and the instance monitor are separate
processes, and the tasks' own timestamps already say how long each waited and ran, so the
figures are exact, survive restarts and need no shared state (prometheus_client's
multiprocess mode would need a shared directory cleaned at every restart and still miss a
dispatcher on another host). The one figure only the dispatcher sees, how long a hand-off
took, it adds to a small histogram in Redis with `observe_handoff()`; losing that to a
Redis restart reads as a counter reset, which Prometheus handles.
"""

import ipaddress
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from functools import wraps

from django.db import DatabaseError, connection
from django.db.models import Count, F, FloatField, Func, Min, Q, Sum
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
    TaskReason,
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

    Called by the dispatcher, off its event loop (one blocking Redis round trip, bounded by
    the cache's socket timeout). Best effort: a metric never delays or fails a dispatch.
    """
    bucket = next((str(bound) for bound in HANDOFF_BUCKETS if seconds <= bound), "+Inf")
    try:
        pipeline = redis_connection().pipeline(transaction=False)
        pipeline.hincrby(HANDOFF_KEY, bucket, 1)
        pipeline.hincrbyfloat(HANDOFF_KEY, "sum", seconds)
        pipeline.execute()
    except RedisError as exc:
        logger.debug("could not record a hand-off: %s", exc)


class SecondsBetween(Func):
    """`end - start` in seconds, computed by the database itself.

    Django's own datetime subtraction runs a Python function per row on SQLite; julianday()
    and EXTRACT are native.
    """

    output_field = FloatField()
    # PostgreSQL: EXTRACT(EPOCH FROM (end - start)).
    template = "EXTRACT(EPOCH FROM (%(expressions)s))"
    arg_joiner = " - "

    def __init__(self, start: str, end: str):
        super().__init__(F(end), F(start))

    def as_sqlite(self, compiler, connection, **extra_context):
        # (julianday(end) - julianday(start)) * 86400.0, in SQLite's own C.
        return self.as_sql(
            compiler,
            connection,
            template="((julianday(%(expressions)s)) * 86400.0)",
            arg_joiner=") - julianday(",
            **extra_context,
        )


@dataclass(frozen=True)
class Histogram:
    bounds: tuple
    cumulative: tuple  # tasks at or under each bound
    count: int = 0
    total_seconds: float = 0.0

    @classmethod
    def of(cls, tasks, start: str, end: str, bounds: tuple) -> "Histogram":
        """end - start over `tasks` that have both, counted by the database in one pass."""
        rows = tasks.filter(**{f"{start}__isnull": False, f"{end}__isnull": False}).annotate(
            seconds=SecondsBetween(start, end)
        )
        counts = rows.aggregate(
            count=Count("pk"),
            total_seconds=Sum("seconds"),
            **{
                f"le_{index}": Count("pk", filter=Q(seconds__lte=bound)) for index, bound in enumerate(bounds)
            },
        )
        return cls(
            bounds,
            tuple(counts[f"le_{index}"] for index in range(len(bounds))),
            counts["count"],
            counts["total_seconds"] or 0.0,
        )

    def __add__(self, other: "Histogram") -> "Histogram":
        return Histogram(
            self.bounds,
            tuple(mine + theirs for mine, theirs in zip(self.cumulative, other.cumulative, strict=True)),
            self.count + other.count,
            self.total_seconds + other.total_seconds,
        )

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        buckets = [
            (str(float(bound)), count) for bound, count in zip(self.bounds, self.cumulative, strict=True)
        ]
        return HistogramMetricFamily(
            name, documentation, buckets=[*buckets, ("+Inf", self.count)], sum_value=self.total_seconds
        )


@dataclass(frozen=True)
class TaskTotals:
    """What the task counters and histograms add up over some set of tasks."""

    wait: Histogram
    run: Histogram
    finished: Counter  # status -> tasks
    failures: Counter  # reason -> failed tasks

    @classmethod
    def of(cls, tasks) -> "TaskTotals":
        # Conditional counts rather than GROUP BY or a status filter: either would make SQLite
        # walk the status index over every row instead of the queued_at range asked for.
        failed_with = {reason: Q(status=TaskStatus.FAILED, reason=reason) for reason in TaskReason.values}
        counts = tasks.aggregate(
            **{f"ended_{status}": Count("pk", filter=Q(status=status)) for status in TERMINAL_STATUSES},
            **{
                f"failed_{index}": Count("pk", filter=condition)
                for index, condition in enumerate(failed_with.values())
            },
        )
        return cls(
            wait=Histogram.of(tasks, "queued_at", "started_at", WAIT_BUCKETS),
            # A task has finished_at exactly when it has ended (task_finished_at_iff_terminal).
            run=Histogram.of(tasks, "submitted_at", "finished_at", RUN_BUCKETS),
            finished=Counter({status: counts[f"ended_{status}"] for status in TERMINAL_STATUSES}),
            failures=Counter(
                {reason or "none": counts[f"failed_{index}"] for index, reason in enumerate(failed_with)}
            ),
        )

    def __add__(self, other: "TaskTotals") -> "TaskTotals":
        return TaskTotals(
            self.wait + other.wait,
            self.run + other.run,
            self.finished + other.finished,
            self.failures + other.failures,
        )


NO_TASKS = TaskTotals(
    Histogram(WAIT_BUCKETS, (0,) * len(WAIT_BUCKETS)),
    Histogram(RUN_BUCKETS, (0,) * len(RUN_BUCKETS)),
    Counter(),
    Counter(),
)
# A task created this long ago has committed (and a web host's clock is no further behind).
SETTLE_LAG = timedelta(minutes=5)


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
    """Reads the queue's figures from the database (and Redis) at each scrape.

    Aggregating every task at each scrape costs seconds once a term has left 100,000 rows, so
    the collector keeps the totals of tasks that can no longer change: all those queued before
    a horizon that stays behind the oldest waiting or running task. Each scrape reads only the
    rows after the horizon (the `queued_at` index) and adds them. The kept totals are this
    process's own and rebuilt after a restart; Prometheus sees the same figures from any process.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.forget()

    def forget(self) -> None:
        """Drop the kept totals (the next scrape reads every task again)."""
        with self._lock:
            self._settled = NO_TASKS
            self._horizon = None

    def _settle(self):
        """Fold the tasks that have become final since the last scrape into the kept totals."""
        with self._lock:
            oldest_active = Task.objects.active().aggregate(oldest=Min("queued_at"))["oldest"]
            horizon = timezone.now() - SETTLE_LAG
            if oldest_active is not None:
                horizon = min(horizon, oldest_active)
            if self._horizon is not None and horizon <= self._horizon:
                return self._settled, self._horizon
            newly_final = Task.objects.filter(queued_at__lt=horizon)
            if self._horizon is not None:
                newly_final = newly_final.filter(queued_at__gte=self._horizon)
            self._settled += TaskTotals.of(newly_final)
            self._horizon = horizon
            return self._settled, self._horizon

    def task_totals(self) -> TaskTotals:
        settled, horizon = self._settle()
        return settled + TaskTotals.of(Task.objects.filter(queued_at__gte=horizon))

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

        totals = self.task_totals()
        yield totals.wait.family(
            "comfy_task_wait_seconds",
            "How long tasks waited from submission until the dispatcher claimed them.",
        )
        yield totals.run.family(
            "comfy_task_run_seconds", "How long tasks ran in ComfyUI, whatever their outcome."
        )
        finished = CounterMetricFamily(
            "comfy_tasks_finished", "Tasks that ended, by outcome.", labels=["status"]
        )
        for status in TERMINAL_STATUSES:
            finished.add_metric([status], totals.finished[status])
        yield finished
        failures = CounterMetricFamily("comfy_task_failures", "Failed tasks, by reason.", labels=["reason"])
        for reason, count in sorted(totals.failures.items()):
            failures.add_metric([reason], count)
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


collector = QueueCollector()
registry = CollectorRegistry(auto_describe=False)
registry.register(collector)


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
