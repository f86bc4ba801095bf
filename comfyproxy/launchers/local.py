"""The local launcher: ComfyUI (or the project's emulator) as a process on this machine.

Each instance runs in its own session, so stopping it signals its whole process group.
The handle records the pid and the process's start time, so that a pid the kernel has
since given to another process is never mistaken for the student's ComfyUI (Linux /proc).
"""

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings

from comfyproxy.launchers.base import Launcher, LaunchError, command_values, render_command

logger = logging.getLogger(__name__)

# A stopped ComfyUI gets this long to exit on SIGTERM before it is killed.
DEFAULT_STOP_GRACE_SECONDS = 10.0
# SIGKILL cannot be ignored; this only covers the kernel tearing a big process down.
KILL_WAIT_SECONDS = 5.0

# Processes this process started. A dead child stays a zombie (and looks alive in /proc)
# until its parent collects it, so they are kept here to be waited for and reaped.
_children: dict[int, subprocess.Popen] = {}


class LocalLauncher(Launcher):
    name = "local"

    def __init__(
        self,
        *,
        command: str,
        log_dir: Path,
        workdir: Path,
        stop_grace_seconds: float = DEFAULT_STOP_GRACE_SECONDS,
    ):
        self.command = command
        self.log_dir = log_dir
        self.workdir = workdir
        self.stop_grace_seconds = stop_grace_seconds

    @classmethod
    def from_settings(cls) -> "LocalLauncher":
        return cls(
            command=settings.COMFY_LOCAL_COMMAND,
            log_dir=Path(settings.COMFY_LOCAL_LOG_DIR),
            workdir=Path(settings.BASE_DIR),
        )

    def start(self, instance) -> dict:
        _reap_finished_children()
        rendered = render_command(self.command, command_values(instance, python=sys.executable))
        try:
            argv = shlex.split(rendered)
        except ValueError as error:
            raise LaunchError(f"bad COMFY_LOCAL_COMMAND {self.command!r}: {error}") from None
        log_path = self.log_dir / log_file_name(instance)
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with open(log_path, "ab") as log:
                process = subprocess.Popen(
                    argv,
                    cwd=self.workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as error:
            raise LaunchError(f"could not run {rendered!r}: {error}") from None
        _children[process.pid] = process
        logger.info("started %r as pid %d (log %s)", rendered, process.pid, log_path)
        return {"pid": process.pid, "process_start": _start_time(process.pid), "log": str(log_path)}

    def is_alive(self, instance) -> bool:
        pid = instance.launcher_handle.get("pid")
        if not pid:
            return False
        child = _children.get(pid)
        if child is not None:
            return child.poll() is None
        expected_start = instance.launcher_handle.get("process_start")
        return expected_start is not None and _start_time(pid) == expected_start

    def stop(self, instance) -> None:
        if not self.is_alive(instance):
            _children.pop(instance.launcher_handle.get("pid"), None)
            return
        pid = instance.launcher_handle["pid"]
        _signal_group(pid, signal.SIGTERM)
        if not self._wait_for_exit(instance, self.stop_grace_seconds):
            logger.warning("pid %d ignored SIGTERM for %ss; killing it", pid, self.stop_grace_seconds)
            _signal_group(pid, signal.SIGKILL)
            if not self._wait_for_exit(instance, KILL_WAIT_SECONDS):
                raise LaunchError(f"pid {pid} is still running after SIGKILL")
        _children.pop(pid, None)

    def _wait_for_exit(self, instance, timeout: float) -> bool:
        child = _children.get(instance.launcher_handle["pid"])
        if child is not None:
            try:
                child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        # Not our child (started by another worker): /proc is all there is to watch.
        deadline = time.monotonic() + timeout
        while self.is_alive(instance):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True


def log_file_name(instance) -> str:
    username = re.sub(r"[^A-Za-z0-9@.+_-]", "_", instance.user.get_username())
    return f"comfyui-{username}-{instance.port}.log"


def _start_time(pid: int) -> int | None:
    """When a live (non-zombie) process started, in clock ticks since boot; None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; fields after it do not.
    fields = stat[stat.rindex(")") + 2 :].split()
    state, start_ticks = fields[0], fields[19]
    return None if state in {"Z", "X"} else int(start_ticks)


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass
    except PermissionError as error:
        raise LaunchError(f"not allowed to signal pid {pid}: {error}") from None


def _reap_finished_children() -> None:
    for pid, child in list(_children.items()):
        if child.poll() is not None:
            del _children[pid]
