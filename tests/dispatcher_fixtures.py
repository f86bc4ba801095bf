"""Running the dispatcher in tests: in-process on a thread of its own, or as a real subprocess.

    emulator, students = classroom(3, job_seconds=0.2)   # an emulator port and a student for each
    dispatcher = start_dispatcher()             # fixture `start_dispatcher`: a Dispatcher on a thread
    dispatcher.run_step(dispatcher.dispatcher.dispatch_step)   # call a step inside its event loop
    dispatcher.stop()                           # as a first SIGTERM would; waits for the thread

    process = dispatcher_process()              # fixture: `manage.py comfy_dispatcher -v 2`
    process.wait_for_log("event=lease_acquired")
    process.process.send_signal(signal.SIGKILL)

Both use the test database (tests must be `django_db(transaction=True)` so the dispatcher sees
committed rows) and the private redis-server the harness started. Timings are shortened so
that leases, polls and graces take a second or two instead of the production defaults.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from django.db import connection, connections

from comfyproxy.comfy.client import ComfyClient, RetryPolicy, Timeouts
from comfyproxy.dispatcher import Dispatcher, DispatcherConfig
from tests.emulator_fixtures import EmulatorProcess, start_emulator
from tests.processes import stop_process, wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent

FAST_CONFIG = DispatcherConfig(
    lease_seconds=3,
    completion_poll_seconds=1,
    outage_poll_seconds=0.2,
    unreachable_grace_seconds=1.5,
    interrupt_grace_seconds=3,
    shutdown_grace_seconds=5,
)
FAST_TIMEOUTS = Timeouts(connect=1.0, request=1.5)
FAST_RETRY = RetryPolicy(attempts=3, first_backoff=0.1)
# What a dispatcher subprocess gets through its environment (settings read these).
PROCESS_ENV = {"COMFY_DISPATCHER_LEASE_SECONDS": "2", "COMFY_COMPLETION_POLL_SECONDS": "1"}


class DispatcherThread:
    """A Dispatcher running `run()` in an event loop on its own thread."""

    def __init__(self, dispatcher: Dispatcher):
        self.dispatcher = dispatcher
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="dispatcher", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.dispatcher.run())
        except BaseException as error:  # reported by stop(), in the test's thread
            self.error = error
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()
            connections.close_all()

    def start(self, *, wait_for_lease: bool = True) -> "DispatcherThread":
        self._thread.start()
        if wait_for_lease:
            wait_until(self.dispatcher.holds_lease, timeout=15, message="the dispatcher to take the lease")
        return self

    def run_step(self, step, *args, timeout: float = 15):
        """Run `await step(*args)` inside the dispatcher's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(step(*args), self.loop).result(timeout)

    def call_soon(self, function, *args) -> None:
        self.loop.call_soon_threadsafe(function, *args)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, *, timeout: float = 30) -> None:
        if self._thread.is_alive():
            self.call_soon(self.dispatcher.request_stop)
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "the dispatcher did not stop"
        if self.error is not None:
            raise self.error


def make_dispatcher(*, redis_url: str | None = None, transport_factory=None, **config) -> Dispatcher:
    return Dispatcher(
        config=replace(FAST_CONFIG, **config),
        comfy=ComfyClient(timeouts=FAST_TIMEOUTS, retry=FAST_RETRY, transport_factory=transport_factory),
        redis_url=redis_url,
    )


class RecordingTransport(httpx.AsyncHTTPTransport):
    """A real HTTP transport that also notes every request in a log it shares with others."""

    def __init__(self, log: list[httpx.Request]):
        super().__init__()
        self.log = log

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.log.append(request)
        return await super().handle_async_request(request)


class RequestRecorder:
    """A transport factory for ComfyClient whose transports all note requests here."""

    def __init__(self):
        self.requests: list[httpx.Request] = []

    def __call__(self) -> RecordingTransport:
        return RecordingTransport(self.requests)

    def bodies(self, method: str, path: str) -> list[dict]:
        return [
            json.loads(request.content)
            for request in self.requests
            if request.method == method and request.url.path == path
        ]


@pytest.fixture
def request_recorder() -> RequestRecorder:
    """Pass to `start_dispatcher(transport_factory=...)` to see every request the dispatcher sends."""
    return RequestRecorder()


@pytest.fixture
def start_dispatcher(transactional_db):
    """Start in-process dispatchers (fast timings, any DispatcherConfig field overridable).

    All are stopped at teardown."""
    started: list[DispatcherThread] = []

    def start(
        *, wait_for_lease: bool = True, redis_url: str | None = None, transport_factory=None, **config
    ) -> DispatcherThread:
        handle = DispatcherThread(
            make_dispatcher(redis_url=redis_url, transport_factory=transport_factory, **config)
        )
        started.append(handle)
        return handle.start(wait_for_lease=wait_for_lease)

    yield start
    for handle in started:
        handle.stop()


def test_database_url() -> str:
    """DATABASE_URL for a subprocess that must use this test run's database."""
    settings = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{settings['NAME']}"
    credentials = quote(settings["USER"]) + "@" if settings.get("USER") else ""
    host = quote(settings.get("HOST") or "", safe="")
    port = f":{settings['PORT']}" if settings.get("PORT") else ""
    return f"postgresql://{credentials}{host}{port}/{quote(settings['NAME'])}"


# Not a test, despite its name.
test_database_url.__test__ = False


@dataclass
class DispatcherProcess:
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, *, timeout: float = 20) -> None:
        wait_until(lambda: text in self.log(), timeout=timeout, message=f"{text!r} in the dispatcher log")

    def wait_for_exit(self, *, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        stop_process(self.process)


@pytest.fixture
def dispatcher_process(transactional_db, tmp_path):
    """Start `manage.py comfy_dispatcher -v 2` subprocesses on the test database; all stopped at teardown."""
    started: list[DispatcherProcess] = []

    def start(**environment) -> DispatcherProcess:
        log_path = tmp_path / f"dispatcher{len(started)}.log"
        env = {**os.environ, **PROCESS_ENV, "DATABASE_URL": test_database_url(), **environment}
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [sys.executable, "manage.py", "comfy_dispatcher", "-v", "2"],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        handle = DispatcherProcess(process=process, log_path=log_path)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        if handle.process.poll() is None:
            # A process stopped with SIGSTOP must be continued before it can terminate.
            handle.process.send_signal(signal.SIGCONT)
        handle.stop()


@pytest.fixture
def classroom(make_student, register_instance, settings, tmp_path):
    """`classroom(n, job_seconds=...)`: an emulator with n ports and n students, one instance each.

    Students are named student0, student1, ... and each is registered at its own port.
    """
    emulators: list[EmulatorProcess] = []

    def make(count: int, **emulator_options) -> tuple[EmulatorProcess, list]:
        settings.COMFY_PORT_RANGE = (1024, 65535)
        output_dir = tmp_path / f"emulator{len(emulators)}"
        output_dir.mkdir()
        emulator = start_emulator(port_count=count, output_dir=output_dir, **emulator_options)
        emulators.append(emulator)
        students = []
        for index, port in enumerate(emulator.ports):
            student = make_student(f"student{index}")
            register_instance(student, port)
            students.append(student)
        return emulator, students

    yield make
    for emulator in emulators:
        emulator.stop()
