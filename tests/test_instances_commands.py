"""Operators' commands: `comfy_instances` (list, start, stop, stop-idle) and `comfy_instance_monitor`."""

import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.utils import timezone, translation

from comfyproxy.models import ComfyInstance, InstanceState
from comfyproxy.services import instances
from tests.processes import wait_until

ROOT = Path(__file__).resolve().parent.parent


def run(*args) -> str:
    out = StringIO()
    call_command("comfy_instances", *args, stdout=out)
    return out.getvalue()


def test_start_list_and_stop_a_students_comfyui(local_comfy, student):
    assert "alice is running at 127.0.0.1:" in run("start", "alice")
    port = ComfyInstance.objects.get(user=student).port

    header, row = run("list").splitlines()
    assert header.split()[:4] == ["user", "state", "host", "port"]
    assert row.split()[:5] == ["alice", "running", "127.0.0.1", str(port), "local"]

    assert run("stop", "alice").strip() == "alice: stopped"
    assert ComfyInstance.objects.get(user=student).state == InstanceState.STOPPED


def test_list_as_json_for_scripts(student, register_instance):
    register_instance(student, 8189)

    (row,) = json.loads(run("list", "--json"))

    assert row["username"] == "alice"
    assert (row["state"], row["port"], row["launcher"]) == ("running", 8189, "external")
    assert row["started_at"].startswith(str(timezone.now().year))


def test_stop_idle_reports_what_it_stopped(local_comfy, student, other_student, queue_settings):
    queue_settings.idle_stop_minutes = 10
    queue_settings.save()
    instances.start_instance(student)
    instances.start_instance(other_student)
    ComfyInstance.objects.filter(user=student).update(last_activity_at=timezone.now() - timedelta(hours=1))

    assert run("stop-idle").strip() == "stopped 1 idle instance(s): alice"
    assert ComfyInstance.objects.get(user=other_student).state == InstanceState.RUNNING


def test_a_start_that_fails_is_a_command_error_with_the_reason(local_comfy, student, settings):
    settings.COMFY_LOCAL_COMMAND = "{python} -c 'raise SystemExit(1)'"
    with translation.override("en"), pytest.raises(CommandError, match="exited while starting"):
        run("start", "alice")


def test_an_unknown_student_is_a_command_error(db):
    with pytest.raises(CommandError, match="no user 'nobody'"):
        run("start", "nobody")


# --- The monitor ---------------------------------------------------------------------------


def test_one_monitor_round_notices_a_crashed_instance(local_comfy, student):
    instance = instances.start_instance(student)
    os.kill(instance.launcher_handle["pid"], signal.SIGKILL)

    call_command("comfy_instance_monitor", "--once")

    assert ComfyInstance.objects.get(user=student).state == InstanceState.FAILED


@pytest.mark.django_db(transaction=True)
def test_the_monitor_process_keeps_watching_and_exits_on_sigterm(local_comfy, student, tmp_path):
    instance = instances.start_instance(student)
    env = {
        **os.environ,
        **local_comfy.env,
        "DATABASE_URL": f"sqlite:///{settings.DATABASES['default']['NAME']}",
    }
    with open(tmp_path / "monitor.log", "wb") as log:
        monitor = subprocess.Popen(
            [sys.executable, "manage.py", "comfy_instance_monitor", "--interval", "0.2"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        os.kill(instance.launcher_handle["pid"], signal.SIGKILL)
        wait_until(
            lambda: ComfyInstance.objects.get(user=student).state == InstanceState.FAILED,
            timeout=20,
            message="the monitor to notice the crash",
        )
        monitor.send_signal(signal.SIGTERM)
        assert monitor.wait(timeout=10) == 0
    finally:
        if monitor.poll() is None:
            monitor.kill()
            monitor.wait()
    assert "instance monitor stopped" in (tmp_path / "monitor.log").read_text()
