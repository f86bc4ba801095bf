"""The local launcher against real processes: the project's emulator, and stand-ins that misbehave."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from django.contrib.auth import get_user_model

from comfyproxy.launchers.base import LaunchError, render_command
from comfyproxy.launchers.local import LocalLauncher
from comfyproxy.models import ComfyInstance
from tests.processes import free_port, port_open, wait_until

ROOT = Path(__file__).resolve().parent.parent
EMULATOR = "{python} -m comfyproxy.emulator --host {host} --ports {port}"
IGNORES_SIGTERM = (
    "{python} -c 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)'"
)


def instance_on_free_port(username="alice") -> ComfyInstance:
    # The launcher needs only the row's values, not a saved row.
    return ComfyInstance(user=get_user_model()(username=username), host="127.0.0.1", port=free_port())


def answers_system_stats(instance) -> bool:
    try:
        return httpx.get(f"{instance.base_url}/system_stats", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def launch(tmp_path):
    """Start processes with a LocalLauncher; whatever is still running is stopped afterwards."""
    started = []

    def start(command=EMULATOR, instance=None, **options):
        launcher = LocalLauncher(command=command, log_dir=tmp_path / "logs", workdir=ROOT, **options)
        instance = instance or instance_on_free_port()
        instance.launcher_handle = launcher.start(instance)
        started.append((launcher, instance))
        return launcher, instance

    yield start
    for launcher, instance in started:
        launcher.stop(instance)


def test_starts_the_emulator_and_stops_it_again(launch):
    launcher, instance = launch()
    wait_until(lambda: answers_system_stats(instance), timeout=20, message="the emulator to answer")
    assert launcher.is_alive(instance)

    launcher.stop(instance)

    assert not launcher.is_alive(instance)
    assert not port_open(instance.port)


def test_the_instance_output_goes_to_a_log_named_after_student_and_port(launch, tmp_path):
    _launcher, instance = launch()
    wait_until(lambda: answers_system_stats(instance), timeout=20, message="the emulator to answer")
    log = Path(instance.launcher_handle["log"])
    assert log == tmp_path / "logs" / f"comfyui-alice-{instance.port}.log"
    wait_until(lambda: "ready" in log.read_text(), timeout=5, message="the emulator's ready line")


def test_a_process_that_died_is_not_alive(launch):
    launcher, instance = launch()
    os.kill(instance.launcher_handle["pid"], signal.SIGKILL)
    wait_until(lambda: not launcher.is_alive(instance), timeout=5, message="the death to be noticed")


def test_stop_kills_a_process_that_ignores_sigterm(launch):
    launcher, instance = launch(IGNORES_SIGTERM, stop_grace_seconds=0.5)
    assert launcher.is_alive(instance)
    launcher.stop(instance)
    assert not launcher.is_alive(instance)


def test_a_recycled_pid_is_not_mistaken_for_the_instance(launch):
    launcher, instance = launch()
    # The kernel gave the pid to another process: same number, different start time.
    recycled = ComfyInstance(
        user=instance.user,
        host=instance.host,
        port=instance.port,
        launcher_handle={**instance.launcher_handle, "pid": os.getpid()},
    )
    assert not launcher.is_alive(recycled)
    launcher.stop(recycled)  # must not signal the unrelated process (this test run)


# A web worker's start, in a process of its own that exits right after.
START_IN_ANOTHER_PROCESS = """
import json, sys
from pathlib import Path

import django

django.setup()
from django.contrib.auth import get_user_model
from comfyproxy.launchers.local import LocalLauncher
from comfyproxy.models import ComfyInstance

command, log_dir, workdir, port = sys.argv[1:]
launcher = LocalLauncher(command=command, log_dir=Path(log_dir), workdir=Path(workdir))
instance = ComfyInstance(user=get_user_model()(username="carol"), host="127.0.0.1", port=int(port))
print(json.dumps(launcher.start(instance)))
"""


def test_another_worker_can_check_and_stop_an_instance_it_did_not_start(tmp_path):
    instance = instance_on_free_port("carol")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            START_IN_ANOTHER_PROCESS,
            EMULATOR,
            str(tmp_path),
            str(ROOT),
            str(instance.port),
        ],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "teaching.settings"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    instance.launcher_handle = json.loads(result.stdout.strip().splitlines()[-1])
    launcher = LocalLauncher(command=EMULATOR, log_dir=tmp_path, workdir=ROOT)
    try:
        wait_until(lambda: answers_system_stats(instance), timeout=20, message="the emulator to answer")
        assert launcher.is_alive(instance)
    finally:
        launcher.stop(instance)
    assert not launcher.is_alive(instance)
    assert not port_open(instance.port)


def test_a_command_that_cannot_run_is_a_launch_error(tmp_path):
    launcher = LocalLauncher(command="/nonexistent/comfyui --port {port}", log_dir=tmp_path, workdir=ROOT)
    with pytest.raises(LaunchError, match="nonexistent"):
        launcher.start(instance_on_free_port())


def test_a_template_with_an_unknown_placeholder_is_a_launch_error(tmp_path):
    launcher = LocalLauncher(command="{python} main.py --gpu {gpu}", log_dir=tmp_path, workdir=ROOT)
    with pytest.raises(LaunchError, match="gpu"):
        launcher.start(instance_on_free_port())


def test_template_values_are_shell_quoted():
    command = render_command("echo {username} {port}", {"username": "x; rm -rf ~", "port": 8189})
    assert command == "echo 'x; rm -rf ~' 8189"
