"""A real OpenSSH server on a free loopback port, for the SSH launcher's tests.

It lets in only the current user, only with a key generated for the test run (root by
key too, on this server alone); host key, client key, known_hosts and config all live in
a temporary directory. Nothing else on the machine is touched, except that sshd needs its
privilege-separation directory, which Debian creates only when the service first starts.
"""

import getpass
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from tests.processes import free_port, stop_process, wait_for_port

SSHD = "/usr/sbin/sshd"  # sshd re-executes itself, so it must be started by absolute path
PRIVSEP_DIR = Path("/run/sshd")


@dataclass(frozen=True)
class SSHServer:
    host: str
    port: int
    user: str
    key_file: Path
    known_hosts: Path
    log: Path


def _write_key(key: asyncssh.SSHKey, path: Path) -> None:
    key.write_private_key(str(path))
    path.chmod(0o600)


def _config(directory: Path, user: str) -> str:
    return "\n".join(
        [
            "ListenAddress 127.0.0.1",
            f"HostKey {directory / 'host_key'}",
            f"PidFile {directory / 'sshd.pid'}",
            f"AuthorizedKeysFile {directory / 'authorized_keys'}",
            f"AllowUsers {user}",
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "LogLevel VERBOSE",
            "",
        ]
    )


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sshd")
    user = getpass.getuser()
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519", comment="comfyproxy-tests")
    _write_key(host_key, directory / "host_key")
    _write_key(client_key, directory / "client_key")
    (directory / "authorized_keys").write_bytes(client_key.export_public_key())
    config = directory / "sshd_config"
    config.write_text(_config(directory, user))
    if os.geteuid() == 0:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)

    port = free_port()
    known_hosts = directory / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_key.export_public_key().decode()}")
    log = directory / "sshd.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config), "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, timeout=10, process=process)
    except (RuntimeError, TimeoutError):
        stop_process(process)
        raise RuntimeError(f"sshd did not start: {log.read_text()}") from None
    yield SSHServer("127.0.0.1", port, user, directory / "client_key", known_hosts, log)
    stop_process(process)
