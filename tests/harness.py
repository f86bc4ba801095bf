"""Services the whole test run shares, started before Django reads its settings.

Loaded with `-p tests.harness` (pyproject.toml) so it runs before pytest-django imports
settings: it starts a private redis-server on a free loopback port and points REDIS_URL
at it, and gives SQLite tests a file database that subprocesses (dispatcher, web server)
can open too. Nothing here collides with services already running on the machine.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.processes import free_port, wait_for_port

_state: dict = {}


def start_redis(directory: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(directory),
            "--logfile", str(directory / "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, timeout=10, process=process, log=directory / "redis.log")
    return process, port


@pytest.hookimpl(hookwrapper=True)
def pytest_load_initial_conftests(early_config, parser, args):
    workdir = Path(tempfile.mkdtemp(prefix="comfyproxy-tests-"))
    _state["workdir"] = workdir
    if not os.environ.get("TEST_REDIS_URL"):
        process, port = start_redis(workdir)
        _state["redis"] = process
        os.environ["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        os.environ["TEST_REDIS_PORT"] = str(port)
    else:
        os.environ["REDIS_URL"] = os.environ["TEST_REDIS_URL"]
    os.environ.setdefault("COMFYPROXY_TEST_SQLITE", str(workdir / "test.sqlite3"))
    os.environ.setdefault("COMFYPROXY_TEST_DB_NAME", f"test_comfyproxy_{os.getpid()}")
    os.environ.setdefault("COMFYPROXY_TEST_WORKDIR", str(workdir))
    yield


def pytest_unconfigure(config):
    process = _state.pop("redis", None)
    if process is not None:
        process.terminate()
        process.wait(timeout=10)
    workdir = _state.pop("workdir", None)
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
