"""The SSH launcher: start and stop ComfyUI on the GPU server over SSH, with keys.

Commands come from the COMFY_SSH_* templates with every value shell-quoted. The start
command must background ComfyUI and print its pid last (`... & echo $!`); stop and the
liveness check use that pid. Each call opens its own short connection: a class starts a
few dozen instances per lesson, and a pooled connection would only add a way to go stale.

Called from synchronous code (views, commands, the dispatcher through sync_to_async), so
each call runs its own small event loop.
"""

import asyncio
import logging

import asyncssh
from django.conf import settings

from comfyproxy.launchers.base import Launcher, LaunchError, command_values, render_command

logger = logging.getLogger(__name__)


class SSHLauncher(Launcher):
    name = "ssh"

    def __init__(
        self,
        *,
        host: str,
        port: int,
        user: str,
        key_file: str,
        known_hosts: str,
        start_command: str,
        stop_command: str,
        check_command: str,
        timeout: float,
    ):
        self.host = host
        self.port = port
        self.user = user
        self.key_file = key_file
        self.known_hosts = known_hosts
        self.start_command = start_command
        self.stop_command = stop_command
        self.check_command = check_command
        self.timeout = timeout

    @classmethod
    def from_settings(cls) -> "SSHLauncher":
        return cls(
            host=settings.COMFY_SSH_HOST,
            port=settings.COMFY_SSH_PORT,
            user=settings.COMFY_SSH_USER,
            key_file=settings.COMFY_SSH_KEY_FILE,
            known_hosts=settings.COMFY_SSH_KNOWN_HOSTS,
            start_command=settings.COMFY_SSH_START_COMMAND,
            stop_command=settings.COMFY_SSH_STOP_COMMAND,
            check_command=settings.COMFY_SSH_CHECK_COMMAND,
            timeout=settings.COMFY_SSH_TIMEOUT_SECONDS,
        )

    def start(self, instance) -> dict:
        result = self._run(render_command(self.start_command, command_values(instance)))
        if result.exit_status != 0:
            raise LaunchError(f"start command exited with {result.exit_status}: {_tail(result.stderr)}")
        pid = _last_pid(result.stdout)
        if pid is None:
            raise LaunchError(f"start command printed no pid (end it with `echo $!`): {_tail(result.stdout)}")
        logger.info("started ComfyUI for %s on %s as remote pid %d", instance.user, self.host, pid)
        return {"pid": pid}

    def stop(self, instance) -> None:
        pid = instance.launcher_handle.get("pid")
        if not pid:
            return
        result = self._run(render_command(self.stop_command, command_values(instance, pid=pid)))
        # A failing `kill` usually means the process was already gone; only a survivor is an error.
        if result.exit_status != 0 and self.is_alive(instance):
            raise LaunchError(f"stop command exited with {result.exit_status}: {_tail(result.stderr)}")

    def is_alive(self, instance) -> bool:
        pid = instance.launcher_handle.get("pid")
        if not pid:
            return False
        result = self._run(render_command(self.check_command, command_values(instance, pid=pid)))
        return result.exit_status == 0

    def _run(self, command: str) -> asyncssh.SSHCompletedProcess:
        try:
            return asyncio.run(self._run_remote(command))
        except (OSError, asyncssh.Error, TimeoutError) as error:
            raise LaunchError(
                f"ssh {self.user}@{self.host}:{self.port} {command!r}: {error or type(error).__name__}"
            ) from None

    async def _run_remote(self, command: str) -> asyncssh.SSHCompletedProcess:
        options = {}
        if self.key_file:
            options["client_keys"] = [self.key_file]
        if self.known_hosts:
            options["known_hosts"] = self.known_hosts
        async with asyncio.timeout(self.timeout):
            async with asyncssh.connect(self.host, self.port, username=self.user, **options) as connection:
                return await connection.run(command, check=False)


def _last_pid(output) -> int | None:
    lines = str(output or "").strip().splitlines()
    if not lines:
        return None
    try:
        pid = int(lines[-1].strip())
    except ValueError:
        return None
    return pid if pid > 0 else None


def _tail(output, limit: int = 500) -> str:
    return str(output or "").strip()[-limit:]
