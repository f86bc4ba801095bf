"""What the operator and teacher views cost as the task table grows: a /metrics scrape,
/healthz, the usage report of one class day, and the admin task list.

Starts its own redis-server and a fresh SQLite database (or uses the PostgreSQL database
given with --database-url, which it fills and empties), adds a class of 30 students with
tasks spread over 30 days, then times each view in-process through Django's test client
(routing, middleware, session and the database work; no network).

    .venv/bin/python bench/console_bench.py                      # 10000 and 100000 tasks
    .venv/bin/python bench/console_bench.py --tasks 1000 50000 --repeat 20
    .venv/bin/python bench/console_bench.py \\
        --database-url postgresql://postgres@127.0.0.1:5432/comfy_bench

/metrics reads every task on a process's first scrape, then only the tasks that may still
change (queued in the last minutes, or since the oldest one still waiting or running).
"""

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import start_redis  # noqa: E402
from tests.processes import stop_process  # noqa: E402

STUDENTS = 30
DAYS = 30
BATCH = 5000


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tasks", type=int, nargs="+", default=[10_000, 100_000], help="Table sizes to measure."
    )
    parser.add_argument("--repeat", type=int, default=10, help="Requests per view and size.")
    parser.add_argument("--database-url", help="A PostgreSQL database to use instead of a fresh SQLite file.")
    return parser.parse_args()


def fill(total: int, students: list) -> None:
    """Add tasks until the table holds `total`, spread over DAYS days like a term of classes."""
    from django.utils import timezone

    from comfyproxy.models import Task, TaskReason, TaskStatus

    rng = random.Random(total)
    now = timezone.now()
    have = Task.objects.count()
    outcomes = [TaskStatus.COMPLETED] * 8 + [TaskStatus.FAILED, TaskStatus.CANCELLED]
    while have < total:
        rows = []
        for _ in range(min(BATCH, total - have)):
            queued = now - timedelta(seconds=rng.uniform(60, DAYS * 86400))
            started = queued + timedelta(seconds=rng.expovariate(1 / 60))
            finished = started + timedelta(seconds=rng.uniform(5, 120))
            status = rng.choice(outcomes)
            rows.append(
                Task(
                    owner=rng.choice(students),
                    host="127.0.0.1",
                    port=8189,
                    prompt={"1": {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512}}},
                    status=status,
                    reason=TaskReason.TIMEOUT if status == TaskStatus.FAILED else "",
                    queue_order=int(queued.timestamp() * 1_000_000),
                    queued_at=queued,
                    started_at=started,
                    submitted_at=started,
                    finished_at=finished,
                )
            )
        Task.objects.bulk_create(rows)
        have += len(rows)


def timed(client, path: str, repeat: int, **query) -> list[float]:
    client.get(path, query)  # warm: connection, templates, caches
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        response = client.get(path, query)
        samples.append((time.perf_counter() - start) * 1000)
        assert response.status_code in (200, 503), (path, response.status_code)
    return samples


def main() -> None:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="console-bench-"))
    redis, redis_port = start_redis(workdir)
    os.environ["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    os.environ["DATABASE_URL"] = args.database_url or f"sqlite:///{workdir / 'bench.sqlite3'}"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "teaching.settings")
    try:
        import django

        django.setup()
        from django.conf import settings
        from django.contrib.auth import get_user_model
        from django.core.management import call_command
        from django.db import connection
        from django.test import Client
        from django.utils import timezone

        from comfyproxy import metrics
        from comfyproxy.models import Task

        settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]
        settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
        call_command("migrate", verbosity=0)
        users = get_user_model().objects
        teacher = users.create_superuser("bench-teacher", password="x")
        students = [users.create_user(f"bench-student-{n}", password="x") for n in range(STUDENTS)]
        client = Client()
        client.force_login(teacher)
        day = timezone.localdate() - timedelta(days=1)
        window = {"since": f"{day}T08:00", "until": f"{day}T18:00"}

        engine = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
        print(f"database: {engine}, {args.repeat} requests each")
        print(f"{'tasks':>8}  {'view':<28} {'p50 ms':>8} {'max ms':>8}")
        for total in sorted(args.tasks):
            fill(total, students)
            if connection.vendor == "postgresql":
                # What autovacuum does soon after a bulk load; SQLite's planner needs no statistics.
                with connection.cursor() as cursor:
                    cursor.execute("ANALYZE comfyproxy_task")
            # A new web process reads every task once, then only what changed since.
            metrics.collector.forget()
            start = time.perf_counter()
            client.get("/metrics")
            cold = (time.perf_counter() - start) * 1000
            print(f"{total:>8}  {'/metrics, first in a process':<28} {cold:>8.1f} {cold:>8.1f}")
            for label, path, query in (
                ("/metrics", "/metrics", {}),
                ("/healthz", "/healthz", {}),
                ("usage of one class day", "/admin/comfyproxy/task/usage/", window),
                ("admin task list", "/admin/comfyproxy/task/", {}),
            ):
                samples = timed(client, path, args.repeat, **query)
                print(f"{total:>8}  {label:<28} {statistics.median(samples):>8.1f} {max(samples):>8.1f}")
        if args.database_url:
            Task.objects.all().delete()
            users.filter(username__startswith="bench-").delete()
    finally:
        stop_process(redis)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
