"""The class-scale benchmark: a whole class at once, through nginx, Django, Redis and the dispatcher.

    .venv/bin/python -m bench.classroom                       # 300 students, PostgreSQL, cap 10
    .venv/bin/python -m bench.classroom --database sqlite     # the single-machine default database
    .venv/bin/python -m bench.classroom --students 30 --cap 2 --job-seconds 0.5-1

It starts the whole system on free loopback ports (bench/stack.py), with one emulated
ComfyUI per student, then plays a lesson's worst minute from one asyncio process:

1. Every student is logged in (a session is created in the database, as Django's login
   writes it: the login form's password hash is deliberately slow and not the queue's
   cost), asks the practice API for its ComfyUI entry link and goes through it (the
   `comfy_access` cookie), all through nginx.
2. Every student opens the queue WebSocket the script injected into ComfyUI's page opens.
3. The class burst: each student presses Queue once, at a random moment within one second,
   which POSTs ComfyUI's own body to `/comfyui/<user>/<port>/api/prompt` through nginx.
   Jobs take 1-3 s each (the emulator's timing model for the workflow each student sends).
4. The queue runs until every task has finished. Every frame every socket receives is
   kept, and checked afterwards against the database and ComfyUI's own history.
5. Memory: with the queue paused, the class queues 1,000 more tasks; the queue runs again
   while the web server's and the dispatcher's resident memory is sampled, then a teacher
   cancels them all.
6. The gate: ComfyUI's frontend files fetched directly, through a plain nginx proxy_pass
   and through the gated ComfyUI origin, side by side (bench/gate_bench.py's method).

It prints each figure beside its goal and the seed design's, and writes everything to
bench/results/classroom-<time>.json. bench/README.md explains each figure.
"""

import argparse
import asyncio
import bisect
import collections
import contextlib
import getpass
import http.client
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path

import httpx
import uvloop
import websockets
from websockets.exceptions import ConnectionClosed
from websockets.frames import Opcode

from bench.gate_bench import BASELINE_CONFIG, FRONTEND, NGINX, WARM_UP, Route, frontend_files
from bench.machine import python_speed_ms
from bench.queue_bench import handoffs, percentile
from bench.stack import REPO_ROOT, Stack, StackOptions, memory_mb, running_stack
from tests.processes import free_port, stop_process, wait_for_port

RESULTS_DIR = REPO_ROOT / "bench" / "results"
TERMINAL = frozenset({"completed", "failed", "cancelled"})

# Goals (issues: the queue and the benchmark) and the seed design's figures.
PUSH_P99_GOAL_MS = 100
HANDOFF_P99_GOAL_MS = 50
MAKESPAN_GOAL = 1.03
SEED_POLL_MS = 2000  # the seed's page polls every 2 s and its worker hands off no faster

# Two radius-31 blurs of a square image cost about 3 µs per pixel in the emulator's timing
# model (fitted to the recorded 2-core ComfyUI machine); the fill and a 64 px preview add little.
SECONDS_PER_PIXEL = 2 * 63**2 * 3.73e-10 + 6e-9 + 3e-8
# ComfyUI's history timestamps are whole milliseconds, truncated.
COMFY_CLOCK_STEP = 0.001
# How long sockets may take to catch up with the last broadcast once the queue is empty.
SETTLE_SECONDS = 10
# How long the queued tasks are held while memory is sampled, and how often.
MEMORY_HOLD_SECONDS = 3.0
MEMORY_SAMPLE_SECONDS = 0.2
SUBMIT_CONCURRENCY = 50
CONNECT_CONCURRENCY = 50


# --- The workload ---------------------------------------------------------------------------


def job_range(text: str) -> tuple[float, float]:
    low, _, high = text.partition("-")
    try:
        bounds = (float(low), float(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds like 1-3, got {text!r}") from None
    if not 0 < bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected 0 < low <= high, got {text!r}")
    return bounds


def prompt_body(seconds: float, rng: random.Random) -> dict:
    """What ComfyUI's frontend POSTs for a workflow that runs about `seconds` in the emulator."""
    side = max(64, round(math.sqrt(seconds / SECONDS_PER_PIXEL)))
    blur = {"blur_radius": 31, "sigma": 10.0}
    prompt = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": side, "height": side, "batch_size": 1, "color": rng.randrange(1 << 24)},
        },
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], **blur}},
        "3": {"class_type": "ImageBlur", "inputs": {"image": ["2", 0], **blur}},
        "4": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["3", 0],
                "upscale_method": "bilinear",
                "width": 64,
                "height": 64,
                "crop": "disabled",
            },
        },
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    # The frontend also sends its UI graph (the PNG metadata), about this size for five nodes.
    nodes = [
        {
            "id": int(node_id),
            "type": node["class_type"],
            "pos": [300 * int(node_id), 200],
            "size": [315, 130],
            "flags": {},
            "order": int(node_id) - 1,
            "mode": 0,
            "inputs": [],
            "outputs": [],
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": [value for value in node["inputs"].values() if not isinstance(value, list)],
        }
        for node_id, node in prompt.items()
    ]
    links = [[index, index, 0, index + 1, 0, "IMAGE"] for index in range(1, 5)]
    workflow = {
        "last_node_id": 5,
        "last_link_id": 4,
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"frontendVersion": "1.27.10"},
        "version": 0.4,
    }
    return {
        "client_id": uuid.uuid4().hex,
        "prompt": prompt,
        "extra_data": {"extra_pnginfo": {"workflow": workflow}},
    }


# --- The class ------------------------------------------------------------------------------


@dataclass
class Student:
    username: str
    port: int
    session_key: str
    access_cookie: str = ""


def create_class(count: int, ports: list[int], *, prefix: str = "student") -> list[Student]:
    """Students with a running ComfyUI each, logged in: a session as Django's login writes it."""
    from importlib import import_module

    from django.conf import settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
    from django.contrib.auth.hashers import make_password

    from comfyproxy.services import instances

    users = get_user_model().objects
    usernames = [f"{prefix}{number:03d}" for number in range(count)]
    users.bulk_create(users.model(username=name, password=make_password(None)) for name in usernames)
    session_store = import_module(settings.SESSION_ENGINE).SessionStore
    students = []
    for user, port in zip(users.filter(username__in=usernames).order_by("username"), ports, strict=True):
        instances.register_instance(user=user, port=port)
        session = session_store()
        session[SESSION_KEY] = str(user.pk)
        session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
        session[HASH_SESSION_KEY] = user.get_session_auth_hash()
        session.create()
        students.append(Student(user.username, port, session.session_key))
    return students


async def enter_comfyui(http: httpx.AsyncClient, stack: Stack, student: Student) -> None:
    """What the practice page does: fetch the iframe's one-time entry link and follow it."""
    from django.conf import settings

    from comfyproxy.gateway import ACCESS_COOKIE

    status = await http.get(
        f"{stack.site_origin}/api/v1/practice/status",
        headers={"Cookie": f"{settings.SESSION_COOKIE_NAME}={student.session_key}"},
    )
    if status.status_code != 200 or not status.json().get("iframe_url"):
        raise RuntimeError(f"{student.username}: practice status answered {status.status_code} {status.text}")
    entry = await http.get(status.json()["iframe_url"])
    if entry.status_code != 302 or ACCESS_COOKIE not in entry.cookies:
        raise RuntimeError(f"{student.username}: the ComfyUI entry answered {entry.status_code}")
    student.access_cookie = entry.cookies[ACCESS_COOKIE]


def access_headers(stack: Stack, student: Student) -> dict:
    from comfyproxy.gateway import ACCESS_COOKIE

    return {"Cookie": f"{ACCESS_COOKIE}={student.access_cookie}", "Origin": stack.comfy_origin}


@dataclass(frozen=True)
class Frame:
    arrival: float
    as_of: float
    # (task id, status, position) of each of the student's own tasks.
    tasks: tuple[tuple[str, str, int], ...]


class StampedConnection(websockets.ClientConnection):
    """A client connection that notes when each message's bytes reached this process.

    One process plays the whole class: when a broadcast reaches 300 sockets at once, the
    reader tasks parse them one after another, so a time taken in the reader would add
    the parsing of every other student's frame to the last student's latency. A real
    class has a browser per student; the time the bytes were read off the socket is
    what each of them would see.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.arrivals: collections.deque[float] = collections.deque()
        self._read_at = 0.0

    def data_received(self, data: bytes) -> None:
        self._read_at = time.time()
        super().data_received(data)

    def process_event(self, event) -> None:
        # The server sends each message as one frame (no fragments): one stamp per message.
        # (The handshake's response is an event too, without an opcode.)
        if getattr(event, "opcode", None) in (Opcode.TEXT, Opcode.BINARY):
            self.arrivals.append(self._read_at)
        super().process_event(event)


class QueueSocket:
    """One student's queue socket on the ComfyUI origin, keeping every frame with its arrival time."""

    def __init__(self, student: Student, connection, changed: asyncio.Event):
        self.student = student
        self.connection = connection
        self.frames: list[Frame] = []
        self.dropped = False
        self._changed = changed
        self._awaited: set[str] = set()
        self.all_awaited_finished = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, stack: Stack, student: Student, changed: asyncio.Event) -> "QueueSocket":
        connection = await websockets.connect(
            f"ws://127.0.0.1:{stack.comfy_port}/comfyui/{student.username}/{student.port}/queue-ws/",
            origin=stack.comfy_origin,
            additional_headers={"Cookie": access_headers(stack, student)["Cookie"]},
            max_queue=None,
            open_timeout=60,
            create_connection=StampedConnection,
        )
        return cls(student, connection, changed)

    async def _read(self) -> None:
        try:
            async for raw in self.connection:
                arrival = self.connection.arrivals.popleft()
                message = json.loads(raw)
                tasks = tuple(
                    (task["task_id"], task["status"], task["position"]) for task in message["tasks"]
                )
                self.frames.append(Frame(arrival, message["as_of"], tasks))
                self._check_awaited()
                self._changed.set()
        except ConnectionClosed:
            pass
        self.dropped = True
        self._changed.set()

    def await_finished(self, task_ids) -> None:
        """Set `all_awaited_finished` once the socket has shown every one of these tasks finished."""
        self._awaited = set(task_ids)
        self.all_awaited_finished.clear()
        self._check_awaited()

    def _check_awaited(self) -> None:
        if not self._awaited:
            self.all_awaited_finished.set()
            return
        if not self.frames:
            return
        shown = {task_id: status for task_id, status, _position in self.frames[-1].tasks}
        if all(shown.get(task_id) in TERMINAL for task_id in self._awaited):
            self.all_awaited_finished.set()

    @property
    def last_as_of(self) -> float:
        return self.frames[-1].as_of if self.frames else 0.0

    async def close(self) -> None:
        self._reader.cancel()
        await self.connection.close()


@dataclass
class Submission:
    username: str
    job_seconds: float
    sent: float = 0.0
    answered: float = 0.0
    http_status: int = 0
    prompt_id: str = ""
    error: str = ""

    @property
    def latency_ms(self) -> float:
        return (self.answered - self.sent) * 1000


async def submit(
    http: httpx.AsyncClient, stack: Stack, student: Student, submission: Submission, rng: random.Random
) -> None:
    """Press Queue in ComfyUI: its own body, to its own address, through nginx."""
    body = json.dumps(prompt_body(submission.job_seconds, rng)).encode()
    headers = {**access_headers(stack, student), "Content-Type": "application/json"}
    url = f"{stack.comfy_origin}/comfyui/{student.username}/{student.port}/api/prompt"
    submission.sent = time.time()
    try:
        reply = await http.post(url, content=body, headers=headers)
    except httpx.HTTPError as error:
        submission.answered = time.time()
        submission.error = repr(error)
        return
    submission.answered = time.time()
    submission.http_status = reply.status_code
    if reply.status_code == 200:
        submission.prompt_id = reply.json()["prompt_id"]
    else:
        submission.error = reply.text[:300]


async def wait_for_all(sockets: list[QueueSocket], within: float) -> bool:
    """True once every socket has shown its awaited tasks finished; False after `within` seconds."""
    try:
        async with asyncio.timeout(within):
            await asyncio.gather(*(socket.all_awaited_finished.wait() for socket in sockets))
    except TimeoutError:
        return False
    return True


async def first_frames(sockets: list[QueueSocket], changed: asyncio.Event) -> float:
    """Wait until every socket has the state sent on connecting; returns the latest one's as_of.

    The handshake completes before the consumer reads that state, so only a frame read
    after all of them is surely a broadcast that every socket should receive.
    """
    async with asyncio.timeout(SETTLE_SECONDS):
        while not all(socket.frames or socket.dropped for socket in sockets):
            changed.clear()
            await changed.wait()
    return max(socket.frames[0].as_of for socket in sockets if socket.frames)


async def settle(sockets: list[QueueSocket], changed: asyncio.Event) -> float:
    """Wait until every live socket has the newest broadcast any socket has; returns its as_of."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        newest = max(socket.last_as_of for socket in sockets)
        if all(socket.dropped or socket.last_as_of >= newest for socket in sockets):
            return newest
        changed.clear()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return newest
        try:
            await asyncio.wait_for(changed.wait(), remaining)
        except TimeoutError:
            continue


async def comfy_history(http: httpx.AsyncClient, port: int, prompt_id: str) -> dict:
    """ComfyUI's own record of a prompt (asked of the instance directly, not through nginx)."""
    reply = await http.get(f"http://127.0.0.1:{port}/history/{prompt_id}")
    reply.raise_for_status()
    return reply.json().get(prompt_id, {})


# --- Memory with 1,000 tasks queued ---------------------------------------------------------------


async def memory_phase(
    http,
    stack: Stack,
    students: list[Student],
    sockets: list[QueueSocket],
    tasks: int,
    job: tuple[float, float],
    rng: random.Random,
) -> dict:
    """Queue `tasks` more across the class, sample memory while they wait, then cancel them all.

    The queue is paused while they arrive, so that all of them wait at once however slowly
    they come in, then resumed for the sampling window: runs start and every change sends
    the whole queue to every socket, as in a lesson.
    """
    from asgiref.sync import sync_to_async
    from django.db import connections

    from comfyproxy.models import Task
    from comfyproxy.services import control

    operator = control.ConsoleOperator.current()
    per_student = math.ceil(tasks / len(students))
    await sync_to_async(control.set_student_limit)(actor=operator, value=per_student)
    await sync_to_async(control.pause_queue)(actor=operator)
    submissions = [
        (
            students[number % len(students)],
            Submission(students[number % len(students)].username, rng.uniform(*job)),
        )
        for number in range(tasks)
    ]
    gate = asyncio.Semaphore(SUBMIT_CONCURRENCY)

    async def queue_one(student, submission):
        async with gate:
            await submit(http, stack, student, submission, rng)

    samples: list[dict] = []
    sampling = asyncio.Event()

    async def sample_memory():
        while not sampling.is_set():
            samples.append(
                {
                    "web_mb": sum(memory_mb(pid, "VmRSS") for pid in stack.web_pids()),
                    "web_worker_max_mb": max(memory_mb(pid, "VmRSS") for pid in stack.web_pids()),
                    "dispatcher_mb": sum(memory_mb(pid, "VmRSS") for pid in stack.components()["dispatcher"]),
                }
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sampling.wait(), MEMORY_SAMPLE_SECONDS)

    sampler = asyncio.create_task(sample_memory())
    started = time.time()
    await asyncio.gather(*(queue_one(student, submission) for student, submission in submissions))
    submitted_s = time.time() - started
    queued = await sync_to_async(lambda: Task.objects.queued().count())()
    await sync_to_async(control.resume_queue)(actor=operator)
    await asyncio.sleep(MEMORY_HOLD_SECONDS)  # the sampling window
    sampling.set()
    await sampler

    ids_by_owner: dict[str, set[str]] = {}
    for student, submission in submissions:
        if submission.prompt_id:
            ids_by_owner.setdefault(student.username, set()).add(submission.prompt_id)
    active = await sync_to_async(lambda: list(Task.objects.active()))()
    cancelled = await sync_to_async(control.cancel_tasks)(actor=operator, tasks=active)
    for socket in sockets:
        socket.await_finished(ids_by_owner.get(socket.student.username, ()))
    all_cancelled = await wait_for_all(sockets, within=60)
    await sync_to_async(control.set_student_limit)(actor=operator, value=None)
    await sync_to_async(connections.close_all)()

    errors = [submission for _student, submission in submissions if submission.http_status != 200]
    return {
        "tasks": tasks,
        "submitted_in_s": round(submitted_s, 2),
        "submission_errors": len(errors),
        "error_examples": sorted({submission.error for submission in errors})[:5],
        "queued_when_sampled": queued,
        "web_peak_mb": round(max(sample["web_mb"] for sample in samples), 1),
        "web_worker_peak_mb": round(max(sample["web_worker_max_mb"] for sample in samples), 1),
        "dispatcher_peak_mb": round(max(sample["dispatcher_mb"] for sample in samples), 1),
        "web_workers": len(stack.web_pids()),
        "samples": len(samples),
        "cancelled_by_teacher": cancelled.affected,
        "all_cancelled_shown": all_cancelled,
    }


# --- The gate -------------------------------------------------------------------------------------


def gate_phase(stack: Stack, routes_for: dict[str, tuple[int, str, str]], requests: int) -> dict:
    """ComfyUI's files directly, through a plain proxy_pass and through the gated ComfyUI origin.

    `routes_for` maps each upstream's name to (its port, a student with an instance there,
    that student's comfy_access). Routes take turns request by request, so any drift of the
    machine hits them alike; ratios are of medians.
    """
    from comfyproxy.gateway import ACCESS_COOKIE

    runtime = stack.workdir / "baseline-nginx"
    runtime.mkdir()
    (emulator_port, _, _), (static_port, _, _) = routes_for["the emulator"], routes_for["a static nginx"]
    plain_ports = {"the emulator": free_port(), "a static nginx": free_port()}
    (runtime / "nginx.conf").write_text(
        BASELINE_CONFIG.format(
            user=getpass.getuser(),
            runtime=runtime,
            frontend=FRONTEND,
            emulator_port=emulator_port,
            static_port=static_port,
            plain_emulator_port=plain_ports["the emulator"],
            plain_static_port=plain_ports["a static nginx"],
        )
    )
    baseline = subprocess.Popen(
        [NGINX, "-c", str(runtime / "nginx.conf"), "-p", str(runtime), "-g", "daemon off;"],
        stderr=(runtime / "stderr.log").open("wb"),
    )
    try:
        for port in (static_port, *plain_ports.values()):
            wait_for_port(port, timeout=10, process=baseline)
        results = []
        for path, size in frontend_files():
            for upstream, (port, username, cookie) in routes_for.items():
                routes = [
                    Route("direct", port, "/", {}),
                    Route("plain proxy_pass", plain_ports[upstream], "/", {}),
                    Route(
                        "gated",
                        stack.comfy_port,
                        f"/comfyui/{username}/{port}/",
                        {"Cookie": f"{ACCESS_COOKIE}={cookie}"},
                    ),
                ]
                resets = Counter()
                for route in routes:
                    for _ in range(min(WARM_UP, requests)):
                        fetch_again_on_reset(route, path, resets)
                for _ in range(requests):
                    for route in routes:
                        route.samples.append(fetch_again_on_reset(route, path, resets))
                medians = {route.name: statistics.median(route.samples) * 1000 for route in routes}
                results.append(
                    {
                        "file": path,
                        "bytes": size,
                        "upstream": upstream,
                        "requests": requests,
                        "p50_ms": {name: round(value, 3) for name, value in medians.items()},
                        "p99_ms": {
                            route.name: round(percentile(route.samples, 0.99) * 1000, 3) for route in routes
                        },
                        "gated_over_plain": round(medians["gated"] / medians["plain proxy_pass"], 2),
                        "gated_over_direct": round(medians["gated"] / medians["direct"], 2),
                        "plain_over_direct": round(medians["plain proxy_pass"] / medians["direct"], 2),
                        "connections_reset": dict(resets),
                    }
                )
        return {"files": results}
    finally:
        stop_process(baseline)


def fetch_again_on_reset(route: Route, path: str, resets: Counter) -> float:
    """Fetch once more on a fresh connection if the kept-alive one was reset, as browsers do."""
    try:
        return route.fetch(path)
    except (ConnectionError, http.client.HTTPException):
        resets[route.name] += 1
        route.connection.close()
        return route.fetch(path)


# --- Figures ----------------------------------------------------------------------------------------


def spread(values_ms) -> dict:
    values = list(values_ms)
    if not values:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    return {
        "count": len(values),
        "p50": round(statistics.median(values), 1),
        "p99": round(percentile(values, 0.99), 1),
        "max": round(max(values), 1),
    }


@dataclass
class TaskRecord:
    """One class task as the client, the database and ComfyUI saw it (seconds since the epoch)."""

    prompt_id: str
    username: str
    rank: int  # 1-based place in queue order
    sent: float
    answered: float
    started: float  # claimed by the dispatcher (database)
    finished: float  # recorded as ended (database)
    status: str
    comfy_start: float  # ComfyUI's execution_start
    comfy_end: float  # ComfyUI's execution_success (or error)


def task_records(submissions: list[Submission], histories: dict[str, dict]) -> list[TaskRecord]:
    from comfyproxy.models import Task

    by_id = {submission.prompt_id: submission for submission in submissions if submission.prompt_id}
    rows = (
        Task.objects.filter(pk__in=list(by_id))
        .in_queue_order()
        .values_list("id", "owner__username", "started_at", "finished_at", "status")
    )
    records = []
    for rank, (task_id, username, started_at, finished_at, status) in enumerate(rows, start=1):
        submission = by_id[str(task_id)]
        messages = dict(
            (event, data["timestamp"] / 1000)
            for event, data in histories.get(str(task_id), {}).get("status", {}).get("messages", [])
        )
        records.append(
            TaskRecord(
                prompt_id=str(task_id),
                username=username,
                rank=rank,
                sent=submission.sent,
                answered=submission.answered,
                started=started_at.timestamp() if started_at else math.inf,
                finished=finished_at.timestamp() if finished_at else math.inf,
                status=status,
                comfy_start=messages.get("execution_start", math.inf),
                comfy_end=messages.get("execution_success", messages.get("execution_error", math.inf)),
            )
        )
    return records


def own_states(frames: list[Frame], prompt_id: str) -> list[tuple[float, float, str, int]]:
    """(arrival, as_of, status, position) of every frame that showed this task."""
    return [
        (frame.arrival, frame.as_of, status, position)
        for frame in frames
        for task_id, status, position in frame.tasks
        if task_id == prompt_id
    ]


def position_figures(records: list[TaskRecord], frames_by_task: dict, burst_start: float) -> dict:
    """When each student first saw a right state of their task, and whether any frame was wrong.

    A frame's state was read at some moment between its `as_of` (taken before the read)
    and its arrival. A "queued at position p" is right if p - 1 lies between the tasks
    ahead that surely still waited then (answered before as_of, claimed after arrival) and
    those that possibly did (sent before arrival, not yet executing at as_of); "processing"
    is right if the claim came before arrival; a final state if it is the recorded one.
    """
    answered, started, sent, executing = [], [], [], []  # of the tasks ahead, kept sorted
    first_right, wrong, checked = {}, 0, 0
    for record in sorted(records, key=lambda record: record.rank):
        for arrival, as_of, status, position in frames_by_task[record.prompt_id]:
            checked += 1
            if status == "queued":
                surely = bisect.bisect_right(answered, as_of) - bisect.bisect_right(started, arrival)
                possibly = bisect.bisect_right(sent, arrival) - bisect.bisect_right(
                    executing, as_of - COMFY_CLOCK_STEP
                )
                right = (
                    record.comfy_start + COMFY_CLOCK_STEP > as_of
                    and max(surely, 0) + 1 <= position <= possibly + 1
                )
            elif status == "processing":
                right = record.started <= arrival
            else:
                right = status == record.status and record.finished <= arrival
            if right:
                first_right.setdefault(record.prompt_id, arrival)
            else:
                wrong += 1
        for values, value in (
            (answered, record.answered),
            (started, record.started),
            (sent, record.sent),
            (executing, record.comfy_start),
        ):
            bisect.insort(values, value)
    shown_after_reply = [
        (first_right[record.prompt_id] - record.answered) * 1000
        for record in records
        if record.prompt_id in first_right
    ]
    return {
        "students_shown_a_right_state": len(first_right),
        "all_right_after_burst_start_s": (
            round(max(first_right.values()) - burst_start, 2) if len(first_right) == len(records) else None
        ),
        "right_state_after_reply_ms": spread(shown_after_reply),
        "frames_checked": checked,
        "frames_wrong": wrong,
    }


def lost_updates(sockets: list[QueueSocket], after: float, until: float) -> dict:
    """Broadcasts some socket received but another did not (each broadcast has one `as_of`)."""
    received = [
        {frame.as_of for frame in socket.frames if after < frame.as_of <= until} for socket in sockets
    ]
    broadcasts = set().union(*received)
    missed = sum(len(broadcasts - seen) for seen in received)
    return {
        "broadcasts": len(broadcasts),
        "deliveries": len(broadcasts) * len(sockets) - missed,
        "lost": missed,
    }


def run_figures(records: list[TaskRecord], cap: int, frames_by_task: dict, settled_after: float) -> dict:
    """Hand-off, makespan and position push, from ComfyUI's own history timestamps.

    Hand-off: ComfyUI finished one task → ComfyUI started the next. Push: pairing the k-th
    finish with the (cap+k)-th start, that finish → each waiting student's socket shows
    the position that start left them at (or a later one); only finishes after every
    submission was answered count. Makespan: first start → last finish, against the
    ideal (total job time / cap) and against FIFO on the same job times with no overhead.
    """
    done = [record for record in records if math.isfinite(record.comfy_start + record.comfy_end)]
    if len(done) <= cap:
        return {}
    # Hand-offs as bench/queue_bench.py counts them: a slot freed while a task waited → the next start.
    runs = [(record.comfy_start, record.comfy_end) for record in done]
    handoff_ms = [gap * 1000 for _ended, gap in handoffs(runs, [record.sent for record in records])]
    ends = sorted(done, key=lambda record: record.comfy_end)
    starts = sorted(done, key=lambda record: record.comfy_start)
    pairs = list(zip(ends, starts[cap:], strict=False))

    job_seconds = [record.comfy_end - record.comfy_start for record in done]
    makespan = max(record.comfy_end for record in done) - min(record.comfy_start for record in done)
    ideal = sum(job_seconds) / cap

    push = push_figures(records, pairs, frames_by_task, settled_after)
    fifo = simulated_makespan(records, cap, handoff=0.0)
    seed = simulated_makespan(records, cap, handoff=SEED_POLL_MS / 1000)
    return {
        "job_seconds": {
            "mean": round(statistics.fmean(job_seconds), 2),
            "min": round(min(job_seconds), 2),
            "max": round(max(job_seconds), 2),
        },
        "handoff_ms": spread(handoff_ms),
        # Once every submission was answered, the web workers no longer compete for the CPU.
        "handoff_after_burst_ms": spread(
            (start.comfy_start - end.comfy_end) * 1000
            for end, start in pairs
            if end.comfy_end >= settled_after
        ),
        "makespan_s": round(makespan, 2),
        "ideal_s": round(ideal, 2),
        "makespan_over_ideal": round(makespan / ideal, 4),
        "fifo_without_overhead_over_ideal": round(fifo / ideal, 4),
        "makespan_over_fifo_without_overhead": round(makespan / fifo, 4),
        "seed_makespan_over_ideal": round(seed / ideal, 3),
        **push,
    }


def push_figures(records: list[TaskRecord], pairs, frames_by_task: dict, settled_after: float) -> dict:
    """For each (finish, start) pair: when each student still waiting saw where that start left them.

    A frame shows it when the task is no longer queued or its position is at most 1 + the
    tasks ahead that were still queued after the start's claim. Positions only fall (FIFO,
    nothing cancelled), so each socket's frames are read once, front to back.
    """
    counted = [(end, start) for end, start in pairs if end.comfy_end >= settled_after]
    push_ms, never_shown = [], 0
    first_read: dict[int, float] = {}
    last_arrival: dict[int, float] = {}
    claims_ahead: list[float] = []  # claim times of the tasks ahead, sorted
    for record in sorted(records, key=lambda record: record.rank):
        frames = frames_by_task[record.prompt_id]
        shown = 0
        for number, (end, start) in enumerate(counted):
            if start.started >= record.started:
                break  # from this start on, this student no longer waits
            expected = 1 + len(claims_ahead) - bisect.bisect_right(claims_ahead, start.started)
            while shown < len(frames) and frames[shown][2] == "queued" and frames[shown][3] > expected:
                shown += 1
            if shown == len(frames):
                never_shown += 1
                continue
            arrival, as_of = frames[shown][0], frames[shown][1]
            push_ms.append((arrival - end.comfy_end) * 1000)
            first_read[number] = min(first_read.get(number, math.inf), as_of)
            last_arrival[number] = max(last_arrival.get(number, 0.0), arrival)
        bisect.insort(claims_ahead, record.started)
    waiting_at_first = sum(1 for record in records if counted and record.started > counted[0][1].started)
    steps = {
        # ComfyUI finished → the dispatcher recorded it.
        "recorded": [(end.finished - end.comfy_end) * 1000 for end, _start in counted],
        # → the next task claimed.
        "claimed": [(start.started - end.finished) * 1000 for end, start in counted],
        # → the first broadcast showing it began reading the queue.
        "read": [(first_read[n] - counted[n][1].started) * 1000 for n in first_read],
        # → the last waiting student's socket had it.
        "fan_out": [(last_arrival[n] - first_read[n]) * 1000 for n in first_read],
    }
    return {
        "push_ms": spread(push_ms),
        "push_finishes_counted": len(counted),
        "push_waiting_at_first_finish": waiting_at_first,
        "push_never_shown": never_shown,
        "push_steps_p50_ms": {
            name: round(statistics.median(values), 1) if values else None for name, values in steps.items()
        },
        "push_steps_p90_ms": {
            name: round(percentile(values, 90), 1) if values else None for name, values in steps.items()
        },
    }


def simulated_makespan(records: list[TaskRecord], cap: int, *, handoff: float) -> float:
    """FIFO on `cap` slots with the measured job times, every task there from the start."""
    slots = [0.0] * cap
    for record in sorted(records, key=lambda record: record.rank):
        free_at = min(slots)
        start = free_at + (handoff if free_at > 0 else 0.0)
        slots[slots.index(free_at)] = start + (record.comfy_end - record.comfy_start)
    return max(slots)


# --- The run ----------------------------------------------------------------------------------------


@dataclass
class Options:
    students: int
    cap: int
    job: tuple[float, float]
    burst_seconds: float
    memory_tasks: int
    gate_requests: int
    web_workers: int
    database: str
    postgres_url: str
    seed: int
    output: Path | None
    keep_workdir: bool


@dataclass
class Phase:
    name: str
    seconds: float
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    # Each uvicorn worker's share: the kernel, not uvicorn, decides which worker accepts.
    web_worker_cpu_seconds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Usage:
    components: dict[str, dict[str, float]]
    web_workers: dict[int, float]

    @classmethod
    def now(cls, stack: Stack) -> "Usage":
        return cls(stack.usage(), stack.web_worker_cpu())


def measure_phase(stack: Stack, name: str, started: float, before: Usage) -> Phase:
    after = Usage.now(stack)
    return Phase(
        name,
        round(time.time() - started, 2),
        {
            part: round(usage["cpu_seconds"] - before.components[part]["cpu_seconds"], 2)
            for part, usage in after.components.items()
        },
        [round(seconds - before.web_workers.get(pid, 0.0), 2) for pid, seconds in after.web_workers.items()],
    )


async def drive(stack: Stack, students: list[Student], gate_student: Student, options: Options) -> dict:
    rng = random.Random(options.seed)
    phases: list[Phase] = []
    limits = httpx.Limits(
        max_connections=options.students + SUBMIT_CONCURRENCY, max_keepalive_connections=None
    )
    # Every request names its student's cookies itself: a shared jar would only cost CPU.
    no_jar = CookieJar(DefaultCookiePolicy(allowed_domains=[]))
    async with httpx.AsyncClient(timeout=60, limits=limits, cookies=no_jar) as http:
        started, usage = time.time(), Usage.now(stack)
        connecting = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def enter(student):
            async with connecting:
                await enter_comfyui(http, stack, student)

        await asyncio.gather(*(enter(student) for student in [*students, gate_student]))
        changed = asyncio.Event()

        async def open_socket(student):
            async with connecting:
                return await QueueSocket.open(stack, student, changed)

        sockets = await asyncio.gather(*(open_socket(student) for student in students))
        connected_as_of = await first_frames(sockets, changed)
        phases.append(measure_phase(stack, "entry and sockets", started, usage))

        # The class burst.
        started, usage = time.time(), Usage.now(stack)
        submissions = [Submission(student.username, rng.uniform(*options.job)) for student in students]
        offsets = sorted(rng.uniform(0, options.burst_seconds) for _ in students)
        burst_start = time.time() + 0.1

        async def press_queue(student, submission, offset):
            await asyncio.sleep(max(0.0, burst_start + offset - time.time()))
            await submit(http, stack, student, submission, rng)

        await asyncio.gather(
            *(press_queue(*planned) for planned in zip(students, submissions, offsets, strict=True))
        )
        for socket, submission in zip(sockets, submissions, strict=True):
            socket.await_finished({submission.prompt_id} if submission.prompt_id else ())
        expected_run = sum(submission.job_seconds for submission in submissions) / options.cap
        finished = await wait_for_all(sockets, within=2 * expected_run + 60)
        settled_as_of = await settle(sockets, changed)
        phases.append(measure_phase(stack, "class burst and run", started, usage))
        accepted = [
            (student.port, submission.prompt_id)
            for student, submission in zip(students, submissions, strict=True)
            if submission.prompt_id
        ]
        found = await asyncio.gather(*(comfy_history(http, port, prompt_id) for port, prompt_id in accepted))
        histories = {prompt_id: entry for (_port, prompt_id), entry in zip(accepted, found, strict=True)}
        comfy_stats = await asyncio.to_thread(stack.emulator.stats)
        frames = {socket.student.username: list(socket.frames) for socket in sockets}
        loss = lost_updates(sockets, after=connected_as_of, until=settled_as_of)
        dropped = sum(socket.dropped for socket in sockets)

        started, usage = time.time(), Usage.now(stack)
        memory = await memory_phase(http, stack, students, sockets, options.memory_tasks, options.job, rng)
        phases.append(measure_phase(stack, f"{options.memory_tasks} queued, then cancelled", started, usage))

        started, usage = time.time(), Usage.now(stack)
        routes_for = {
            "the emulator": (students[0].port, students[0].username, students[0].access_cookie),
            "a static nginx": (gate_student.port, gate_student.username, gate_student.access_cookie),
        }
        gate = await asyncio.to_thread(gate_phase, stack, routes_for, options.gate_requests)
        phases.append(measure_phase(stack, "gate", started, usage))
        await asyncio.gather(*(socket.close() for socket in sockets))
    return {
        "submissions": submissions,
        "burst_start": burst_start,
        "finished": finished,
        "histories": histories,
        "comfy_stats": comfy_stats,
        "frames": frames,
        "loss": loss,
        "sockets_dropped": dropped,
        "memory": memory,
        "gate": gate,
        "phases": phases,
    }


def class_figures(raw: dict, students: list[Student], cap: int) -> dict:
    from django.db import connections

    submissions: list[Submission] = raw["submissions"]
    records = task_records(submissions, raw["histories"])
    connections.close_all()
    frames_by_task = {
        submission.prompt_id: own_states(raw["frames"][submission.username], submission.prompt_id)
        for submission in submissions
        if submission.prompt_id
    }
    failed = [submission for submission in submissions if submission.http_status != 200]
    not_completed = [record for record in records if record.status != "completed"]
    settled_after = max(submission.answered for submission in submissions)
    return {
        "students": len(students),
        "submissions": {
            "count": len(submissions),
            "errors": len(failed),
            "error_examples": sorted({submission.error for submission in failed})[:5],
            "latency_ms": spread(submission.latency_ms for submission in submissions),
            "sent_within_s": round(max(s.sent for s in submissions) - min(s.sent for s in submissions), 3),
        },
        "tasks_not_completed": len(not_completed) + (len(submissions) - len(failed) - len(records)),
        "all_finished_in_time": raw["finished"],
        "comfyui_saw": {
            "max_running": raw["comfy_stats"]["max_running_seen"],
            "submitted_twice": sum(count > 1 for count in raw["comfy_stats"]["submissions"].values()),
            "executed_twice": sum(count > 1 for count in raw["comfy_stats"]["executions"].values()),
            "executions": len(raw["comfy_stats"]["executions"]),
        },
        "sockets_dropped": raw["sockets_dropped"],
        "positions": position_figures(records, frames_by_task, raw["burst_start"]),
        "updates": raw["loss"],
        "run": run_figures(records, cap, frames_by_task, settled_after),
    }


# --- Report -----------------------------------------------------------------------------------------


def verdict(met: bool | None) -> str:
    return "" if met is None else ("met" if met else "MISSED")


def report_rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """(figure, measured, goal, seed design, verdict) for the printed table."""
    klass, run = result["class"], result["class"]["run"]
    submissions, positions, updates = klass["submissions"], klass["positions"], klass["updates"]
    errors = submissions["errors"] + klass["tasks_not_completed"] + klass["sockets_dropped"]
    push, handoff = run.get("push_ms", {}), run.get("handoff_ms", {})
    after_burst = run.get("handoff_after_burst_ms", {})
    memory, gate, saw = result["memory"], result["gate"]["files"], klass["comfyui_saw"]
    rows = [
        (
            f"class burst: {submissions['count']} submissions within {submissions['sent_within_s']} s",
            f"{errors} errors",
            "0 errors",
            "",
            verdict(errors == 0),
        ),
        (
            "  submission latency p50 / p99",
            f"{submissions['latency_ms']['p50']} / {submissions['latency_ms']['p99']} ms",
            "",
            "",
            "",
        ),
        (
            "  every student shows a right position",
            f"{positions['all_right_after_burst_start_s']} s after the burst began",
            "",
            "",
            "",
        ),
        (
            "  ComfyUI saw: most running at once, run twice",
            f"{saw['max_running']}, {saw['submitted_twice'] + saw['executed_twice']}",
            f"<= {result['options']['cap']}, 0",
            "",
            verdict(
                saw["max_running"] <= result["options"]["cap"]
                and saw["submitted_twice"] + saw["executed_twice"] == 0
            ),
        ),
        (
            "  frames showing a wrong state",
            f"{positions['frames_wrong']} of {positions['frames_checked']}",
            "0",
            "",
            verdict(positions["frames_wrong"] == 0),
        ),
        (
            f"position push p50 / p99 ({run.get('push_waiting_at_first_finish')} waiting at first)",
            f"{push.get('p50')} / {push.get('p99')} ms",
            f"p99 < {PUSH_P99_GOAL_MS} ms",
            f"up to {SEED_POLL_MS} ms (polls)",
            verdict(push.get("p99") is not None and push["p99"] < PUSH_P99_GOAL_MS),
        ),
        (
            "  updates lost",
            f"{updates['lost']} of {updates['broadcasts'] * klass['students']}",
            "0",
            "",
            verdict(updates["lost"] == 0 and run.get("push_never_shown") == 0),
        ),
        (
            "hand-off p50 / p99",
            f"{handoff.get('p50')} / {handoff.get('p99')} ms",
            f"p99 < {HANDOFF_P99_GOAL_MS} ms",
            f"{SEED_POLL_MS} ms",
            verdict(handoff.get("p99") is not None and handoff["p99"] < HANDOFF_P99_GOAL_MS),
        ),
        (
            "  once every submission was answered",
            f"{after_burst.get('p50')} / {after_burst.get('p99')} ms",
            "",
            "",
            "",
        ),
        (
            f"makespan / ideal ({klass['students']} tasks, cap {result['options']['cap']})",
            f"{run.get('makespan_over_ideal')}",
            f"< {MAKESPAN_GOAL}",
            f"{run.get('seed_makespan_over_ideal')} (simulated)",
            verdict(
                run.get("makespan_over_ideal") is not None and run["makespan_over_ideal"] < MAKESPAN_GOAL
            ),
        ),
        ("  FIFO without any overhead / ideal", f"{run.get('fifo_without_overhead_over_ideal')}", "", "", ""),
    ]
    for entry in gate:
        rows.append(
            (
                f"gate: {entry['bytes']} B file from {entry['upstream']}",
                f"gated/plain {entry['gated_over_plain']}x, gated/direct {entry['gated_over_direct']}x",
                "",
                "",
                "",
            )
        )
    rows += [
        (
            f"memory, {memory['queued_when_sampled']} queued: web ({memory['web_workers']} workers)",
            f"{memory['web_peak_mb']} MB (largest worker {memory['web_worker_peak_mb']} MB)",
            "",
            "",
            "",
        ),
        ("  dispatcher", f"{memory['dispatcher_peak_mb']} MB", "", "", ""),
    ]
    return rows


def print_report(result: dict) -> None:
    options, machine = result["options"], result["machine"]
    print(
        f"classroom: {options['students']} students, cap {options['cap']}, jobs of "
        f"{options['job'][0]}-{options['job'][1]} s, {options['database']}, "
        f"{options['web_workers']} uvicorn worker(s), {machine['cores']} cores; load average "
        f"{machine['load_average_before'][0]} before, {machine['load_average_after'][0]} after; "
        f"Python speed probe {machine['python_loop_ms']} ms (bench/machine.py)\n"
    )
    rows = [("figure", "measured", "goal", "seed design", ""), *report_rows(result)]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[4])
    print("\nCPU seconds by component, per phase:")
    for phase in result["phases"]:
        parts = ", ".join(f"{name} {seconds}" for name, seconds in phase["cpu_seconds"].items())
        workers = " + ".join(str(seconds) for seconds in phase["web_worker_cpu_seconds"])
        print(f"  {phase['name']} ({phase['seconds']} s): {parts} (web workers: {workers})")


def parse_args(argv=None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.classroom",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--students", type=int, default=300)
    parser.add_argument("--cap", type=int, default=10, help="workflows running at once (default 10)")
    parser.add_argument(
        "--job-seconds",
        type=job_range,
        default=(1.0, 3.0),
        help="each job's length, drawn uniformly from LOW-HIGH (default 1-3)",
    )
    parser.add_argument(
        "--burst-seconds",
        type=float,
        default=1.0,
        help="the class presses Queue within this many seconds (default 1)",
    )
    parser.add_argument("--memory-tasks", type=int, default=1000, help="tasks queued for the memory figure")
    parser.add_argument("--gate-requests", type=int, default=2000, help="timed requests per route and file")
    parser.add_argument(
        "--web-workers", type=int, default=2, help="uvicorn workers (default 2, see bench/stack.py)"
    )
    parser.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument(
        "--postgres-url",
        default=StackOptions.postgres_url,
        help="a PostgreSQL server's maintenance database; a fresh database is made beside it",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed of job times and arrival moments")
    parser.add_argument("--output", type=Path, help="JSON file (default bench/results/classroom-<time>.json)")
    parser.add_argument(
        "--keep-workdir", action="store_true", help="keep every process's log and configuration afterwards"
    )
    args = parser.parse_args(argv)
    if args.students < 2 or args.cap < 1 or args.cap >= args.students:
        parser.error("need at least 2 students and a cap below the number of students")
    if args.memory_tasks < args.students:
        parser.error("--memory-tasks must be at least the number of students")
    return Options(
        students=args.students,
        cap=args.cap,
        job=args.job_seconds,
        burst_seconds=args.burst_seconds,
        memory_tasks=args.memory_tasks,
        gate_requests=args.gate_requests,
        web_workers=args.web_workers,
        database=args.database,
        postgres_url=args.postgres_url,
        seed=args.seed,
        output=args.output,
        keep_workdir=args.keep_workdir,
    )


def main(argv=None) -> dict:
    options = parse_args(argv)
    machine = {
        "cores": os.cpu_count(),
        "load_average_before": [round(load, 2) for load in os.getloadavg()],
        "python_loop_ms": python_speed_ms(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="classroom-bench-"))
    stack_options = StackOptions(
        comfy_ports=options.students,
        spare_ports=1,
        web_workers=options.web_workers,
        max_concurrent=options.cap,
        database=options.database,
        postgres_url=options.postgres_url,
    )
    try:
        with running_stack(workdir, stack_options) as stack:
            students = create_class(options.students, stack.emulator.ports)
            (gate_student,) = create_class(1, stack.spare_ports, prefix="static")
            idle = stack.usage()
            raw = uvloop.run(drive(stack, students, gate_student, options))
            machine["load_average_after"] = [round(load, 2) for load in os.getloadavg()]
            result = {
                "options": {**asdict(options), "output": str(options.output or "")},
                "machine": machine,
                "stack": {
                    "web_workers": options.web_workers,
                    "database": options.database,
                    "idle_memory_mb": {name: round(part["rss_mb"], 1) for name, part in idle.items()},
                },
                "class": class_figures(raw, students, options.cap),
                "memory": raw["memory"],
                "gate": raw["gate"],
                "phases": [asdict(phase) for phase in raw["phases"]],
            }
    finally:
        if options.keep_workdir:
            print(f"Logs and configuration kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    output = options.output or RESULTS_DIR / f"classroom-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print_report(result)
    print(f"\nJSON: {output}")
    return result


if __name__ == "__main__":
    main()
