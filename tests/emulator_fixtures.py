"""Starting the ComfyUI emulator for tests: a real server in a subprocess, on free loopback ports.

    with emulator_process(port_count=3, job_seconds=0.05) as emulator:
        emulator.url(0)                       # "http://127.0.0.1:PORT" of the first port
        emulator.ws_url(0, client_id="abc")   # "ws://127.0.0.1:PORT/ws?clientId=abc"
        emulator.set_fault(emulator.ports[1], "die")
        emulator.stats()

Fixtures: `comfy_emulator` (one port, 0.05 s jobs) and `emulator_factory` (any number of emulators with
any options, all stopped at teardown). Import them into a conftest to use them. `WebSocketRecorder`
collects a socket's events and waits for one:

    async with WebSocketRecorder.connect(emulator.ws_url(0, "me")) as events:
        ...POST /prompt with client_id "me"...
        await events.wait_for(lambda m: m["type"] == "executing" and m["data"]["node"] is None)
"""

import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.processes import free_port, stop_process

REPO_ROOT = Path(__file__).resolve().parent.parent
_READY_LINE = "ComfyUI emulator ready"
_UNREACHABLE_MODES = ("die", "refuse")


@dataclass
class EmulatorProcess:
    process: subprocess.Popen
    host: str
    ports: list[int]
    output_dir: Path
    # Everything the emulator printed so far (read by a thread, so the pipe never fills up).
    output: list[str] = field(default_factory=list)
    modes: dict[int, str] = field(default_factory=dict)

    def url(self, index: int = 0) -> str:
        return f"http://{self.host}:{self.ports[index]}"

    def ws_url(self, index: int = 0, client_id: str | None = None) -> str:
        query = "" if client_id is None else f"?clientId={client_id}"
        return f"ws://{self.host}:{self.ports[index]}/ws{query}"

    def control(self, method: str, path: str, *, json=None, avoid: int | None = None) -> httpx.Response:
        """Call an /emulator/ endpoint through a port that accepts connections (not `avoid`, if possible)."""
        reachable = [port for port in self.ports if self.modes.get(port, "normal") not in _UNREACHABLE_MODES]
        port = next((port for port in reachable if port != avoid), None) or reachable[0]
        response = httpx.request(method, f"http://{self.host}:{port}{path}", json=json, timeout=30)
        response.raise_for_status()
        return response

    def stats(self) -> dict:
        return self.control("GET", "/emulator/stats").json()

    def reset_stats(self) -> None:
        self.control("POST", "/emulator/reset")

    def set_fault(self, port: int, mode: str) -> None:
        """Returns once the mode is in effect (a revived port listens again)."""
        self.control("POST", "/emulator/faults", json={"port": port, "mode": mode}, avoid=port)
        self.modes[port] = mode

    def stop(self) -> None:
        stop_process(self.process)


def _read_output(emulator: EmulatorProcess, ready: threading.Event) -> None:
    for line in emulator.process.stdout:
        emulator.output.append(line.rstrip("\n"))
        if line.startswith(_READY_LINE):
            ready.set()
    ready.set()  # the process ended: stop waiting


def start_emulator(
    *,
    port_count: int = 1,
    job_seconds: float | None = 0.05,
    output_dir: Path,
    initial_faults: dict[int, str] | None = None,
    extra_args: tuple[str, ...] = (),
    entry: tuple[str, ...] = ("-m", "comfyproxy.emulator"),
    startup_timeout: float = 30,
) -> EmulatorProcess:
    """Start the emulator and wait for its ready line. Stop it with `.stop()`.

    `initial_faults` maps port indexes to the mode they start in ("fail", "hang", "refuse");
    `entry` runs it another way, e.g. `("manage.py", "comfy_emulator")`.
    """
    ports = sorted({free_port() for _ in range(port_count)})
    while len(ports) < port_count:
        ports = sorted({*ports, free_port()})
    modes = {ports[index]: mode for index, mode in (initial_faults or {}).items()}
    fault_args = []
    for mode in sorted(set(modes.values())):
        fault_args += [f"--{mode}-ports", ",".join(str(port) for port in ports if modes.get(port) == mode)]
    command = [
        sys.executable,
        *entry,
        "--ports",
        ",".join(map(str, ports)),
        "--output-dir",
        str(output_dir),
        *(() if job_seconds is None else ("--job-seconds", str(job_seconds))),
        *fault_args,
        *extra_args,
    ]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    emulator = EmulatorProcess(
        process=process, host="127.0.0.1", ports=ports, output_dir=output_dir, modes=modes
    )
    ready = threading.Event()
    threading.Thread(target=_read_output, args=(emulator, ready), daemon=True).start()
    if not ready.wait(startup_timeout) or process.poll() is not None:
        emulator.stop()
        raise RuntimeError("the emulator did not start:\n" + "\n".join(emulator.output[-40:]))
    return emulator


@contextlib.contextmanager
def emulator_process(**options):
    """`start_emulator(...)` as a context manager; `output_dir` defaults to a fresh temporary directory."""
    with tempfile.TemporaryDirectory(prefix="comfy-emulator-test-") as directory:
        options.setdefault("output_dir", Path(directory))
        emulator = start_emulator(**options)
        try:
            yield emulator
        finally:
            emulator.stop()


@pytest.fixture
def emulator_factory():
    """Start emulators with any options of `start_emulator`, e.g. `emulator_factory(port_count=3)`.

    All are stopped at teardown.
    """
    with contextlib.ExitStack() as stack:
        yield lambda **options: stack.enter_context(emulator_process(**options))


@pytest.fixture
def comfy_emulator(emulator_factory) -> EmulatorProcess:
    """One emulated ComfyUI on a free port, 0.05 s per workflow."""
    return emulator_factory()


class WebSocketRecorder:
    """Reads a ComfyUI WebSocket in the background and keeps its JSON messages in order."""

    # Seconds `wait_for` waits before it fails the test.
    timeout = 15.0

    def __init__(self, connection: ClientConnection):
        self.connection = connection
        self.messages: list[dict] = []
        self.closed = False
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str, *, feature_flags: bool = True, **options):
        """Connect (sending the frontend's feature_flags first, as the real UI does) and record."""
        async with connect(url, **options) as connection:
            recorder = cls(connection)
            if feature_flags:
                flags = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
                await connection.send(json.dumps(flags))
            try:
                yield recorder
            finally:
                recorder._reader.cancel()

    async def _read(self) -> None:
        try:
            async for frame in self.connection:
                if isinstance(frame, str):
                    async with self._changed:
                        self.messages.append(json.loads(frame))
                        self._changed.notify_all()
        except ConnectionClosed:
            pass
        async with self._changed:
            self.closed = True
            self._changed.notify_all()

    async def wait_until(self, condition: Callable[[list[dict]], bool]) -> None:
        """Wait until `condition(messages so far)` holds."""
        async with asyncio.timeout(self.timeout), self._changed:
            while not condition(self.messages):
                if self.closed:
                    raise AssertionError(f"socket closed before the awaited messages; got {self.types()}")
                await self._changed.wait()

    async def wait_for(self, predicate: Callable[[dict], bool], *, since: int = 0) -> dict:
        """The first message (from index `since`) that satisfies `predicate`, waiting for it if need be."""
        position = since
        async with asyncio.timeout(self.timeout), self._changed:
            while True:
                # Each message is looked at once, however many arrive while waiting.
                for message in self.messages[position:]:
                    if predicate(message):
                        return message
                position = len(self.messages)
                if self.closed:
                    raise AssertionError(f"socket closed before the awaited message; got {self.types()}")
                await self._changed.wait()

    async def wait_for_event(self, event_type: str, *, since: int = 0, **data) -> dict:
        """The first `event_type` message whose data has the given items, e.g. `node=None, prompt_id=x`."""
        missing = object()

        def matches(message: dict) -> bool:
            return message["type"] == event_type and all(
                message["data"].get(key, missing) == value for key, value in data.items()
            )

        return await self.wait_for(matches, since=since)

    async def wait_closed(self) -> None:
        async with asyncio.timeout(self.timeout), self._changed:
            await self._changed.wait_for(lambda: self.closed)

    def types(self) -> list[str]:
        return [message["type"] for message in self.messages]
