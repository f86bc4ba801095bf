"""The whole system as a school runs it, on free loopback ports, for benchmarks.

    with running_stack(workdir, StackOptions(comfy_ports=300)) as stack:
        stack.site_origin, stack.comfy_origin   # nginx: the teaching site and the ComfyUI origin
        stack.emulator.ports                    # one emulated ComfyUI per student
        stack.usage()                           # CPU seconds and memory of every component

Everything is private to the run: a redis-server, a fresh database (a new PostgreSQL
database that is dropped afterwards, or a SQLite file), the ComfyUI emulator with one port
per student and its per-node timing model, Django under uvicorn in production mode, the
dispatcher (`manage.py comfy_dispatcher`) and nginx as `comfy_nginx_config` writes it.
This process is set up as Django too (same settings), so a benchmark can create users and
read results from the database. One stack per process: Django's settings are read once.

Why two uvicorn workers on two cores: a sync Django view runs on one thread per process
(asgiref's thread-sensitive executor), so one process can never use more than one core
for submissions and gate decisions, and each process fans a broadcast out to only its own
share of the sockets. A third process would only add memory and context switches on a
machine whose other core is also shared by nginx, the dispatcher, Redis and the database.
"""

import getpass
import io
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.emulator_fixtures import EmulatorProcess
from tests.harness import start_redis
from tests.processes import free_port, stop_process, wait_for_port, wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
EMULATOR_READY_LINE = "ComfyUI emulator ready"
START_TIMEOUT = 60
# Below this, ports are often privileged or belong to well-known services.
FIRST_PRIVATE_PORT = 10000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class StackOptions:
    # Emulated ComfyUI instances, one per student.
    comfy_ports: int
    # Ports after them, inside COMFY_PORT_RANGE but with no emulator: for other upstreams.
    spare_ports: int = 0
    web_workers: int = 2
    max_concurrent: int = 10
    # "postgresql" (production) or "sqlite" (the single-machine default).
    database: str = "postgresql"
    postgres_url: str = DEFAULT_POSTGRES_URL
    gate_cache_seconds: int = 5


@dataclass
class Stack:
    workdir: Path
    options: StackOptions
    site_origin: str
    comfy_origin: str
    django_port: int
    spare_ports: list[int]
    database_url: str
    redis: subprocess.Popen
    emulator: EmulatorProcess
    web: subprocess.Popen
    dispatcher: subprocess.Popen
    nginx: subprocess.Popen
    env: dict

    @property
    def site_port(self) -> int:
        return urlsplit(self.site_origin).port

    @property
    def comfy_port(self) -> int:
        return urlsplit(self.comfy_origin).port

    def web_pids(self) -> list[int]:
        """uvicorn's worker processes (or the one process when it runs a single worker)."""
        return _uvicorn_workers(self.web.pid) or [self.web.pid]

    def components(self) -> dict[str, list[int]]:
        """The processes of each part of the system (database server excepted: it is not ours)."""
        return {
            "nginx": [self.nginx.pid, *_children(self.nginx.pid)],
            "web": [self.web.pid, *_children(self.web.pid)],
            # With the child that builds its queue snapshots.
            "dispatcher": [self.dispatcher.pid, *_children(self.dispatcher.pid)],
            "emulator": [self.emulator.process.pid],
            "redis": [self.redis.pid],
            "load generator": [os.getpid()],
        }

    def usage(self) -> dict[str, dict[str, float]]:
        """Per component: CPU seconds used so far, resident and peak resident memory (MB)."""
        return {
            name: {
                "cpu_seconds": sum(cpu_seconds(pid) for pid in pids),
                "rss_mb": sum(memory_mb(pid, "VmRSS") for pid in pids),
                "peak_rss_mb": sum(memory_mb(pid, "VmHWM") for pid in pids),
            }
            for name, pids in self.components().items()
        }

    def web_worker_cpu(self) -> dict[int, float]:
        """CPU seconds of each uvicorn worker so far, by pid."""
        return {pid: cpu_seconds(pid) for pid in self.web_pids()}

    def dispatcher_log(self) -> str:
        return (self.workdir / "dispatcher.log").read_text(errors="replace")


def cpu_seconds(pid: int) -> float:
    """User + system CPU a live process has used (Linux /proc); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_mb(pid: int, field: str) -> float:
    """A /proc/<pid>/status memory line (VmRSS now, VmHWM the peak so far) in MB; 0 once gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0.0
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _port_block(count: int) -> int:
    """First of `count` consecutive ports that servers can bind, below the ephemeral range.

    A class-sized block rarely fits among the ephemeral ports, which thousands of closed
    client connections leave in TIME_WAIT after a run; servers bind those with
    SO_REUSEADDR (aiohttp and nginx do), so the check does too.
    """
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    starts = list(range(FIRST_PRIVATE_PORT, ephemeral_low - count, count))
    random.shuffle(starts)
    for first in starts:
        sockets = []
        try:
            for port in range(first, first + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no block of {count} free ports below {ephemeral_low}")


def _uvicorn_workers(pid: int) -> list[int]:
    """The children uvicorn spawned to serve (not multiprocessing's resource tracker)."""
    workers = []
    for child in _children(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in command:
            workers.append(child)
    return workers


def _start(command: list[str], *, log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_for_text(path: Path, text: str, process: subprocess.Popen, what: str) -> None:
    def seen() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}; see {path}")
        return path.exists() and text in path.read_text(errors="replace")

    wait_until(seen, timeout=START_TIMEOUT, interval=0.05, message=f"{what} to start")


@contextmanager
def _database(workdir: Path, options: StackOptions):
    """DATABASE_URL of a database made for this run, removed afterwards."""
    if options.database == "sqlite":
        yield f"sqlite:///{workdir / 'bench.sqlite3'}"
        return
    if options.database != "postgresql":
        raise ValueError(f"unknown database {options.database!r}: postgresql or sqlite")
    import psycopg

    name = f"comfy_bench_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(options.postgres_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(options.postgres_url)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(options.postgres_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def running_stack(workdir: Path, options: StackOptions):
    """Start everything in `workdir` and set this process up as Django; stops everything on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    runtime_dir = workdir / "nginx"
    runtime_dir.mkdir(exist_ok=True)
    static_root = workdir / "static"
    first_port = _port_block(options.comfy_ports + options.spare_ports)
    port_range = (first_port, first_port + options.comfy_ports + options.spare_ports - 1)
    comfy_ports = list(range(first_port, first_port + options.comfy_ports))
    site_port, comfy_port, django_port = free_port(), free_port(), free_port()
    site_origin, comfy_origin = f"http://127.0.0.1:{site_port}", f"http://127.0.0.1:{comfy_port}"

    with ExitStack() as stack:
        redis, redis_port = start_redis(workdir)
        stack.callback(stop_process, redis)
        database_url = stack.enter_context(_database(workdir, options))
        # Production mode: the cap is COMFY_MAX_CONCURRENT_PROD, DEBUG is off.
        env = {
            "DJANGO_SETTINGS_MODULE": "teaching.settings",
            "ENV": "production",
            "SECRET_KEY": secrets.token_urlsafe(40),
            "DEBUG": "false",
            "LOG_LEVEL": "WARNING",
            "DATABASE_URL": database_url,
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "SITE_ORIGIN": site_origin,
            "COMFY_PUBLIC_ORIGIN": comfy_origin,
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "COMFY_GPU_HOST": "127.0.0.1",
            "COMFY_PORT_RANGE": f"{port_range[0]}-{port_range[1]}",
            "COMFY_MAX_CONCURRENT_PROD": str(options.max_concurrent),
            "STATIC_ROOT": str(static_root),
        }
        os.environ.update(env)
        env = {**os.environ}

        import django
        from django.core.management import call_command

        django.setup()
        call_command("migrate", verbosity=0)
        call_command("collectstatic", interactive=False, verbosity=0)
        call_command(
            "comfy_nginx_config",
            listen=f"127.0.0.1:{site_port}",
            comfy_listen=f"127.0.0.1:{comfy_port}",
            django=f"127.0.0.1:{django_port}",
            static_root=str(static_root),
            runtime_dir=str(runtime_dir),
            # Workers as whoever runs the benchmark (root included), so they can read the temp dirs.
            user=getpass.getuser(),
            gate_cache_seconds=options.gate_cache_seconds,
            output=str(runtime_dir / "nginx.conf"),
            stderr=io.StringIO(),
        )

        emulator_log = workdir / "emulator.log"
        emulator = EmulatorProcess(
            process=_start(
                [
                    *(sys.executable, "-m", "comfyproxy.emulator"),
                    *("--ports", f"{comfy_ports[0]}-{comfy_ports[-1]}"),
                    *("--output-dir", str(workdir / "emulator")),
                ],
                log=emulator_log,
            ),
            host="127.0.0.1",
            ports=comfy_ports,
            output_dir=workdir / "emulator",
        )
        stack.callback(emulator.stop)
        # As scripts/run.sh starts it, with the workers a 2-core server should have.
        web = _start(
            [
                *(sys.executable, "-m", "uvicorn", "teaching.asgi:application"),
                *("--host", "127.0.0.1", "--port", str(django_port), "--workers", str(options.web_workers)),
                *("--proxy-headers", "--ws-ping-interval", "20", "--ws-per-message-deflate", "false"),
                *("--no-access-log", "--log-level", "warning"),
            ],
            log=workdir / "web.log",
            env=env,
        )
        stack.callback(stop_process, web)
        dispatcher_log = workdir / "dispatcher.log"
        dispatcher = _start([sys.executable, "manage.py", "comfy_dispatcher"], log=dispatcher_log, env=env)
        stack.callback(stop_process, dispatcher)
        nginx = _start(
            [NGINX, "-c", str(runtime_dir / "nginx.conf"), "-p", str(runtime_dir), "-g", "daemon off;"],
            log=runtime_dir / "stderr.log",
        )
        stack.callback(stop_process, nginx)

        _wait_for_text(emulator_log, EMULATOR_READY_LINE, emulator.process, "the emulator")
        wait_for_port(django_port, timeout=START_TIMEOUT, process=web)
        if options.web_workers > 1:
            wait_until(
                lambda: len(_uvicorn_workers(web.pid)) == options.web_workers,
                timeout=START_TIMEOUT,
                message="every uvicorn worker",
            )
        _wait_for_text(dispatcher_log, "event=lease_acquired", dispatcher, "the dispatcher")
        _wait_for_text(dispatcher_log, "event=snapshot_process_ready", dispatcher, "the snapshot child")
        for port in (site_port, comfy_port):
            wait_for_port(port, timeout=START_TIMEOUT, process=nginx)
        started = Stack(
            workdir=workdir,
            options=options,
            site_origin=site_origin,
            comfy_origin=comfy_origin,
            django_port=django_port,
            spare_ports=list(range(comfy_ports[-1] + 1, port_range[1] + 1)),
            database_url=database_url,
            redis=redis,
            emulator=emulator,
            web=web,
            dispatcher=dispatcher,
            nginx=nginx,
            env=env,
        )
        # Every uvicorn worker answers before the clock starts (each imports Django on its own).
        _warm_up(started)
        try:
            yield started
        finally:
            # This process's connections too must go before the database is dropped.
            from django.db import connections

            connections.close_all()


def _warm_up(stack: Stack) -> None:
    import httpx

    deadline = time.monotonic() + START_TIMEOUT
    with httpx.Client(base_url=stack.site_origin, timeout=10) as client:
        for _ in range(4 * stack.options.web_workers):
            while client.get("/accounts/login/").status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("the web server does not answer through nginx")
                time.sleep(0.1)
