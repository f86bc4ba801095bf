"""The queue under a class-sized burst: makespan, hand-off and submission latency.

Starts its own redis-server, a SQLite database (or a fresh PostgreSQL database), the ComfyUI
emulator with one port per student and fixed-length jobs, Django under uvicorn and the
dispatcher (`manage.py comfy_dispatcher`). Then the students submit their workflows the way
ComfyUI's own page does (`POST /comfyui/<username>/<port>/prompt` with the `comfy_access`
cookie, which nginx would route to Django), spread evenly over `--arrival-seconds`, and it
waits until every task has finished.

    .venv/bin/python bench/queue_bench.py                          # cap 10, 200 tasks, 50 students, 1 s jobs
    .venv/bin/python bench/queue_bench.py --tasks 20 --students 5 --cap 2 --job-seconds 0.2
    .venv/bin/python bench/queue_bench.py --database postgresql    # postgresql://postgres@127.0.0.1:5432

Measured:
- makespan: first submission sent → last task recorded finished, against the ideal
  (tasks × job seconds / cap);
- hand-off: ComfyUI reports a run ended → ComfyUI starts the next one, from the emulator's
  own history timestamps (ms), for every slot freed while tasks were still waiting;
- submission latency: each HTTP submission's round trip while the burst arrives;
- the invariants on what the emulator saw: never more than the cap running, every prompt
  submitted and executed exactly once, every task completed.

The table goes to stdout and everything to bench/results/queue_bench-<time>.json (or --output).
All components share the machine, as they do in a test lab.
"""

import argparse
import asyncio
import bisect
import collections
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import python_speed_ms  # noqa: E402
from tests.emulator_fixtures import start_emulator  # noqa: E402
from tests.harness import start_redis  # noqa: E402
from tests.processes import free_port, stop_process, wait_for_port, wait_until  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
GOAL_MAKESPAN_OVERHEAD = 0.03
GOAL_HANDOFF_SECONDS = 0.050
GOAL_SUBMIT_P99_SECONDS = 0.050


@dataclass(frozen=True)
class Options:
    tasks: int = 200
    students: int = 50
    cap: int = 10
    job_seconds: float = 1.0
    arrival_seconds: float = 2.0
    web_workers: int = 1
    database: str = "sqlite"
    postgres_url: str = DEFAULT_POSTGRES_URL


def workflow(color: int) -> dict:
    """basic_invert with its own colour, so ComfyUI's cache never shortens a run."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bench"}},
    }


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)]


def spread(values: list[float]) -> dict:
    return {
        "count": len(values),
        "p50": percentile(values, 0.50),
        "p99": percentile(values, 0.99),
        "max": max(values) if values else None,
        "mean": statistics.fmean(values) if values else None,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children so far (Linux /proc); 0 once it is gone."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return total
    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total + sum(cpu_seconds(int(child)) for child in children)


# --- Set-up ------------------------------------------------------------------------------------


def create_database(workdir: Path, options: Options, stack: ExitStack) -> str:
    if options.database == "sqlite":
        return f"sqlite:///{workdir / 'bench.sqlite3'}"
    import psycopg

    name = f"queue_bench_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(options.postgres_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')

    def drop():
        with psycopg.connect(options.postgres_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    stack.callback(drop)
    return options.postgres_url.rsplit("/", 1)[0] + f"/{name}"


def set_up_django(env: dict) -> None:
    """This process reads and writes the same database (users, sessions, results)."""
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


@dataclass(frozen=True)
class Student:
    username: str
    port: int
    session: str  # the teaching site's sessionid
    comfy_access: str  # the ComfyUI origin's cookie for this student's instance


def create_class(options: Options, ports: list[int]) -> list[Student]:
    """Students with a running instance each, logged in as the practice page leaves them; the live cap."""
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
    from django.contrib.sessions.backends.db import SessionStore
    from django.http import HttpResponse

    from comfyproxy import gateway
    from comfyproxy.models import QueueSettings
    from comfyproxy.services import instances

    user_model = get_user_model()
    students = []
    for index, port in enumerate(ports):
        user = user_model(username=f"bench{index:03d}")
        user.set_unusable_password()
        user.save()
        instances.register_instance(user=user, port=port, host="127.0.0.1")
        session = SessionStore()
        session[SESSION_KEY] = str(user.pk)
        session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
        session[HASH_SESSION_KEY] = user.get_session_auth_hash()
        session.create()
        response = HttpResponse()
        gateway.grant_access(response, gateway.AccessGrant(user.pk, user.username, port, session.session_key))
        access = response.cookies[gateway.ACCESS_COOKIE].value
        students.append(Student(user.username, port, session.session_key, access))
    settings_row = QueueSettings.load()
    settings_row.max_concurrent_override = options.cap
    settings_row.max_queued_per_student = math.ceil(options.tasks / options.students) + 1
    settings_row.save()
    return students


def start_process(command: list[str], *, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
    )


# --- The burst ----------------------------------------------------------------------------------


@dataclass
class Submission:
    username: str
    sent_at: float  # wall clock
    latency: float
    status: int
    task_id: str | None


async def submit_burst(base_url: str, students: list[Student], options: Options) -> list[Submission]:
    import httpx

    interval = options.arrival_seconds / options.tasks
    results: list[Submission] = []

    async def one(index: int, client: httpx.AsyncClient, start: float) -> None:
        student = students[index % len(students)]
        await asyncio.sleep(max(0.0, start + index * interval - time.perf_counter()))
        body = {"prompt": workflow(index + 1), "client_id": f"page-{student.username}"}
        sent_at = time.time()
        began = time.perf_counter()
        try:
            response = await client.post(
                f"{base_url}/comfyui/{student.username}/{student.port}/prompt",
                json=body,
                headers={"Cookie": f"comfy_access={student.comfy_access}"},
            )
        except httpx.HTTPError:
            # Counted as a failed submission (status 0); the run then fails its invariants.
            results.append(Submission(student.username, sent_at, time.perf_counter() - began, 0, None))
            return
        latency = time.perf_counter() - began
        task_id = response.json().get("prompt_id") if response.status_code == 200 else None
        results.append(Submission(student.username, sent_at, latency, response.status_code, task_id))

    limits = httpx.Limits(max_connections=options.students, max_keepalive_connections=options.students)
    async with httpx.AsyncClient(timeout=30, limits=limits, trust_env=False) as client:
        # The client's first request loads httpx's async stack (anyio's backend, h11: tens of
        # milliseconds); made during the burst, it delayed the first sends and was counted
        # in their latency.
        (
            await client.get(
                f"{base_url}/api/v1/comfy_proxy/queue/status",
                headers={"Cookie": f"sessionid={students[0].session}"},
            )
        ).raise_for_status()
        start = time.perf_counter()
        await asyncio.gather(*(one(index, client, start) for index in range(options.tasks)))
    return sorted(results, key=lambda submission: submission.sent_at)


def warm_up(base_url: str, student: Student) -> None:
    """Load the app's code paths once, so the first submission does not pay for imports.

    A class submits to a server that has been serving its pages for a while: this measures
    that server, not one started a moment ago. The warm-up task is removed before the
    dispatcher starts, so it never runs and is not counted.
    """
    import httpx

    from comfyproxy.models import Task

    for _ in range(3):
        httpx.get(
            f"{base_url}/api/v1/comfy_proxy/queue/status",
            headers={"Cookie": f"sessionid={student.session}"},
            timeout=30,
        ).raise_for_status()
        httpx.post(
            f"{base_url}/comfyui/{student.username}/{student.port}/prompt",
            json={"prompt": workflow(0), "client_id": f"page-{student.username}"},
            headers={"Cookie": f"comfy_access={student.comfy_access}"},
            timeout=30,
        ).raise_for_status()
    Task.objects.all().delete()


# --- Measuring ------------------------------------------------------------------------------------


def emulator_runs(emulator) -> list[tuple[float, float]]:
    """(start, end) of every execution, in wall-clock seconds, from each port's /history."""
    import httpx

    runs = []
    for port in emulator.ports:
        history = httpx.get(f"http://127.0.0.1:{port}/history", timeout=30).json()
        for entry in history.values():
            stamps = {kind: data["timestamp"] for kind, data in entry["status"]["messages"]}
            end = stamps.get("execution_success") or stamps.get("execution_error")
            runs.append((stamps["execution_start"] / 1000, end / 1000))
    return runs


def handoffs(runs: list[tuple[float, float]], arrivals: list[float]) -> list[tuple[float, float]]:
    """For each run that ended while a task was waiting: (its end, its end → the next run's start).

    Slots are matched first-freed, first-filled. A slot that frees while nothing waits
    (before the burst has arrived, or after the last start) is idle, not a hand-off.
    """
    events = sorted([(end, 0) for _start, end in runs] + [(start, 1) for start, _end in runs])
    arrivals = sorted(arrivals)
    starts_seen = 0
    freed = collections.deque()
    gaps = []
    for moment, is_start in events:
        if is_start:
            starts_seen += 1
            if freed:
                ended = freed.popleft()
                gaps.append((ended, max(0.0, moment - ended)))
        elif bisect.bisect_right(arrivals, moment) > starts_seen:
            freed.append(moment)
    return gaps


def measure(options: Options, submissions: list[Submission], emulator, cpu: dict[str, float]) -> dict:
    from comfyproxy.models import Task

    tasks = list(Task.objects.all())
    statuses = collections.Counter(task.status for task in tasks)
    stats = emulator.stats()
    runs = emulator_runs(emulator)
    first_sent = submissions[0].sent_at
    last_finished = max(task.finished_at for task in tasks).timestamp()
    makespan = last_finished - first_sent
    ideal = options.tasks * options.job_seconds / options.cap
    latencies = [submission.latency for submission in submissions]
    # A task waits from the moment its submission was answered (committed), not when it was sent.
    gaps = handoffs(runs, [submission.sent_at + submission.latency for submission in submissions])
    return {
        "options": asdict(options),
        "when": datetime.now().isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
        "makespan_seconds": makespan,
        "ideal_seconds": ideal,
        "makespan_overhead": makespan / ideal - 1,
        "comfy_busy_seconds": max(end for _s, end in runs) - min(start for start, _e in runs),
        "handoff_seconds": spread([gap for _ended, gap in gaps]),
        "submission_latency_seconds": spread(latencies),
        "submission_statuses": dict(collections.Counter(submission.status for submission in submissions)),
        "task_statuses": dict(statuses),
        "max_running_seen": stats["max_running_seen"],
        "submitted_more_than_once": sorted(pid for pid, n in stats["submissions"].items() if n != 1),
        "executed_more_than_once": sorted(pid for pid, n in stats["executions"].items() if n != 1),
        "executions": len(stats["executions"]),
        # CPU seconds each part used from the first submission to the last task's end.
        "cpu_seconds": cpu,
        # The raw series behind the percentiles, in seconds since the first submission was sent,
        # to see when the slow ones happened (during the burst, or after it).
        "first_sent_at": first_sent,
        "handoffs": [[round(ended - first_sent, 4), round(gap, 4)] for ended, gap in gaps],
        "submissions": [
            [round(submission.sent_at - first_sent, 4), round(submission.latency, 4)]
            for submission in submissions
        ],
    }


def milliseconds(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


def print_table(result: dict) -> None:
    options = result["options"]
    handoff, latency = result["handoff_seconds"], result["submission_latency_seconds"]
    rows = [
        (
            "makespan",
            f"{result['makespan_seconds']:.2f} s",
            f"ideal {result['ideal_seconds']:.2f} s, +{result['makespan_overhead'] * 100:.2f}% "
            f"(goal ≤ {GOAL_MAKESPAN_OVERHEAD * 100:.0f}%)",
        ),
        (
            "hand-off p50",
            milliseconds(handoff["p50"]),
            f"{handoff['count']} hand-offs, ComfyUI end → next start",
        ),
        ("hand-off p99", milliseconds(handoff["p99"]), f"max {milliseconds(handoff['max'])} (goal < 50 ms)"),
        ("submission p50", milliseconds(latency["p50"]), f"{latency['count']} HTTP submissions"),
        (
            "submission p99",
            milliseconds(latency["p99"]),
            f"max {milliseconds(latency['max'])} (goal < 50 ms)",
        ),
        ("max running", str(result["max_running_seen"]), f"cap {options['cap']} (emulator's count)"),
        ("tasks", json.dumps(result["task_statuses"]), f"{result['executions']} executions"),
        (
            "CPU per task",
            milliseconds(result["cpu_seconds"]["dispatcher"] / options["tasks"]),
            "dispatcher; web "
            + milliseconds(result["cpu_seconds"]["web"] / options["tasks"])
            + ", emulator "
            + milliseconds(result["cpu_seconds"]["emulator"] / options["tasks"]),
        ),
        (
            "ran twice",
            str(len(result["executed_more_than_once"])),
            f"submitted twice: {len(result['submitted_more_than_once'])}",
        ),
    ]
    print(
        f"\nqueue_bench: {options['tasks']} tasks from {options['students']} students, "
        f"cap {options['cap']}, {options['job_seconds']} s jobs, "
        f"arriving over {options['arrival_seconds']} s, {options['database']}, "
        f"{options['web_workers']} uvicorn worker(s); load average {result['load_average'][0]:.2f}, "
        f"Python speed probe {result['python_loop_ms']} ms (bench/machine.py)"
    )
    width = max(len(row[0]) for row in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>12}  {note}")


def invariants_hold(result: dict) -> bool:
    return (
        result["max_running_seen"] <= result["options"]["cap"]
        and not result["submitted_more_than_once"]
        and not result["executed_more_than_once"]
        and result["task_statuses"] == {"completed": result["options"]["tasks"]}
        and result["executions"] == result["options"]["tasks"]
    )


# --- Running ----------------------------------------------------------------------------------------


def run(options: Options, workdir: Path) -> dict:
    with ExitStack() as stack:
        redis, redis_port = start_redis(workdir)
        stack.callback(stop_process, redis)
        database_url = create_database(workdir, options, stack)
        (workdir / "emulator").mkdir()
        emulator = start_emulator(
            port_count=options.students, job_seconds=options.job_seconds, output_dir=workdir / "emulator"
        )
        stack.callback(emulator.stop)
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "teaching.settings",
            "ENV": "production",
            "SECRET_KEY": secrets.token_urlsafe(40),
            "DATABASE_URL": database_url,
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "COMFY_PORT_RANGE": f"{min(emulator.ports)}-{max(emulator.ports)}",
            "LOG_LEVEL": "WARNING",
        }
        set_up_django(env)
        students = create_class(options, emulator.ports)

        web_port = free_port()
        web = start_process(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "teaching.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(web_port),
                "--workers",
                str(options.web_workers),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            env=env,
            log=workdir / "web.log",
        )
        stack.callback(stop_process, web)
        wait_for_port(web_port, timeout=60, process=web)
        base_url = f"http://127.0.0.1:{web_port}"
        warm_up(base_url, students[0])

        dispatcher_log = workdir / "dispatcher.log"
        dispatcher = start_process(
            [sys.executable, "manage.py", "comfy_dispatcher", "-v", "1"], env=env, log=dispatcher_log
        )
        stack.callback(stop_process, dispatcher)
        wait_until(
            # And its snapshot child has started (it imports Django: most of a second of CPU).
            lambda: all(
                event in dispatcher_log.read_text(errors="replace")
                for event in ("event=lease_acquired", "event=snapshot_process_ready")
            ),
            timeout=60,
            message="the dispatcher to take the lease and start its snapshot child",
        )

        processes = {"dispatcher": dispatcher, "web": web, "emulator": emulator.process, "redis": redis}
        cpu_before = {name: cpu_seconds(process.pid) for name, process in processes.items()}
        submissions = asyncio.run(submit_burst(base_url, students, options))
        from comfyproxy.models import TERMINAL_STATUSES, Task

        patience = options.tasks * options.job_seconds / options.cap * 3 + 60
        accepted = sum(submission.status == 200 for submission in submissions)
        wait_until(
            lambda: (
                Task.objects.exclude(status__in=TERMINAL_STATUSES).count() == 0
                and Task.objects.count() == accepted
            ),
            timeout=patience,
            interval=0.2,
            message="every task to finish",
        )
        cpu = {name: cpu_seconds(process.pid) - cpu_before[name] for name, process in processes.items()}
        result = measure(options, submissions, emulator, cpu)
        dispatcher.send_signal(signal.SIGTERM)
        dispatcher.wait(timeout=30)
        return result


def parse_options(argv=None) -> tuple[Options, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=Options.tasks)
    parser.add_argument("--students", type=int, default=Options.students)
    parser.add_argument("--cap", type=int, default=Options.cap)
    parser.add_argument("--job-seconds", type=float, default=Options.job_seconds)
    parser.add_argument("--arrival-seconds", type=float, default=Options.arrival_seconds)
    parser.add_argument("--web-workers", type=int, default=Options.web_workers)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default=Options.database)
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--output", type=Path, help="where to write the JSON (default bench/results/)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, database)")
    args = parser.parse_args(argv)
    options = Options(
        tasks=args.tasks,
        students=args.students,
        cap=args.cap,
        job_seconds=args.job_seconds,
        arrival_seconds=args.arrival_seconds,
        web_workers=args.web_workers,
        database=args.database,
        postgres_url=args.postgres_url,
    )
    return options, args


def main(argv=None) -> int:
    options, args = parse_options(argv)
    speed_ms = python_speed_ms()
    workdir = Path(tempfile.mkdtemp(prefix="queue-bench-"))
    try:
        result = run(options, workdir)
        result["python_loop_ms"] = speed_ms
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(result)
    output = args.output or RESULTS_DIR / f"queue_bench-{datetime.now():%Y%m%d-%H%M%S}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"  written to {output}")
    return 0 if invariants_hold(result) else 1


if __name__ == "__main__":
    sys.exit(main())
