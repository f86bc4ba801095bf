"""/metrics and /healthz: what they report, and who may read them."""

from datetime import timedelta

import pytest
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from comfyproxy import metrics
from comfyproxy.models import DispatcherLease, Task, TaskReason, TaskStatus
from comfyproxy.services import control
from comfyproxy.services.notify import redis_connection
from tests.processes import free_port

pytestmark = [pytest.mark.usefixtures("fast_password_hashing"), pytest.mark.postgres]


@pytest.fixture(autouse=True)
def fresh_metrics():
    """The hand-off histogram lives in the test run's shared Redis; the totals the collector
    keeps would describe the previous test's database."""
    redis_connection().delete(metrics.HANDOFF_KEY)
    metrics.collector.forget()
    yield
    redis_connection().delete(metrics.HANDOFF_KEY)


def scrape(client, **headers) -> dict[str, float]:
    """Every sample as {'name{label="value"}': value}."""
    response = client.get("/metrics", **headers)
    assert response.status_code == 200
    assert response["Content-Type"] == CONTENT_TYPE_LATEST
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


@pytest.fixture
def known_queue(student, other_student, make_task, register_instance, teacher):
    """2 waiting, 1 running, 3 finished with known waits and runs, and a paused cap of 3."""
    register_instance(student, 8189)
    now = timezone.now()

    def finished(status, wait, run, reason=""):
        queued = now - timedelta(seconds=wait + run + 1)
        started = queued + timedelta(seconds=wait)
        make_task(
            student,
            status=status,
            reason=reason,
            queued_at=queued,
            started_at=started,
            submitted_at=started,
            finished_at=started + timedelta(seconds=run),
        )

    finished(TaskStatus.COMPLETED, wait=3, run=20)
    finished(TaskStatus.FAILED, wait=100, run=700, reason=TaskReason.TIMEOUT)
    finished(TaskStatus.FAILED, wait=0.5, run=2, reason=TaskReason.COMFY_UNREACHABLE)
    make_task(student, status=TaskStatus.PROCESSING, queued_at=now - timedelta(seconds=40))
    make_task(other_student)
    make_task(other_student)
    control.set_max_concurrent(actor=teacher, value=3)
    control.pause_queue(actor=teacher)


def test_metrics_report_the_queue_from_the_database(client, known_queue):
    samples = scrape(client)

    assert samples["comfy_queue_length"] == 2
    assert samples["comfy_tasks_running"] == 1
    assert samples["comfy_max_concurrent"] == 3
    assert samples["comfy_available_slots"] == 2
    assert samples["comfy_queue_paused"] == 1
    assert samples['comfy_tasks_finished_total{status="completed"}'] == 1
    assert samples['comfy_tasks_finished_total{status="failed"}'] == 2
    assert samples['comfy_tasks_finished_total{status="cancelled"}'] == 0
    assert samples['comfy_task_failures_total{reason="timeout"}'] == 1
    assert samples['comfy_task_failures_total{reason="comfy_unreachable"}'] == 1
    assert samples['comfy_instances{state="running"}'] == 1


def test_wait_and_run_times_are_histograms(client, known_queue):
    samples = scrape(client)

    # Waits: 0.5, 3 and 100 s for the finished tasks, 0 s for the running one.
    assert samples['comfy_task_wait_seconds_bucket{le="1.0"}'] == 2
    assert samples['comfy_task_wait_seconds_bucket{le="5.0"}'] == 3
    assert samples['comfy_task_wait_seconds_bucket{le="60.0"}'] == 3
    assert samples['comfy_task_wait_seconds_bucket{le="120.0"}'] == 4
    assert samples['comfy_task_wait_seconds_bucket{le="+Inf"}'] == 4
    assert samples["comfy_task_wait_seconds_count"] == 4
    assert samples["comfy_task_wait_seconds_sum"] == pytest.approx(103.5)
    # Runs of finished tasks only: 2, 20 and 700 s.
    assert samples['comfy_task_run_seconds_bucket{le="5.0"}'] == 1
    assert samples['comfy_task_run_seconds_bucket{le="30.0"}'] == 2
    assert samples['comfy_task_run_seconds_bucket{le="600.0"}'] == 2
    assert samples['comfy_task_run_seconds_bucket{le="1200.0"}'] == 3
    assert samples["comfy_task_run_seconds_sum"] == pytest.approx(722)


def test_hand_offs_the_dispatcher_observes_are_exported(client, db):
    for seconds in (0.02, 0.3, 0.3, 20):
        metrics.observe_handoff(seconds)

    samples = scrape(client)

    assert samples['comfy_dispatch_handoff_seconds_bucket{le="0.025"}'] == 1
    assert samples['comfy_dispatch_handoff_seconds_bucket{le="0.5"}'] == 3
    assert samples['comfy_dispatch_handoff_seconds_bucket{le="10.0"}'] == 3
    assert samples['comfy_dispatch_handoff_seconds_bucket{le="+Inf"}'] == 4
    assert samples["comfy_dispatch_handoff_seconds_sum"] == pytest.approx(20.62)


def test_an_empty_queue_still_exports_every_figure(client, db):
    samples = scrape(client)

    assert samples["comfy_queue_length"] == 0
    assert samples["comfy_task_wait_seconds_count"] == 0
    assert samples['comfy_dispatch_handoff_seconds_bucket{le="+Inf"}'] == 0
    assert samples["comfy_dispatcher_up"] == 0


def finished_long_ago(owner, make_task, *, hours: float, wait: float = 10, run: float = 30):
    queued = timezone.now() - timedelta(hours=hours)
    started = queued + timedelta(seconds=wait)
    return make_task(
        owner,
        status=TaskStatus.COMPLETED,
        queued_at=queued,
        started_at=started,
        submitted_at=started,
        finished_at=started + timedelta(seconds=run),
    )


def test_tasks_that_can_no_longer_change_are_counted_once_across_scrapes(client, student, make_task):
    for hours in (5, 4, 3):
        finished_long_ago(student, make_task, hours=hours)

    first = scrape(client)
    again = scrape(client)
    assert first["comfy_task_wait_seconds_count"] == again["comfy_task_wait_seconds_count"] == 3
    assert again['comfy_tasks_finished_total{status="completed"}'] == 3

    finished_long_ago(student, make_task, hours=0)
    assert scrape(client)["comfy_task_run_seconds_count"] == 4


def test_a_task_waiting_from_long_ago_is_counted_when_it_finishes(client, student, make_task):
    finished_long_ago(student, make_task, hours=3)
    waiting = make_task(student, queued_at=timezone.now() - timedelta(hours=2))
    assert scrape(client)["comfy_task_wait_seconds_count"] == 1

    started = waiting.queued_at + timedelta(minutes=50)
    Task.objects.filter(pk=waiting.pk).update(
        status=TaskStatus.COMPLETED,
        started_at=started,
        submitted_at=started,
        finished_at=started + timedelta(seconds=5),
    )

    samples = scrape(client)
    assert samples["comfy_task_wait_seconds_count"] == 2
    assert samples['comfy_task_wait_seconds_bucket{le="1800.0"}'] == 1
    assert samples['comfy_task_wait_seconds_bucket{le="3600.0"}'] == 2
    assert samples['comfy_tasks_finished_total{status="completed"}'] == 2


# --- /healthz ------------------------------------------------------------------------------------


def hold_lease(*, renewed_ago: float, expires_in: float) -> None:
    now = timezone.now()
    DispatcherLease.objects.update_or_create(
        pk=1,
        defaults={
            "holder": "gpu-box:4242:abcd",
            "epoch": 7,
            "acquired_at": now - timedelta(minutes=5),
            "renewed_at": now - timedelta(seconds=renewed_ago),
            "expires_at": now + timedelta(seconds=expires_in),
        },
    )


def test_healthz_is_ok_while_the_dispatcher_holds_its_lease(client, db):
    hold_lease(renewed_ago=2, expires_in=8)

    response = client.get("/healthz")

    assert response.status_code == 200
    report = response.json()
    assert report["status"] == "ok"
    assert report["checks"]["database"] == {"ok": True}
    assert report["checks"]["redis"] == {"ok": True}
    dispatcher = report["checks"]["dispatcher"]
    assert dispatcher["ok"] is True
    assert dispatcher["holder"] == "gpu-box:4242:abcd"
    assert dispatcher["heartbeat_age_seconds"] == pytest.approx(2, abs=1)
    assert scrape(client)["comfy_dispatcher_up"] == 1


def test_healthz_fails_when_the_dispatcher_stopped_renewing(client, db):
    hold_lease(renewed_ago=30, expires_in=-20)

    response = client.get("/healthz")

    assert response.status_code == 503
    assert response.json()["status"] == "failing"
    assert response.json()["checks"]["dispatcher"]["ok"] is False


def test_healthz_fails_when_no_dispatcher_ever_ran(client, db):
    response = client.get("/healthz")

    assert response.status_code == 503
    assert response.json()["checks"]["dispatcher"]["ok"] is False


def test_healthz_names_an_unreachable_redis(client, db, settings):
    hold_lease(renewed_ago=1, expires_in=9)
    settings.CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{free_port()}/0",
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 0.5},
        }
    }

    response = client.get("/healthz")

    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["redis"]["ok"] is False
    assert checks["redis"]["error"]
    assert checks["database"]["ok"] is True


# --- Access -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/metrics", "/healthz"])
@pytest.mark.parametrize(
    "headers",
    [
        {"REMOTE_ADDR": "10.1.2.3"},
        {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "203.0.113.9"},
        {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "127.0.0.1, 203.0.113.9"},
        {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_REAL_IP": "203.0.113.9"},
        {"REMOTE_ADDR": "127.0.0.1", "HTTP_FORWARDED": "for=203.0.113.9"},
        {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "not-an-address"},
    ],
)
def test_strangers_are_refused(client, db, path, headers):
    response = client.get(path, **headers)

    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"


@pytest.mark.parametrize("path", ["/metrics", "/healthz"])
def test_a_student_is_refused_from_outside(client_for, student, path):
    response = client_for(student).get(path, REMOTE_ADDR="10.1.2.3")

    assert response.status_code == 403


@pytest.mark.parametrize("path", ["/metrics", "/healthz"])
def test_a_teacher_may_read_from_anywhere(client_for, teacher, path):
    hold_lease(renewed_ago=1, expires_in=9)

    response = client_for(teacher).get(path, REMOTE_ADDR="10.1.2.3")

    assert response.status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"REMOTE_ADDR": "127.0.0.1"},
        {"REMOTE_ADDR": "::1"},
        {"REMOTE_ADDR": "::ffff:127.0.0.1"},
        {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "127.0.0.1"},
    ],
)
def test_programs_on_this_machine_need_no_login(client, db, headers):
    assert client.get("/metrics", **headers).status_code == 200


def test_metrics_are_read_only(client, db):
    assert client.post("/metrics").status_code == 405
