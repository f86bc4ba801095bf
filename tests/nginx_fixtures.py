"""The whole web stack on free loopback ports: nginx as `comfy_nginx_config` writes it, Django
under uvicorn, the ComfyUI emulator, and an upstream that echoes what reached it.

    def test_something(nginx_gateway, make_student, register_instance):  # fixtures from conftest
        alice = make_student("alice")
        port = nginx_gateway.emulator_ports[0]
        register_instance(alice, port)
        comfy = nginx_gateway.comfy_client(alice, port)  # came in through the practice page's link
        assert comfy.get(f"/comfyui/alice/{port}/").status_code == 200
        site = nginx_gateway.site_client(alice)          # logged in to the teaching site

`nginx_stack` (session) starts everything once; `nginx_gateway` (per test) also points this
process's settings at the stack (origins, port range, GPU host) and gives the test a database
whose writes the server sees (`transactional_db`). The port range holds, in order:
`emulator_ports` (emulated ComfyUIs, controlled through `gateway.emulator`), `echo_port`,
`silent_port` (nothing listens: a crashed instance) and `free_ports` (for launchers).
`gateway.env` is the servers' environment, to start more processes (a dispatcher) alike.
Outside pytest (benchmarks), `running_gateway(...)` is the same stack as a context manager.
"""

import asyncio
import getpass
import io
import os
import shutil
import subprocess
import sys
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from django.conf import settings
from django.core.management import call_command
from django.db import connection
from django.test import Client, override_settings

from comfyproxy.gateway import comfy_entry_url
from tests.emulator_fixtures import EmulatorProcess
from tests.processes import free_port, free_port_block, stop_process, wait_for_port

REPO_ROOT = Path(__file__).resolve().parent.parent
EMULATOR_PORT_COUNT = 3
FREE_PORT_COUNT = 3
# As in production: how late a logout or a stopped instance takes effect on the ComfyUI origin.
GATE_CACHE_SECONDS = 5


@dataclass
class EchoUpstream:
    """An HTTP server that answers each request with what it received, and remembers it."""

    port: int
    requests: list[dict] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        seen = {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[name, value] for name, value in request.headers.items()],
            "body_length": len(body),
        }
        self.requests.append(seen)
        return web.json_response(seen)

    def start(self) -> None:
        self._loop = asyncio.new_event_loop()

        async def serve():
            app = web.Application(client_max_size=200 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._echo)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        threading.Thread(target=self._loop.run_forever, daemon=True, name="echo-upstream").start()
        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(timeout=10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)


@dataclass
class Gateway:
    site_origin: str
    comfy_origin: str
    django_port: int
    port_range: tuple[int, int]
    emulator: EmulatorProcess
    echo: EchoUpstream
    silent_port: int
    free_ports: list[int]
    runtime_dir: Path
    config_path: Path
    env: dict[str, str]

    @property
    def emulator_ports(self) -> list[int]:
        return self.emulator.ports

    @property
    def echo_port(self) -> int:
        return self.echo.port

    @property
    def settings_overrides(self) -> dict:
        return {
            "SITE_ORIGIN": self.site_origin,
            "COMFY_PUBLIC_ORIGIN": self.comfy_origin,
            "COMFY_GPU_HOST": "127.0.0.1",
            "COMFY_PORT_RANGE": self.port_range,
        }

    def site_url(self, path: str) -> str:
        return self.site_origin + path

    def comfy_url(self, path: str) -> str:
        return self.comfy_origin + path

    def error_log(self) -> str:
        return (self.runtime_dir / "error.log").read_text(errors="replace")

    # People: Django sessions the server accepts, and ComfyUI access through the real entry.

    @staticmethod
    def login(user) -> str:
        """A teaching-site session for `user` (committed; needs a transactional database)."""
        client = Client()
        client.force_login(user)
        return client.cookies[settings.SESSION_COOKIE_NAME].value

    def site_client(self, user=None) -> httpx.Client:
        client = httpx.Client(base_url=self.site_origin, timeout=10)
        if user is not None:
            client.cookies.set(settings.SESSION_COOKIE_NAME, self.login(user), domain="127.0.0.1")
        return client

    def comfy_client(self, user, instance_or_port, *, session_key: str | None = None) -> httpx.Client:
        """A browser on the ComfyUI origin that came in through the practice page's entry link."""
        session_key = session_key or self.login(user)
        client = httpx.Client(timeout=10)
        entry = client.get(comfy_entry_url(user, instance_or_port, session_key))
        assert entry.status_code == 302, entry.text
        client.base_url = self.comfy_origin
        return client


def _database_url() -> str:
    """The database this test run uses (the test database once pytest-django made it)."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    credentials = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgresql://{credentials}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def _start(command: list[str], *, log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@contextmanager
def running_gateway(
    workdir: Path, *, database_url: str, redis_url: str, gate_cache_seconds: int = GATE_CACHE_SECONDS
):
    """Start the stack in `workdir`; stops everything on exit."""
    runtime_dir = workdir / "nginx"
    static_root = workdir / "static"
    runtime_dir.mkdir(parents=True)
    port_count = EMULATOR_PORT_COUNT + 2 + FREE_PORT_COUNT
    first = free_port_block(port_count)
    ports = list(range(first, first + port_count))
    emulator_ports = ports[:EMULATOR_PORT_COUNT]
    echo_port, silent_port = ports[EMULATOR_PORT_COUNT : EMULATOR_PORT_COUNT + 2]
    site_port, comfy_port, django_port = free_port(), free_port(), free_port()
    site_origin, comfy_origin = f"http://127.0.0.1:{site_port}", f"http://127.0.0.1:{comfy_port}"
    port_range = (ports[0], ports[-1])
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "teaching.settings",
        "ENV": "development",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "SITE_ORIGIN": site_origin,
        "COMFY_PUBLIC_ORIGIN": comfy_origin,
        "COMFY_GPU_HOST": "127.0.0.1",
        "COMFY_PORT_RANGE": f"{port_range[0]}-{port_range[1]}",
        "STATIC_ROOT": str(static_root),
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
    }
    with ExitStack() as stack:
        overrides = {
            "SITE_ORIGIN": site_origin,
            "COMFY_PUBLIC_ORIGIN": comfy_origin,
            "COMFY_GPU_HOST": "127.0.0.1",
            "COMFY_PORT_RANGE": port_range,
            "STATIC_ROOT": static_root,
        }
        with override_settings(**overrides):
            call_command("collectstatic", interactive=False, verbosity=0)
            call_command(
                "comfy_nginx_config",
                listen=f"127.0.0.1:{site_port}",
                comfy_listen=f"127.0.0.1:{comfy_port}",
                django=f"127.0.0.1:{django_port}",
                static_root=str(static_root),
                runtime_dir=str(runtime_dir),
                # Workers as whoever runs the tests (root included), so they can read the temp dirs.
                user=getpass.getuser(),
                gate_cache_seconds=gate_cache_seconds,
                output=str(runtime_dir / "nginx.conf"),
                stderr=io.StringIO(),
            )

        emulator_log = workdir / "emulator.log"
        emulator_process = _start(
            [
                *(sys.executable, "-m", "comfyproxy.emulator", "--job-seconds", "0.05"),
                *("--ports", ",".join(map(str, emulator_ports)), "--output-dir", str(workdir / "emulator")),
            ],
            log=emulator_log,
        )
        emulator = EmulatorProcess(
            process=emulator_process, host="127.0.0.1", ports=emulator_ports, output_dir=workdir / "emulator"
        )
        stack.callback(emulator.stop)
        echo = EchoUpstream(echo_port)
        echo.start()
        stack.callback(echo.stop)
        uvicorn = _start(
            [
                *(sys.executable, "-m", "uvicorn", "teaching.asgi:application"),
                *("--host", "127.0.0.1", "--port", str(django_port), "--lifespan", "off"),
                *("--no-access-log", "--log-level", "warning"),
            ],
            log=workdir / "django.log",
            env=env,
        )
        stack.callback(stop_process, uvicorn)
        nginx = _start(
            [
                *(shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(runtime_dir / "nginx.conf")),
                *("-p", str(runtime_dir), "-g", "daemon off;"),
            ],
            log=runtime_dir / "stderr.log",
        )
        stack.callback(stop_process, nginx)
        for port in emulator_ports:
            wait_for_port(port, timeout=30, process=emulator_process, log=emulator_log)
        wait_for_port(django_port, timeout=30, process=uvicorn, log=workdir / "django.log")
        wait_for_port(site_port, timeout=10, process=nginx, log=runtime_dir / "stderr.log")
        wait_for_port(comfy_port, timeout=10, process=nginx, log=runtime_dir / "stderr.log")
        yield Gateway(
            site_origin=site_origin,
            comfy_origin=comfy_origin,
            django_port=django_port,
            port_range=port_range,
            emulator=emulator,
            echo=echo,
            silent_port=silent_port,
            free_ports=ports[EMULATOR_PORT_COUNT + 2 :],
            runtime_dir=runtime_dir,
            config_path=runtime_dir / "nginx.conf",
            env=env,
        )


@pytest.fixture(scope="session")
def nginx_stack(django_db_setup, django_db_blocker, tmp_path_factory):
    with running_gateway(
        tmp_path_factory.mktemp("gateway"), database_url=_database_url(), redis_url=settings.REDIS_URL
    ) as gateway:
        yield gateway


@pytest.fixture
def nginx_gateway(nginx_stack, transactional_db):
    with override_settings(**nginx_stack.settings_overrides):
        yield nginx_stack
