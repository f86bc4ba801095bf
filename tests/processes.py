"""Small helpers for tests that run real servers: free ports, waiting for them, stopping them."""

import contextlib
import fcntl
import os
import random
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# Ports are picked below the kernel's ephemeral range: a port picked there (bind to 0) is free
# when picked, but any outgoing connection may take it before the server that should listen on
# it starts, which happened under the fault suite's hundreds of client sockets.
_LOWEST_PORT = 20000
_handed_out: set[int] = set()
# Test runs side by side (scripts/test.sh runs SQLite and PostgreSQL at once, other people run
# theirs) pick from the same range: a port handed out is also locked, as one byte at its offset
# of this file, for as long as the process lives, so that no other run hands it out before its
# server listens (or while a test relies on nothing listening there). The kernel drops the locks
# when the process exits, however it exits.
_PORT_LOCK_PATH = Path(tempfile.gettempdir()) / "comfyproxy-test-ports.lock"
_port_lock_file = None


def _reserve(block: range) -> bool:
    global _port_lock_file
    if _port_lock_file is None:
        # Kept open for good: closing any descriptor of the file would drop all this process's locks.
        _port_lock_file = _PORT_LOCK_PATH.open("a+b")
        with contextlib.suppress(OSError):
            _PORT_LOCK_PATH.chmod(0o666)
    try:
        fcntl.lockf(_port_lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB, len(block), block.start)
    except OSError:
        return False  # another live run holds (part of) it
    return True


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    return free_port_block(1)


def free_port_block(count: int) -> int:
    """First port of `count` consecutive free ports (for servers that take a range)."""
    highest_first = _ephemeral_low() - count
    for _attempt in range(500):
        first = random.randint(_LOWEST_PORT, highest_first)
        block = range(first, first + count)
        if _handed_out.intersection(block) or not _reserve(block):
            continue
        socks = []
        try:
            for port in range(first, first + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            _handed_out.update(block)
            return first
        except OSError:
            fcntl.lockf(_port_lock_file, fcntl.LOCK_UN, count, first)
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no block of {count} free ports")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_for_port(
    port: int,
    *,
    timeout: float,
    process: subprocess.Popen | None = None,
    host="127.0.0.1",
    log: Path | None = None,
):
    """Wait until something listens on the port (polling is all a TCP port offers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"process exited with {process.returncode} before listening on {port}{_log_tail(log)}"
            )
        if port_open(port, host):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def _log_tail(log: Path | None, lines: int = 20) -> str:
    if log is None:
        return ""
    try:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n--- " + str(log) + " ---\n" + "\n".join(tail)


def wait_until(predicate, *, timeout: float, interval: float = 0.02, message: str = "condition"):
    """Poll a condition that has no event to await (another process's state), with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def stop_process(process: subprocess.Popen, *, timeout: float = 10) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far: how far it got, whatever the load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def is_stopped(pid: int) -> bool:
    """Has a SIGSTOP taken effect (state T), so that the process does nothing more until SIGCONT?"""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
