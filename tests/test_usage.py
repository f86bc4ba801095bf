"""Usage of a class session: the numbers, the page and the CSV, against a known set of tasks."""

import csv
import io
from datetime import date, datetime, timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from comfyproxy import admin_views
from comfyproxy.models import TaskReason, TaskStatus
from comfyproxy.services import usage

pytestmark = [pytest.mark.usefixtures("fast_password_hashing"), pytest.mark.postgres]

CLASS_DAY = date(2026, 3, 2)
WINDOW = {"since": "2026-03-02T08:00", "until": "2026-03-02T12:00"}


def at(hour: int, minute: int) -> datetime:
    return timezone.make_aware(datetime(CLASS_DAY.year, CLASS_DAY.month, CLASS_DAY.day, hour, minute))


@pytest.fixture
def session(make_student, make_task):
    """A morning class: waits and runs in seconds chosen so every percentile is easy to check."""
    alice, bob, carol, dave = (make_student(name) for name in ("alice", "bob", "carol", "dave"))
    alice.first_name, alice.last_name = "Alice", "Liddell"
    alice.save()

    def ran(owner, queued_at, *, wait, run, status=TaskStatus.COMPLETED, reason=""):
        started = queued_at + timedelta(seconds=wait)
        return make_task(
            owner,
            status=status,
            reason=reason,
            queued_at=queued_at,
            started_at=started,
            submitted_at=started,
            finished_at=started + timedelta(seconds=run),
        )

    ran(alice, at(9, 5), wait=10, run=20)
    ran(alice, at(9, 40), wait=30, run=40)
    ran(alice, at(10, 10), wait=50, run=600, status=TaskStatus.FAILED, reason=TaskReason.TIMEOUT)
    make_task(bob, status=TaskStatus.CANCELLED, reason=TaskReason.CANCELLED_BY_OWNER, queued_at=at(10, 20))
    ran(bob, at(10, 30), wait=20, run=30)
    make_task(carol, queued_at=at(10, 50))
    # The day before: not part of this session.
    ran(dave, at(9, 0) - timedelta(days=1), wait=1, run=1)


def as_tuple(summary: usage.DurationSummary) -> tuple:
    return summary.count, summary.median, summary.p90


def report():
    return usage.usage_report(since=at(8, 0), until=at(12, 0))


def test_the_whole_class_numbers(session):
    overall = report().overall

    assert (overall.total, overall.completed, overall.failed, overall.cancelled, overall.unfinished) == (
        6,
        3,
        1,
        1,
        1,
    )
    # Waits 10, 20, 30, 50 s; runs 20, 30, 40, 600 s (the failed run used the GPU too).
    assert as_tuple(overall.wait) == pytest.approx((4, 25.0, 44.0))
    assert as_tuple(overall.run) == pytest.approx((4, 35.0, 432.0))


def test_the_numbers_per_student_most_tasks_first(session):
    students = report().students

    assert [(s.username, s.total) for s in students] == [("alice", 3), ("bob", 2), ("carol", 1)]
    alice, bob, carol = students
    assert alice.full_name == "Alice Liddell"
    assert (alice.completed, alice.failed, alice.cancelled) == (2, 1, 0)
    assert as_tuple(alice.wait) == pytest.approx((3, 30.0, 46.0))
    assert as_tuple(alice.run) == pytest.approx((3, 40.0, 488.0))
    assert (bob.completed, bob.cancelled, bob.wait.count) == (1, 1, 1)
    assert (carol.unfinished, carol.wait.median, carol.run.p90) == (1, None, None)


def test_busiest_hours_and_failures_by_reason(session):
    result = report()

    assert result.tasks_by_hour[9] == 2
    assert result.tasks_by_hour[10] == 4
    assert sum(result.tasks_by_hour) == 6
    assert result.busiest_hours == [10]
    assert [(code, count) for code, _label, count in result.failures_by_reason] == [("timeout", 1)]


def test_an_empty_window_has_no_busiest_hour(db):
    result = report()

    assert result.students == []
    assert result.busiest_hours == []
    assert result.overall.wait == usage.DurationSummary(count=0, median=None, p90=None)


@pytest.mark.parametrize(
    ("values", "fraction", "expected"),
    [([], 0.5, None), ([7.0], 0.9, 7.0), ([10.0, 20.0], 0.5, 15.0), ([1.0, 2.0, 3.0, 4.0, 5.0], 0.9, 4.6)],
)
def test_percentiles_interpolate_between_ranks(values, fraction, expected):
    assert usage.percentile(values, fraction) == pytest.approx(expected)


def test_a_calendar_day_is_local_midnight_to_midnight(settings):
    since, until = usage.day_window(CLASS_DAY)

    assert timezone.localtime(since).hour == 0
    assert until - since == timedelta(days=1)


# --- The page and the export ----------------------------------------------------------------------


def figure(page: str, name: str) -> str:
    marker = f'data-figure="{name}">'
    start = page.index(marker) + len(marker)
    return page[start : page.index("<", start)]


def test_the_usage_page_shows_the_session_numbers_and_charts(teacher, client_for, session):
    response = client_for(teacher).get(reverse("admin:comfyproxy_usage"), WINDOW)

    assert response.status_code == 200
    page = response.content.decode()
    assert figure(page, "total") == "6"
    assert figure(page, "failed") == "1"
    assert figure(page, "wait_median") == "0:25"
    assert figure(page, "run_p90") == "7:12"
    assert figure(page, "busiest_hours") == "10:00"
    assert 'data-student="alice"' in page
    assert 'data-reason="timeout"' in page
    # Both charts are drawn on the server: one bar per busy hour, one segment per outcome.
    assert page.count('<svg class="comfy-chart"') == 2
    hour_bars = response.context["hour_chart"].bars
    assert [bar.title for bar in hour_bars] == ["09:00 – 2", "10:00 – 4"]
    assert hour_bars[1].height == pytest.approx(2 * hour_bars[0].height)
    assert [bar.css_class for bar in response.context["student_chart"].bars[:2]] == ["completed", "failed"]
    # Nothing is fetched from elsewhere.
    assert "https://" not in page


def test_the_usage_page_defaults_to_today(teacher, client_for, student, make_task):
    make_task(student)

    response = client_for(teacher).get(reverse("admin:comfyproxy_usage"))

    assert response.status_code == 200
    assert response.context["report"].overall.total == 1


def test_the_csv_has_a_row_per_student_and_the_class_total(teacher, client_for, session):
    response = client_for(teacher).get(reverse("admin:comfyproxy_usage_csv"), WINDOW)

    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"] == 'attachment; filename="usage-20260302-0800-20260302-1200.csv"'
    text = response.content.decode("utf-8")
    assert text.startswith("\ufeff")
    rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
    assert len(rows) == 1 + 3 + 1
    assert rows[1] == ["alice", "Alice Liddell", "3", "2", "1", "0", "0", "30.0", "46.0", "40.0", "488.0"]
    assert rows[-1][2:] == ["6", "3", "1", "1", "1", "25.0", "44.0", "35.0", "432.0"]


def test_the_csv_never_starts_a_cell_with_a_formula(teacher, client_for, make_student, make_task):
    make_task(make_student("@SUM"))

    response = client_for(teacher).get(reverse("admin:comfyproxy_usage_csv"))

    rows = list(csv.reader(io.StringIO(response.content.decode("utf-8").lstrip("\ufeff"))))
    assert rows[1][0] == "'@SUM"


@pytest.mark.parametrize(
    "window",
    [
        {"since": "2026-03-02T12:00", "until": "2026-03-02T08:00"},
        {"since": "yesterday", "until": "2026-03-02T08:00"},
        {"since": "2026-03-02T08:00"},
    ],
)
def test_a_bad_window_gets_a_clear_answer(teacher, client_for, window):
    client = client_for(teacher)

    page = client.get(reverse("admin:comfyproxy_usage"), window)
    assert page.status_code == 200
    assert page.context["form"].errors
    assert page.context["report"] is None

    export = client.get(reverse("admin:comfyproxy_usage_csv"), window)
    assert export.status_code == 400
    assert export.json()["code"] == "invalid_window"


@pytest.mark.parametrize(
    ("largest", "ticks"),
    [
        (1, [0, 1]),
        (3, [0, 1, 2, 3]),
        (7, [0, 2, 4, 6, 8]),
        (23, [0, 5, 10, 15, 20, 25]),
        (101, [0, 50, 100, 150]),
    ],
)
def test_chart_axes_use_round_whole_steps_that_cover_the_largest_count(largest, ticks):
    assert admin_views.axis_steps(largest) == ticks
