"""How fast a queue change reaches a class of waiting students over the queue WebSocket.

Starts its own redis-server, a SQLite database and one uvicorn serving the project, opens
one socket per student (each student has one waiting task behind a cap of 1), then, round
after round, moves the queue by one (the head task is cancelled) and broadcasts it the way
the dispatcher does. It measures, for every socket, the time from the broadcast call
(snapshot read included) until that socket has its new position, and counts sockets that
never got it.

    .venv/bin/python bench/ws_bench.py                  # 300 sockets, 20 rounds
    .venv/bin/python bench/ws_bench.py --sockets 100 --rounds 50
    .venv/bin/python bench/ws_bench.py --no-compression   # uvicorn without permessage-deflate

Client, sender, Redis and server share the machine, as they do in the test lab.
"""

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.processes import free_port, stop_process, wait_for_port  # noqa: E402

SITE_ORIGIN = "http://127.0.0.1:8080"
FIRST_PORT = 20000
WORKFLOW = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}}}
DELIVERY_DEADLINE = 10.0


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


class Listener:
    """One student's socket: remembers when it last saw each (status, position) of its task."""

    def __init__(self, connection):
        self.connection = connection
        self.seen: dict[tuple[str, int], float] = {}
        self.changed = asyncio.Event()

    async def run(self):
        async for raw in self.connection:
            frame = json.loads(raw)
            for task in frame["tasks"]:
                self.seen.setdefault((task["status"], task["position"]), time.perf_counter())
            self.changed.set()

    async def arrival_of(self, state: tuple[str, int], deadline: float) -> float | None:
        while state not in self.seen:
            self.changed.clear()
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=remaining)
            except TimeoutError:
                return None
        return self.seen[state]


async def measure(base_url: str, server_pid: int, students, rounds: int) -> dict:
    import websockets
    from asgiref.sync import sync_to_async
    from django.conf import settings

    from comfyproxy.services import broadcast, queue

    connecting = time.perf_counter()
    connections = await asyncio.gather(
        *(
            websockets.connect(
                f"{base_url}/ws/comfy_proxy/queue/",
                origin=SITE_ORIGIN,
                additional_headers={"Cookie": f"{settings.SESSION_COOKIE_NAME}={session}"},
                max_queue=None,
                # A connect storm waits on the database; this measures broadcasts.
                open_timeout=None,
            )
            for _student, _task, session in students
        )
    )
    listeners = [Listener(connection) for connection in connections]
    readers = [asyncio.create_task(listener.run()) for listener in listeners]
    deadline = time.perf_counter() + DELIVERY_DEADLINE
    for number, listener in enumerate(listeners, start=1):
        if await listener.arrival_of(("queued", number), deadline) is None:
            raise RuntimeError(f"socket {number} never got its initial state")
    connect_s = time.perf_counter() - connecting

    latencies_ms: list[float] = []
    round_ms: list[float] = []
    send_ms: list[float] = []
    lost = 0
    server_cpu_before = cpu_seconds(server_pid)
    for head in range(rounds):
        student, task, _session = students[head]
        await sync_to_async(queue.cancel_task)(actor=student, task=task)
        started = time.perf_counter()
        await broadcast.broadcast_queue_snapshot()
        send_ms.append((time.perf_counter() - started) * 1000)
        deadline = started + DELIVERY_DEADLINE
        waiting = listeners[head + 1 :]
        arrivals = await asyncio.gather(
            *(listener.arrival_of(("queued", place), deadline) for place, listener in enumerate(waiting, 1)),
            listeners[head].arrival_of(("cancelled", 0), deadline),
        )
        delivered = [(arrival - started) * 1000 for arrival in arrivals if arrival is not None]
        lost += len(arrivals) - len(delivered)
        latencies_ms.extend(delivered)
        if delivered:
            round_ms.append(max(delivered))

    server_cpu_ms = (cpu_seconds(server_pid) - server_cpu_before) * 1000 / rounds
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*(connection.close() for connection in connections), return_exceptions=True)
    return {
        "latencies_ms": latencies_ms,
        "round_ms": round_ms,
        "lost": lost,
        "connect_s": connect_s,
        "send_ms": send_ms,
        "server_cpu_ms": server_cpu_ms,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def snapshot_size() -> dict:
    import msgpack

    from comfyproxy.services import broadcast

    events = broadcast.snapshot_events(broadcast.read_queue_snapshot())
    return {group: len(msgpack.packb(event)) for group, event in events.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--no-compression",
        action="store_true",
        help="run uvicorn with --ws-per-message-deflate false (browsers otherwise negotiate it)",
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
        sizes = snapshot_size()
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", "teaching.asgi:application"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        if args.no_compression:
            command += ["--ws-per-message-deflate", "false"]
        server = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **env},
        )
        wait_for_port(port, timeout=30, process=server)
        result = asyncio.run(measure(f"ws://127.0.0.1:{port}", server.pid, students, args.rounds))
    finally:
        if server is not None:
            stop_process(server)
        stop_process(redis)
        shutil.rmtree(workdir, ignore_errors=True)

    latencies, rounds = result["latencies_ms"], result["round_ms"]
    summary = {
        "sockets": args.sockets,
        "compression": not args.no_compression,
        "rounds": args.rounds,
        "deliveries": len(latencies),
        "lost": result["lost"],
        "delivery_p50_ms": round(statistics.median(latencies), 1),
        "delivery_p99_ms": round(p99(latencies), 1),
        "last_socket_p50_ms": round(statistics.median(rounds), 1),
        "last_socket_max_ms": round(max(rounds), 1),
        "snapshot_and_send_p50_ms": round(statistics.median(result["send_ms"]), 1),
        "server_cpu_per_change_ms": round(result["server_cpu_ms"], 1),
        "all_connected_s": round(result["connect_s"], 2),
        "broadcast_bytes": sizes,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2))
    for key, value in summary.items():
        print(f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
