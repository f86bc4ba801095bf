"""What the fault suite needs beyond the shared fixtures: a Redis that can be stopped and started
again, web servers pointed at it, students' browsers, and the end-of-run invariant check.

    redis = private_redis()                       # its own redis-server, restartable on its port
    web = web_server(redis_url=redis.url, workers=2)   # uvicorn on the test database
    browser = web.browser(student)                # session + CSRF, as the practice page sends them
    check_invariants(emulator, task_ids, cap=2)   # I1-I4 against the emulator's own record

Every run records its figures (durations, counts, seed) in test-artifacts/fault-suite.json and
prints them at the end of the session, so the README can quote them.
"""

import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.db import connection
from django.test import Client

from comfyproxy.models import TERMINAL_STATUSES, Task, TaskStatus
from tests.dispatcher_fixtures import test_database_url
from tests.emulator_fixtures import EmulatorProcess
from tests.processes import free_port, stop_process, wait_for_port, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
REPORT_PATH = REPO_ROOT / "test-artifacts" / "fault-suite.json"
_reported: dict[str, dict] = {}


@pytest.fixture(autouse=True)
def _cheap_password_hashes(fast_password_hashing):
    """Classes of 30 students: their (unused) passwords must not cost a second each."""


# --- Redis that a test may take away --------------------------------------------------------


@dataclass
class RedisServer:
    """A redis-server of the test's own, always on the same port, so clients can find it again."""

    port: int
    directory: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        # As Debian ships it for this project: no persistence, so a restart also empties it.
        self.process = subprocess.Popen(
            [
                *(shutil.which("redis-server") or "redis-server", "--port", str(self.port)),
                *("--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
                *("--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, timeout=10, process=self.process, log=self.directory / "redis.log")

    def stop(self) -> None:
        stop_process(self.process)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


@pytest.fixture
def private_redis(tmp_path):
    servers: list[RedisServer] = []

    def start() -> RedisServer:
        directory = tmp_path / f"redis{len(servers)}"
        directory.mkdir()
        server = RedisServer(port=free_port(), directory=directory)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        if server.process is not None:
            stop_process(server.process)


# --- Web servers and the people using them -----------------------------------------------------


@dataclass
class WebServer:
    """uvicorn serving teaching.asgi (HTTP and the queue socket) on the test database."""

    process: subprocess.Popen
    port: int
    log_path: Path
    env: dict[str, str]

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def browser(self, user) -> httpx.Client:
        """The practice page's requests: the session cookie, the CSRF token, this origin."""
        login = Client()
        login.force_login(user)
        token = secrets.token_hex(16)
        client = httpx.Client(
            base_url=self.origin,
            timeout=30,
            headers={"Origin": self.origin, "X-CSRFToken": token},
            cookies={settings.SESSION_COOKIE_NAME: login.cookies[settings.SESSION_COOKIE_NAME].value},
        )
        client.cookies.set(settings.CSRF_COOKIE_NAME, token)
        return client


@pytest.fixture
def web_server(transactional_db, tmp_path):
    """`web_server(redis_url=..., workers=...)`: uvicorn subprocesses, all stopped at teardown."""
    started: list[WebServer] = []

    def start(*, redis_url: str | None = None, workers: int = 1) -> WebServer:
        port = free_port()
        env = {
            **os.environ,
            "DATABASE_URL": test_database_url(),
            "REDIS_URL": redis_url or settings.REDIS_URL,
            "SITE_ORIGIN": f"http://127.0.0.1:{port}",
            "COMFY_PUBLIC_ORIGIN": f"http://localhost:{port}",
            # The emulator listens on free ports anywhere: let the entry links reach them.
            "COMFY_PORT_RANGE": "1024-65535",
            "COMFY_GPU_HOST": "127.0.0.1",
        }
        log_path = tmp_path / f"web{len(started)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "uvicorn", "teaching.asgi:application"),
                    *("--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)),
                    *("--lifespan", "off", "--no-access-log"),
                ],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = WebServer(process=process, port=port, log_path=log_path, env=env)
        started.append(server)
        wait_for_port(port, timeout=60, process=process, log=log_path)
        return server

    yield start
    for server in started:
        # --workers N forks: stop the whole process group.
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGTERM)
            try:
                server.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.process.pid, signal.SIGKILL)
                server.process.wait(timeout=10)


# --- Invariants and figures ---------------------------------------------------------------------


def small_workflow(color: int) -> dict:
    """A two-node workflow; give each task a colour of its own so ComfyUI's cache never skips a run."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "fault"}},
    }


def wait_until_all_finished(task_ids, *, timeout: float) -> None:
    wait_until(
        lambda: not Task.objects.filter(pk__in=list(task_ids)).exclude(status__in=TERMINAL_STATUSES).exists(),
        timeout=timeout,
        interval=0.1,
        message="every accepted task to reach a terminal state",
    )


@dataclass
class InvariantReport:
    tasks: int
    by_status: dict[str, int]
    max_running_seen: int
    cap: int
    executions: dict[str, int] = field(repr=False)

    def as_dict(self) -> dict:
        return {
            "tasks": self.tasks,
            "by_status": self.by_status,
            "max_running_seen": self.max_running_seen,
            "cap": self.cap,
        }


def check_invariants(emulator: EmulatorProcess, task_ids, *, cap: int) -> InvariantReport:
    """At the end of a run, against ComfyUI's own record (the emulator's) and the database:

    I1 running at once never exceeded the cap; I2 every accepted task reached a terminal state;
    I3 no prompt id was submitted or executed twice, and each completed task ran exactly once;
    I4 no slot is still held.
    """
    ids = {str(task_id) for task_id in task_ids}
    tasks = list(Task.objects.filter(pk__in=ids))
    assert len(tasks) == len(ids), "an accepted task vanished from the database"
    unfinished = [task for task in tasks if task.status not in TERMINAL_STATUSES]
    assert not unfinished, f"I2: not finished: {unfinished}"
    assert not Task.objects.processing().exists(), "I4: a slot is still held"
    stats = emulator.stats()
    assert stats["max_running_seen"] <= cap, f"I1: {stats['max_running_seen']} ran at once, cap {cap}"
    submitted_twice = {pid: n for pid, n in stats["submissions"].items() if n > 1}
    assert not submitted_twice, f"I3: submitted more than once: {submitted_twice}"
    executed_twice = {pid: n for pid, n in stats["executions"].items() if n > 1}
    assert not executed_twice, f"I3: executed more than once: {executed_twice}"
    completed = [str(task.pk) for task in tasks if task.status == TaskStatus.COMPLETED]
    never_ran = [pid for pid in completed if stats["executions"].get(pid) != 1]
    assert not never_ran, f"completed without running in ComfyUI: {never_ran}"
    by_status: dict[str, int] = {}
    for task in tasks:
        by_status[task.status] = by_status.get(task.status, 0) + 1
    return InvariantReport(
        tasks=len(tasks),
        by_status=by_status,
        max_running_seen=stats["max_running_seen"],
        cap=cap,
        executions=stats["executions"],
    )


@pytest.fixture
def fault_report(request):
    """Record this run's figures under its test's name and database (written when the test ends)."""
    figures: dict = {}
    started = time.monotonic()
    yield figures
    figures.setdefault("seconds", round(time.monotonic() - started, 1))
    figures["passed"] = not getattr(request.node, "fault_run_failed", False)
    # One entry per test and database: the suite runs again on PostgreSQL (-m postgres).
    _reported[f"{request.node.name} ({connection.vendor})"] = figures
    REPORT_PATH.parent.mkdir(exist_ok=True)
    # The SQLite and PostgreSQL runs may write at once (scripts/test.sh runs them side by side).
    with (REPORT_PATH.parent / ".fault-suite.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        existing = json.loads(REPORT_PATH.read_text()) if REPORT_PATH.exists() else {}
        partial = REPORT_PATH.with_suffix(".json.partial")
        partial.write_text(json.dumps({**existing, **_reported}, indent=2, sort_keys=True) + "\n")
        partial.replace(REPORT_PATH)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "call" and outcome.get_result().failed:
        item.fault_run_failed = True


def pytest_terminal_summary(terminalreporter):
    if not _reported:
        return
    terminalreporter.section("fault suite figures")
    for name, figures in sorted(_reported.items()):
        terminalreporter.write_line(f"{name}: {json.dumps(figures, sort_keys=True)}")
    terminalreporter.write_line(f"(also in {REPORT_PATH.relative_to(REPO_ROOT)})")
