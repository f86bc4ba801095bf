"""How fast a queue change reaches a class of waiting students over the queue WebSocket.

Starts its own redis-server, a SQLite database and one uvicorn serving the project, opens
one socket per student (each student has one waiting task behind a cap of 1), then, round
after round, moves the queue by one (the head task is cancelled) and broadcasts it the way
the dispatcher does. It measures, for every socket, the time from the broadcast call
(snapshot read included) until that socket has its new position, and counts sockets that
never got it.

    .venv/bin/python bench/ws_bench.py                  # 300 sockets, 20 rounds
    .venv/bin/python bench/ws_bench.py --sockets 100 --rounds 50
    .venv/bin/python bench/ws_bench.py --compression      # let clients negotiate permessage-deflate

The server runs as in production (scripts/run.sh): uvicorn with permessage-deflate off.
Two latencies are reported: from the broadcast call (the snapshot read included) and from
the channel layer's group_send (the fan-out alone: Redis, the server, the sockets).

The sockets are held by two client processes, apart from the sender, so that reading 300
frames never delays the broadcast being timed; all of them, Redis and the server share the
machine's cores.
"""

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.processes import free_port, stop_process, wait_for_port  # noqa: E402

SITE_ORIGIN = "http://127.0.0.1:8080"
FIRST_PORT = 20000
WORKFLOW = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}}}
DELIVERY_DEADLINE = 10.0
# The sockets are held by processes of their own, one per core, never by the sender.
CLIENT_PROCESSES = 2


def start_redis(directory: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, timeout=10, process=process)
    return process, port


def configure_environment(workdir: Path, redis_port: int, sockets: int) -> dict:
    env = {
        "DJANGO_SETTINGS_MODULE": "teaching.settings",
        "DATABASE_URL": f"sqlite:///{workdir / 'bench.sqlite3'}",
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "SITE_ORIGIN": SITE_ORIGIN,
        "COMFY_PORT_RANGE": f"{FIRST_PORT}-{FIRST_PORT + sockets}",
        "COMFY_MAX_QUEUED_PER_STUDENT": "1",
        "LOG_LEVEL": "WARNING",
    }
    os.environ.update(env)
    return env


def create_class(sockets: int) -> list[tuple[object, object, str]]:
    """One student per socket, each with one waiting task, behind a cap of 1."""
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.test import Client

    from comfyproxy.models import QueueSettings
    from comfyproxy.services import instances, queue

    call_command("migrate", verbosity=0)
    queue_settings = QueueSettings.load()
    queue_settings.max_concurrent_override = 1
    queue_settings.save()
    students = []
    for number in range(sockets):
        student = get_user_model().objects.create_user(username=f"bench{number}")
        instances.register_instance(user=student, port=FIRST_PORT + number, host="127.0.0.1")
        task = queue.submit_task(actor=student, owner=student, body={"prompt": WORKFLOW})
        client = Client()
        client.force_login(student)
        students.append((student, task, client.cookies[settings.SESSION_COOKIE_NAME].value))
    return students


class Awaited:
    """The state each socket of a client process is waiting for; set once all have it.

    One event per process rather than a waiter per socket, so that the clients (which play
    300 browsers on the server's cores) add as little as possible to what is measured."""

    def __init__(self):
        self.pending: dict[Listener, tuple[str, int]] = {}
        self.all_arrived = asyncio.Event()

    def expect(self, states: dict["Listener", tuple[str, int]]) -> None:
        self.pending = {listener: state for listener, state in states.items() if state not in listener.seen}
        if self.pending:
            self.all_arrived.clear()
        else:
            self.all_arrived.set()

    def saw(self, listener: "Listener") -> None:
        state = self.pending.get(listener)
        if state is not None and state in listener.seen:
            del self.pending[listener]
            if not self.pending:
                self.all_arrived.set()

    async def wait(self, deadline: float) -> None:
        with contextlib.suppress(TimeoutError):  # the sockets still pending are counted lost
            await asyncio.wait_for(self.all_arrived.wait(), timeout=max(0.0, deadline - time.time()))


class Listener:
    """One student's socket: remembers when it first saw each (status, position) of its task."""

    def __init__(self, connection, awaited: Awaited):
        self.connection = connection
        self.awaited = awaited
        self.seen: dict[tuple[str, int], float] = {}

    async def run(self):
        async for raw in self.connection:
            arrived = time.time()
            for task in json.loads(raw)["tasks"]:
                self.seen.setdefault((task["status"], task["position"]), arrived)
            self.awaited.saw(self)


def expected_state(index: int, head: int) -> tuple[str, int]:
    """What student `index` (0-based, in queue order) sees once students 0..head have left."""
    return ("cancelled", 0) if index == head else ("queued", index - head)


def run_clients(base_url: str, cookie_name: str, sockets: list[tuple[int, str]], rounds: int, pipe) -> None:
    """A process of its own holding some of the class's sockets, so that reading 300 frames
    never delays the sender being measured. Reports, per round, each socket's delay."""
    # On uvloop like the class benchmark's clients: 300 browsers, played on the server's cores.
    uvloop.run(_run_clients(base_url, cookie_name, sockets, rounds, pipe))


async def _run_clients(base_url, cookie_name, sockets, rounds, pipe) -> None:
    import websockets

    loop = asyncio.get_running_loop()
    connections = await asyncio.gather(
        *(
            websockets.connect(
                f"{base_url}/ws/comfy_proxy/queue/",
                origin=SITE_ORIGIN,
                additional_headers={"Cookie": f"{cookie_name}={session}"},
                max_queue=None,
                # A connect storm waits on the database; this measures broadcasts.
                open_timeout=None,
            )
            for _index, session in sockets
        )
    )
    awaited = Awaited()
    listeners = [Listener(connection, awaited) for connection in connections]
    indexed = list(zip((index for index, _session in sockets), listeners, strict=True))
    awaited.expect({listener: ("queued", index + 1) for index, listener in indexed})
    readers = [asyncio.create_task(listener.run()) for listener in listeners]
    await awaited.wait(time.time() + DELIVERY_DEADLINE)
    if awaited.pending:
        raise RuntimeError(f"{len(awaited.pending)} sockets never got their initial state")
    pipe.send("ready")
    for head in range(rounds):
        expected = {listener: expected_state(index, head) for index, listener in indexed if index >= head}
        awaited.expect(expected)
        started = await loop.run_in_executor(None, pipe.recv)
        await awaited.wait(started + DELIVERY_DEADLINE)
        arrivals = [listener.seen.get(state) for listener, state in expected.items()]
        pipe.send([None if arrival is None else (arrival - started) * 1000 for arrival in arrivals])
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*(connection.close() for connection in connections), return_exceptions=True)


async def measure(base_url: str, server_pid: int, students, rounds: int) -> dict:
    """The sender's side, in one event loop for the whole run as in the dispatcher (the
    channel layer keeps its Redis connections per loop)."""
    from asgiref.sync import sync_to_async
    from channels.layers import get_channel_layer
    from django.conf import settings

    from comfyproxy.services import broadcast, queue

    # When the broadcast reaches the channel layer, to tell the fan-out from the snapshot read.
    layer = get_channel_layer()
    group_sends: list[float] = []
    untimed_group_send = layer.group_send

    async def timed_group_send(group, message):
        group_sends.append(time.time())
        await untimed_group_send(group, message)

    layer.group_send = timed_group_send
    spawn = multiprocessing.get_context("spawn")
    indexed = [(index, session) for index, (_student, _task, session) in enumerate(students)]
    pipes, clients = [], []
    connecting = time.perf_counter()
    for number in range(CLIENT_PROCESSES):
        ours, theirs = spawn.Pipe()
        client = spawn.Process(
            target=run_clients,
            args=(base_url, settings.SESSION_COOKIE_NAME, indexed[number::CLIENT_PROCESSES], rounds, theirs),
        )
        client.start()
        pipes.append(ours)
        clients.append(client)
    loop = asyncio.get_running_loop()
    for pipe in pipes:
        if await loop.run_in_executor(None, pipe.recv) != "ready":
            raise RuntimeError("a client process failed to connect")
    connect_s = time.perf_counter() - connecting
    print(f"all {len(students)} sockets connected; broadcasting", file=sys.stderr, flush=True)

    latencies_ms: list[float] = []
    fanout_ms: list[float] = []
    round_ms: list[float] = []
    send_ms: list[float] = []
    lost = 0
    server_cpu_before = cpu_seconds(server_pid)
    clients_cpu_before = sum(cpu_seconds(client.pid) for client in clients)
    for head in range(rounds):
        student, task, _session = students[head]
        await sync_to_async(queue.cancel_task)(actor=student, task=task)
        group_sends.clear()
        started = time.time()
        await broadcast.broadcast_queue_snapshot()
        snapshot_ms = (group_sends[0] - started) * 1000
        send_ms.append((time.time() - started) * 1000)
        for pipe in pipes:
            pipe.send(started)
        arrivals = [arrival for pipe in pipes for arrival in await loop.run_in_executor(None, pipe.recv)]
        delivered = [arrival for arrival in arrivals if arrival is not None]
        lost += len(arrivals) - len(delivered)
        latencies_ms.extend(delivered)
        fanout_ms.extend(arrival - snapshot_ms for arrival in delivered)
        if delivered:
            round_ms.append(max(delivered))
    server_cpu_ms = (cpu_seconds(server_pid) - server_cpu_before) * 1000 / rounds
    # The clients play every browser of the class on the same cores: their share of the latency.
    clients_cpu_ms = (sum(cpu_seconds(client.pid) for client in clients) - clients_cpu_before) * 1000 / rounds
    for client in clients:
        client.join(timeout=30)
    return {
        "latencies_ms": latencies_ms,
        "fanout_ms": fanout_ms,
        "round_ms": round_ms,
        "lost": lost,
        "connect_s": connect_s,
        "send_ms": send_ms,
        "server_cpu_ms": server_cpu_ms,
        "clients_cpu_ms": clients_cpu_ms,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process and its children (uvicorn's workers) have used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:  # a child that has just exited
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(int(child)) for child in children)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def snapshot_size(student_id: int) -> dict:
    """Bytes of each group's broadcast, and of the frame one student's socket is sent."""
    import msgpack

    from comfyproxy.services import broadcast

    events = broadcast.snapshot_events(broadcast.read_queue_snapshot())
    sizes = {group: len(msgpack.packb(event)) for group, event in events.items()}
    frame = broadcast.render_frame(events[broadcast.OWNERS_GROUP], broadcast.Viewer(student_id))
    sizes["student_frame"] = len(frame.encode())
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--compression",
        action="store_true",
        help="run uvicorn with permessage-deflate on (its default, which browsers negotiate)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="uvicorn worker processes (scripts/run.sh runs one)"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "ws_bench.json")
    args = parser.parse_args()
    if args.rounds >= args.sockets:
        parser.error("--rounds must be smaller than --sockets (each round removes one waiting student)")

    workdir = Path(tempfile.mkdtemp(prefix="ws-bench-"))
    redis, redis_port = start_redis(workdir)
    server = None
    try:
        env = configure_environment(workdir, redis_port, args.sockets)
        import django

        django.setup()
        students = create_class(args.sockets)
        sizes = snapshot_size(students[-1][0].pk)
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", "teaching.asgi:application"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        if args.workers > 1:
            command += ["--workers", str(args.workers)]
        if not args.compression:
            command += ["--ws-per-message-deflate", "false"]
        server = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **env},
        )
        wait_for_port(port, timeout=30, process=server)
        # For attaching a profiler (py-spy record --pid) to the server under load.
        print(f"server pid {server.pid}", file=sys.stderr, flush=True)
        result = asyncio.run(measure(f"ws://127.0.0.1:{port}", server.pid, students, args.rounds))
    finally:
        if server is not None:
            stop_process(server)
        stop_process(redis)
        shutil.rmtree(workdir, ignore_errors=True)

    latencies, rounds = result["latencies_ms"], result["round_ms"]
    summary = {
        "sockets": args.sockets,
        "compression": args.compression,
        "workers": args.workers,
        "load_average": [round(load, 2) for load in os.getloadavg()],
        "rounds": args.rounds,
        "deliveries": len(latencies),
        "lost": result["lost"],
        "delivery_p50_ms": round(statistics.median(latencies), 1),
        "delivery_p99_ms": round(p99(latencies), 1),
        "fanout_p50_ms": round(statistics.median(result["fanout_ms"]), 1),
        "fanout_p99_ms": round(p99(result["fanout_ms"]), 1),
        "last_socket_p50_ms": round(statistics.median(rounds), 1),
        "last_socket_max_ms": round(max(rounds), 1),
        "snapshot_and_send_p50_ms": round(statistics.median(result["send_ms"]), 1),
        "server_cpu_per_change_ms": round(result["server_cpu_ms"], 1),
        "clients_cpu_per_change_ms": round(result["clients_cpu_ms"], 1),
        "all_connected_s": round(result["connect_s"], 2),
        "broadcast_bytes": sizes,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2))
    for key, value in summary.items():
        print(f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
