"""The SSH launcher against a real sshd on loopback, starting the project's emulator over SSH."""

import shlex
import sys
from pathlib import Path

import asyncssh
import httpx
import pytest

from comfyproxy.launchers.base import LaunchError
from comfyproxy.launchers.ssh import SSHLauncher
from comfyproxy.models import ComfyInstance, InstanceState
from comfyproxy.services import instances
from tests.processes import free_port, port_open, wait_until

pytest_plugins = ["tests.sshd_fixtures"]

ROOT = Path(__file__).resolve().parent.parent


def emulator_over_ssh(log_dir: Path) -> str:
    """A start command in the shape of the production default, with the emulator for ComfyUI."""
    return (
        f"cd {shlex.quote(str(ROOT))} || exit 1; "
        f"nohup {shlex.quote(sys.executable)} -m comfyproxy.emulator --host {{host}} --ports {{port}} "
        f"> {shlex.quote(str(log_dir))}/comfyui-{{username}}-{{port}}.log 2>&1 < /dev/null & echo $!"
    )


def ssh_options(sshd, tmp_path, **overrides) -> dict:
    options = {
        "host": sshd.host,
        "port": sshd.port,
        "user": sshd.user,
        "key_file": str(sshd.key_file),
        "known_hosts": str(sshd.known_hosts),
        "start_command": emulator_over_ssh(tmp_path),
        "stop_command": "kill {pid}",
        "check_command": "kill -0 {pid}",
        "timeout": 10,
    }
    return {**options, **overrides}


def answers_system_stats(instance) -> bool:
    try:
        return httpx.get(f"{instance.base_url}/system_stats", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def ssh_launcher(sshd, tmp_path):
    launcher = SSHLauncher(**ssh_options(sshd, tmp_path))
    started = []
    yield launcher, started
    for instance in started:
        launcher.stop(instance)


@pytest.fixture
def instance(student):
    return ComfyInstance(user=student, host="127.0.0.1", port=free_port())


def test_starts_comfyui_over_ssh_and_stops_it(ssh_launcher, instance):
    launcher, started = ssh_launcher
    instance.launcher_handle = launcher.start(instance)
    started.append(instance)
    assert instance.launcher_handle["pid"] > 0

    wait_until(lambda: answers_system_stats(instance), timeout=20, message="the emulator to answer")
    assert launcher.is_alive(instance)

    launcher.stop(instance)

    wait_until(lambda: not launcher.is_alive(instance), timeout=10, message="the process to exit")
    assert not port_open(instance.port)


def test_stopping_an_instance_that_already_exited_is_not_an_error(ssh_launcher, instance):
    launcher, started = ssh_launcher
    instance.launcher_handle = launcher.start(instance)
    started.append(instance)
    launcher.stop(instance)
    wait_until(lambda: not launcher.is_alive(instance), timeout=10, message="the process to exit")
    launcher.stop(instance)


def test_a_start_command_that_prints_no_pid_is_refused(sshd, tmp_path, instance):
    launcher = SSHLauncher(**ssh_options(sshd, tmp_path, start_command="true"))
    with pytest.raises(LaunchError, match="no pid"):
        launcher.start(instance)


def test_a_failing_start_command_reports_its_error_output(sshd, tmp_path, instance):
    launcher = SSHLauncher(**ssh_options(sshd, tmp_path, start_command="echo no GPU >&2; exit 3"))
    with pytest.raises(LaunchError, match="exited with 3: no GPU"):
        launcher.start(instance)


def test_an_unreachable_ssh_server_is_a_launch_error(sshd, tmp_path, instance):
    launcher = SSHLauncher(**ssh_options(sshd, tmp_path, port=free_port()))
    with pytest.raises(LaunchError, match="ssh "):
        launcher.start(instance)


def test_a_server_with_an_unknown_host_key_is_refused(sshd, tmp_path, instance):
    impostor = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{sshd.host}]:{sshd.port} {impostor}")
    launcher = SSHLauncher(**ssh_options(sshd, tmp_path, known_hosts=str(known_hosts)))
    with pytest.raises(LaunchError, match=r"[Hh]ost key"):
        launcher.start(instance)


def test_a_username_cannot_inject_shell_commands(sshd, tmp_path, make_student):
    marker = tmp_path / "injected"
    student = make_student(f"x;touch {marker}")
    launcher = SSHLauncher(**ssh_options(sshd, tmp_path, start_command="echo {username} >/dev/null; echo 1"))
    launcher.start(ComfyInstance(user=student, host="127.0.0.1", port=free_port()))
    assert not marker.exists()


# --- The whole start through the service, with COMFY_LAUNCHER=ssh -------------------------


@pytest.fixture
def ssh_settings(settings, sshd, tmp_path, local_comfy):
    """The GPU server is this machine, reached through the test sshd (ports from local_comfy)."""
    settings.COMFY_LAUNCHER = "ssh"
    settings.COMFY_SSH_HOST = sshd.host
    settings.COMFY_SSH_PORT = sshd.port
    settings.COMFY_SSH_USER = sshd.user
    settings.COMFY_SSH_KEY_FILE = str(sshd.key_file)
    settings.COMFY_SSH_KNOWN_HOSTS = str(sshd.known_hosts)
    settings.COMFY_SSH_START_COMMAND = emulator_over_ssh(tmp_path)
    return settings


def test_a_student_starts_and_stops_comfyui_on_the_gpu_server_over_ssh(ssh_settings, student):
    instance = instances.start_instance(student)

    assert instance.state == InstanceState.RUNNING
    assert instance.launcher == "ssh"
    assert answers_system_stats(instance)

    instances.stop_instance(student)

    instance.refresh_from_db()
    assert instance.state == InstanceState.STOPPED
    wait_until(lambda: not port_open(instance.port), timeout=10, message="the port to close")
