"""How a class session used the GPU: tasks per student, outcomes, waits, run times, busy hours.

A session is a time window; a task belongs to it when it was queued inside the window.
Durations come from the task's own timestamps:

- wait: queued → claimed by the dispatcher (`started_at`), for tasks that started;
- run: accepted by ComfyUI (`submitted_at`) → finished, for tasks that reached ComfyUI,
  whatever their outcome (a failed or interrupted run used the GPU too).

Percentiles interpolate linearly between the closest ranks (numpy's default, PostgreSQL's
percentile_cont), so the median of 10 s and 20 s is 15 s.
"""

import csv
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.utils import timezone
from django.utils.translation import gettext as _

from comfyproxy.models import Task, TaskReason, TaskStatus

HOURS_IN_DAY = 24


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    rank = (len(sorted_values) - 1) * fraction
    low, high = math.floor(rank), math.ceil(rank)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


@dataclass(frozen=True)
class DurationSummary:
    count: int
    median: float | None
    p90: float | None

    @classmethod
    def of(cls, values: list[float]) -> "DurationSummary":
        ordered = sorted(values)
        return cls(len(ordered), percentile(ordered, 0.5), percentile(ordered, 0.9))


@dataclass
class _Tally:
    """Counts and durations gathered for one student (or the whole class) before summarizing."""

    statuses: Counter = field(default_factory=Counter)
    waits: list[float] = field(default_factory=list)
    runs: list[float] = field(default_factory=list)

    def add(self, status, queued_at, started_at, submitted_at, finished_at) -> None:
        self.statuses[status] += 1
        if started_at is not None:
            self.waits.append((started_at - queued_at).total_seconds())
        if submitted_at is not None and finished_at is not None:
            self.runs.append((finished_at - submitted_at).total_seconds())


@dataclass(frozen=True)
class Usage:
    """One student's session, or the whole class's when `username` is empty."""

    username: str
    full_name: str
    total: int
    completed: int
    failed: int
    cancelled: int
    unfinished: int
    wait: DurationSummary
    run: DurationSummary

    @classmethod
    def of(cls, tally: _Tally, *, username: str = "", full_name: str = "") -> "Usage":
        statuses = tally.statuses
        return cls(
            username=username,
            full_name=full_name,
            total=sum(statuses.values()),
            completed=statuses[TaskStatus.COMPLETED],
            failed=statuses[TaskStatus.FAILED],
            cancelled=statuses[TaskStatus.CANCELLED],
            unfinished=statuses[TaskStatus.QUEUED] + statuses[TaskStatus.PROCESSING],
            wait=DurationSummary.of(tally.waits),
            run=DurationSummary.of(tally.runs),
        )


@dataclass(frozen=True)
class UsageReport:
    since: datetime
    until: datetime
    students: list[Usage]  # most tasks first
    overall: Usage
    tasks_by_hour: list[int]  # index = hour of day, local time
    failures_by_reason: list[tuple[str, str, int]]  # (code, label, count), most first

    @property
    def busiest_hours(self) -> list[int]:
        """Hours of the day with the most submissions (ties all listed), none if nothing ran."""
        peak = max(self.tasks_by_hour)
        return [hour for hour, count in enumerate(self.tasks_by_hour) if count == peak] if peak else []


def day_window(day) -> tuple[datetime, datetime]:
    """One local calendar day as an aware [since, until) window."""

    def midnight(date):
        return timezone.make_aware(datetime.combine(date, datetime.min.time()))

    return midnight(day), midnight(day + timedelta(days=1))


def usage_report(*, since: datetime, until: datetime) -> UsageReport:
    rows = (
        Task.objects.filter(queued_at__gte=since, queued_at__lt=until)
        .values_list(
            "owner_id",
            "owner__username",
            "owner__first_name",
            "owner__last_name",
            "status",
            "reason",
            "queued_at",
            "started_at",
            "submitted_at",
            "finished_at",
        )
        .order_by()
    )
    overall = _Tally()
    per_student: dict[int, _Tally] = defaultdict(_Tally)
    names: dict[int, tuple[str, str]] = {}
    by_hour = [0] * HOURS_IN_DAY
    failures: Counter = Counter()
    for owner_id, username, first, last, status, reason, queued, started, submitted, finished in rows:
        names[owner_id] = (username, f"{first} {last}".strip())
        for tally in (overall, per_student[owner_id]):
            tally.add(status, queued, started, submitted, finished)
        by_hour[timezone.localtime(queued).hour] += 1
        if status == TaskStatus.FAILED:
            failures[reason] += 1
    students = sorted(
        (
            Usage.of(tally, username=names[owner][0], full_name=names[owner][1])
            for owner, tally in per_student.items()
        ),
        key=lambda usage: (-usage.total, usage.username),
    )
    reason_labels = dict(TaskReason.choices)
    return UsageReport(
        since=since,
        until=until,
        students=students,
        overall=Usage.of(overall),
        tasks_by_hour=by_hour,
        failures_by_reason=[
            (code, str(reason_labels.get(code, code)), count) for code, count in failures.most_common()
        ],
    )


# Spreadsheets run a cell that starts with one of these as a formula.
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}"
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_PREFIXES) else text


def write_csv(report: UsageReport, out) -> None:
    """One row per student, then the class total; durations in seconds."""
    writer = csv.writer(out)
    writer.writerow(
        [
            _("student"),
            _("name"),
            _("tasks"),
            _("completed"),
            _("failed"),
            _("cancelled"),
            _("waiting or running"),
            _("median wait (s)"),
            _("p90 wait (s)"),
            _("median run (s)"),
            _("p90 run (s)"),
        ]
    )
    for usage in [*report.students, report.overall]:
        writer.writerow(
            _cell(value)
            for value in (
                usage.username or _("whole class"),
                usage.full_name,
                usage.total,
                usage.completed,
                usage.failed,
                usage.cancelled,
                usage.unfinished,
                usage.wait.median,
                usage.wait.p90,
                usage.run.median,
                usage.run.p90,
            )
        )
