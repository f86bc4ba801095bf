"""What the gate costs: ComfyUI's frontend files fetched directly, through a plain nginx proxy_pass,
and through the teaching system's nginx with the gate, side by side in one run.

Starts its own redis-server, SQLite database, Django (uvicorn), the ComfyUI emulator and
nginx as `comfy_nginx_config` writes it (tests/nginx_fixtures.py), plus a baseline nginx
with plain keep-alive proxy_pass. Two upstreams hold the same files: the emulator (aiohttp,
as ComfyUI serves its frontend) and a static nginx server, so fast that what remains is the
proxies' own cost. A student enters through the entry link like a browser; then each file
is fetched over one keep-alive connection per route, the routes taking turns request by
request so that any drift of the machine hits all of them alike. Last, the cost of one
uncached gate decision (Django alone).

    .venv/bin/python bench/gate_bench.py                    # 3000 requests per route and file
    .venv/bin/python bench/gate_bench.py --requests 500

The goal (issue): gated p50 within 1.5x of the plain proxy_pass p50.
"""

import argparse
import getpass
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import start_redis  # noqa: E402
from tests.processes import free_port, stop_process, wait_for_port  # noqa: E402

FRONTEND = Path(str(files("comfyui_frontend_package"))) / "static"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WARM_UP = 200
# The baseline: the same keep-alive upstreams and logging as the gated config, nothing else.
# It also serves the frontend's files itself, as the fast upstream.
BASELINE_CONFIG = """
user {user};
worker_processes auto;
pid {runtime}/nginx.pid;
error_log {runtime}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    include /etc/nginx/mime.types;
    access_log {runtime}/access.log;
    client_body_temp_path {runtime}/client_body;
    proxy_temp_path {runtime}/proxy;
    fastcgi_temp_path {runtime}/fastcgi;
    uwsgi_temp_path {runtime}/uwsgi;
    scgi_temp_path {runtime}/scgi;
    upstream emulator {{ server 127.0.0.1:{emulator_port}; keepalive 8; }}
    upstream static {{ server 127.0.0.1:{static_port}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{static_port};
        access_log off;
        root {frontend};
    }}
    server {{
        listen 127.0.0.1:{plain_emulator_port};
        location / {{
            proxy_pass http://emulator;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header Accept-Encoding "";
        }}
    }}
    server {{
        listen 127.0.0.1:{plain_static_port};
        location / {{
            proxy_pass http://static;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header Accept-Encoding "";
        }}
    }}
}}
"""


class Route:
    """One way to the files: a keep-alive connection and what to send on it."""

    def __init__(self, name: str, port: int, prefix: str, headers: dict):
        self.name, self.prefix, self.headers = name, prefix, headers
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.samples: list[float] = []

    def fetch(self, path: str) -> float:
        started = time.perf_counter()
        self.connection.request("GET", self.prefix + path, headers=self.headers)
        response = self.connection.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200 or not body:
            raise RuntimeError(f"{self.name}: {response.status} for {self.prefix + path}")
        return elapsed


def frontend_files() -> list[tuple[str, int]]:
    """A median-sized file (most of the ~500 a page load fetches) and a 90th-percentile one."""
    sizes = sorted(
        (path.stat().st_size, path.relative_to(FRONTEND).as_posix())
        for path in (FRONTEND / "assets").rglob("*")
        if path.is_file()
    )
    picked = [sizes[int(len(sizes) * share)] for share in (0.5, 0.9)]
    return [(name, size) for size, name in picked]


def percentile(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def compare(title: str, routes: list[Route], path: str, requests: int) -> None:
    for route in routes:
        for _ in range(WARM_UP):
            route.fetch(path)
    for _ in range(requests):
        for route in routes:
            route.samples.append(route.fetch(path))
    print(f"\n{title}, {requests} requests per route")
    print(f"  {'route':<18}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'p50/direct':>12}")
    direct = statistics.median(routes[0].samples)
    for route in routes:
        p50 = statistics.median(route.samples)
        print(
            f"  {route.name:<18}{p50 * 1e3:>9.3f}{percentile(route.samples, 0.9) * 1e3:>9.3f}"
            f"{percentile(route.samples, 0.99) * 1e3:>9.3f}{statistics.fmean(route.samples) * 1e3:>9.3f}"
            f"{p50 / direct:>11.2f}x"
        )
    plain, gated = (statistics.median(route.samples) for route in routes[1:])
    verdict = "within" if gated <= 1.5 * plain else "NOT within"
    print(f"  gated / plain proxy_pass at p50: {gated / plain:.2f}x ({verdict} the 1.5x goal)")


def gate_miss_cost(gateway, access_cookie: str, username: str, port: int, requests: int) -> None:
    """What one cache miss costs: the gate view itself, asked straight at uvicorn."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.django_port, timeout=10)
    headers = {
        "Host": gateway.comfy_origin.removeprefix("http://"),
        "X-Comfy-Access": access_cookie,
        "X-Comfy-User": username,
        "X-Comfy-Port": str(port),
    }
    samples = []
    for attempt in range(WARM_UP // 4 + requests):
        started = time.perf_counter()
        connection.request("GET", "/_gate/comfy/", headers=headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"the gate refused: {response.status} {response.headers}")
        if attempt >= WARM_UP // 4:
            samples.append(time.perf_counter() - started)
    print(
        f"\nuncached gate decision (Django under uvicorn, {requests} requests): "
        f"p50 {statistics.median(samples) * 1e3:.2f} ms, p99 {percentile(samples, 0.99) * 1e3:.2f} ms, "
        f"{1 / statistics.fmean(samples):.0f} decisions/s on one connection"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="timed requests per route and file")
    options = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="gate-bench-"))
    redis, redis_port = start_redis(workdir)
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "teaching.settings",
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "DATABASE_URL": f"sqlite:///{workdir / 'bench.sqlite3'}",
        }
    )
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.test import override_settings

    from comfyproxy.gateway import ACCESS_COOKIE
    from comfyproxy.services.instances import register_instance
    from tests.nginx_fixtures import running_gateway

    call_command("migrate", verbosity=0)
    baseline = None
    try:
        with running_gateway(
            workdir / "stack", database_url=os.environ["DATABASE_URL"], redis_url=os.environ["REDIS_URL"]
        ) as gateway:
            emulator_port, static_port = gateway.emulator_ports[0], gateway.free_ports[0]
            plain_emulator_port, plain_static_port = free_port(), free_port()
            runtime = workdir / "baseline"
            runtime.mkdir()
            (runtime / "nginx.conf").write_text(
                BASELINE_CONFIG.format(
                    user=getpass.getuser(),
                    runtime=runtime,
                    frontend=FRONTEND,
                    emulator_port=emulator_port,
                    static_port=static_port,
                    plain_emulator_port=plain_emulator_port,
                    plain_static_port=plain_static_port,
                )
            )
            baseline = subprocess.Popen(
                [NGINX, "-c", str(runtime / "nginx.conf"), "-p", str(runtime), "-g", "daemon off;"],
                stderr=(runtime / "stderr.log").open("wb"),
            )
            for port in (static_port, plain_emulator_port, plain_static_port):
                wait_for_port(port, timeout=10, process=baseline)

            # Two students: one's ComfyUI is the emulator, the other's the static server.
            cookies = {}
            with override_settings(**gateway.settings_overrides):
                for username, port in (("emulated", emulator_port), ("static", static_port)):
                    student = get_user_model().objects.create_user(username, password=f"pw-{username}")
                    register_instance(user=student, port=port)
                    cookies[username] = gateway.comfy_client(student, port).cookies[ACCESS_COOKIE]

            version = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr.strip()
            print(
                f"{version}; {os.cpu_count()} cores shared by Django, the emulator, both nginx and the client"
            )
            comfy_port = int(gateway.comfy_origin.rsplit(":", 1)[1])
            for path, size in frontend_files():
                for upstream, username, port, plain_port in (
                    ("the emulator", "emulated", emulator_port, plain_emulator_port),
                    ("a static nginx", "static", static_port, plain_static_port),
                ):
                    routes = [
                        Route("direct", port, "/", {}),
                        Route("plain proxy_pass", plain_port, "/", {}),
                        Route(
                            "gated",
                            comfy_port,
                            f"/comfyui/{username}/{port}/",
                            {"Cookie": f"{ACCESS_COOKIE}={cookies[username]}"},
                        ),
                    ]
                    compare(f"{path} ({size} bytes) from {upstream}", routes, path, options.requests)
            gate_miss_cost(
                gateway, cookies["emulated"], "emulated", emulator_port, max(options.requests // 10, 50)
            )
    finally:
        if baseline is not None:
            stop_process(baseline)
        stop_process(redis)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
