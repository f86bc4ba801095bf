"""Fixtures shared by the suite: people, instances, and clients logged in as them."""

import itertools
import signal
from dataclasses import dataclass

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.test import Client, override_settings
from django.utils import timezone

from comfyproxy import gateway
from comfyproxy.launchers import LaunchError, launcher_for
from comfyproxy.models import TERMINAL_STATUSES, ComfyInstance, QueueSettings, Task, TaskStatus
from comfyproxy.services import instances
from tests.nginx_fixtures import nginx_gateway, nginx_stack  # noqa: F401 (nginx + Django + emulator)
from tests.processes import free_port_block

# Registered here, before any test directory's conftest imports from it, so that pytest
# rewrites its asserts (a module imported first and registered later is an error).
pytest_plugins = ["tests.dispatcher_fixtures"]

_usernames = itertools.count(1)


class CheapPBKDF2PasswordHasher(PBKDF2PasswordHasher):
    """Django's own PBKDF2 with a single iteration: a test user costs microseconds, not the
    second of CPU a production hash takes (most tests make several). The iteration count is
    part of each hash, so servers and commands the tests start check these passwords with
    their usual hashers."""

    iterations = 1


@pytest.fixture(scope="session", autouse=True)
def _cheap_password_hashes():
    # For the whole run, not through the per-test `settings` fixture: that would make every
    # test's `settings` an autouse fixture, set up first and so restored last, after the
    # teardown of fixtures that rely on a test's own overrides (CACHES) being undone.
    with override_settings(PASSWORD_HASHERS=["tests.conftest.CheapPBKDF2PasswordHasher"]):
        yield


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """A command run in-process (`call_command("comfy_instance_monitor", "--once")`) installs its
    own SIGTERM/SIGINT handlers; left in place, Ctrl-C and a CI timeout's SIGTERM no longer stop
    the test run. Put pytest's back after every test."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        if signal.getsignal(signum) is not handler:
            signal.signal(signum, handler)


@pytest.fixture
def fast_password_hashing(settings):
    """Cheap password hashes for tests whose users never log in to another process by password."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def make_student(db):
    def make(username: str | None = None, **extra):
        username = username or f"student{next(_usernames)}"
        return get_user_model().objects.create_user(username=username, password="pw-" + username, **extra)

    return make


@pytest.fixture
def student(make_student):
    return make_student("alice")


@pytest.fixture
def other_student(make_student):
    return make_student("bob")


@pytest.fixture
def teacher(db):
    return get_user_model().objects.create_user(
        username="teacher", password="pw-teacher", is_staff=True, is_superuser=True
    )


@pytest.fixture
def client_for():
    def make(user) -> Client:
        client = Client()
        client.force_login(user)
        return client

    return make


@pytest.fixture
def comfy_client_for(settings):
    """A client on the ComfyUI origin: logged in to the teaching site, then in through the entry link.

    Under /comfyui/ only the entry's comfy_access cookie counts, never the session.
    """

    def make(user, instance_or_port=None) -> Client:
        client = Client()
        client.force_login(user)
        target = instance_or_port if instance_or_port is not None else user.comfy_instance
        url = gateway.comfy_entry_url(user, target, client.session.session_key)
        assert client.get(url.removeprefix(settings.COMFY_PUBLIC_ORIGIN.rstrip("/"))).status_code == 302
        return client

    return make


@pytest.fixture
def register_instance(db):
    """Record a running instance for a user at a port (as `comfy_instances register` does)."""

    def register(user, port: int, host: str = "127.0.0.1"):
        return instances.register_instance(user=user, port=port, host=host)

    return register


@dataclass(frozen=True)
class LocalComfy:
    ports: range
    # The same configuration as environment variables, for servers a test runs as subprocesses.
    env: dict[str, str]


@pytest.fixture
def local_comfy(db, settings, tmp_path):
    """Students' instances start as real emulator processes (the local launcher) on free
    loopback ports; every one still running is stopped after the test."""
    port_count = 4
    first = free_port_block(port_count)
    env = {
        "COMFY_LAUNCHER": "local",
        "COMFY_GPU_HOST": "127.0.0.1",
        "COMFY_PROXY_BASE_URL": "http://127.0.0.1",
        "COMFY_PORT_RANGE": f"{first}-{first + port_count - 1}",
        "COMFY_LOCAL_LOG_DIR": str(tmp_path / "comfyui-logs"),
        "COMFY_START_TIMEOUT_SECONDS": "20",
    }
    settings.COMFY_LAUNCHER = env["COMFY_LAUNCHER"]
    settings.COMFY_GPU_HOST = env["COMFY_GPU_HOST"]
    settings.COMFY_PROXY_BASE_URL = env["COMFY_PROXY_BASE_URL"]
    settings.COMFY_PORT_RANGE = (first, first + port_count - 1)
    settings.COMFY_LOCAL_LOG_DIR = env["COMFY_LOCAL_LOG_DIR"]
    settings.COMFY_START_TIMEOUT_SECONDS = int(env["COMFY_START_TIMEOUT_SECONDS"])
    yield LocalComfy(ports=range(first, first + port_count), env=env)
    for instance in ComfyInstance.objects.exclude(launcher_handle={}):
        launcher = launcher_for(instance)
        try:
            if launcher is not None:
                launcher.stop(instance)
        except LaunchError:
            pass  # a test's deliberately unreachable GPU server: nothing was started there


@pytest.fixture
def queue_settings(db):
    return QueueSettings.load()


@pytest.fixture
def make_task(db):
    """A task row in any state with the timestamps the dispatcher would have written (test data)."""
    sequence = itertools.count()

    def make(
        owner,
        *,
        status=TaskStatus.QUEUED,
        queued_at=None,
        started_at=None,
        submitted_at=None,
        finished_at=None,
        reason="",
        port=8189,
    ):
        queued_at = queued_at or timezone.now()
        if status == TaskStatus.PROCESSING and started_at is None:
            started_at = submitted_at = queued_at
        if status in TERMINAL_STATUSES and finished_at is None:
            finished_at = timezone.now()
        return Task.objects.create(
            owner=owner,
            host="127.0.0.1",
            port=port,
            prompt={"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}}},
            status=status,
            reason=reason,
            queue_order=int(queued_at.timestamp() * 1_000_000) + next(sequence),
            queued_at=queued_at,
            started_at=started_at,
            submitted_at=submitted_at,
            finished_at=finished_at,
        )

    return make
