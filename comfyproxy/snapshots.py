"""Queue snapshots built and sent by a child process of the dispatcher.

A class-sized snapshot costs about 10 ms of CPU to read and render. Built on a thread of
the dispatcher, it shared the interpreter lock with hand-offs: a run's end could wait for
the build to finish before it was even seen, and snapshots had to be rationed to a third of
the process's time, which delayed the positions students see. A child process has an
interpreter of its own, and the other core when there is one.

The dispatcher writes one byte to the child's standard input after each committed change;
the child coalesces them (`SnapshotPublisher`) and sends the snapshots. It exits when its
input closes, which is also what happens when the dispatcher is killed, and it ignores
SIGINT and SIGTERM so that it keeps sending while the dispatcher shuts down gracefully.

    python -m comfyproxy.snapshots    # started by the dispatcher, not by hand
"""

import asyncio
import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
import time

from django.conf import settings

# Named, not __name__: run as a program, this module is "__main__".
logger = logging.getLogger("comfyproxy.snapshots")

# How much lower the child's CPU priority is than the dispatcher's.
NICENESS = 5
# The dispatcher's log level for the comfyproxy loggers, passed on to the child.
LOG_LEVEL_VARIABLE = "COMFYPROXY_SNAPSHOT_LOG_LEVEL"


class SnapshotPublisher:
    """Sends the live queue state after changes, coalesced.

    A snapshot of a full class takes about 10 ms of CPU (300 tasks), so: at most one send in
    flight, one more afterwards if anything changed meanwhile (a burst of 300 submissions
    costs a handful of sends, not 300), a short settle delay to gather a change's neighbours,
    and after each send a pause that leaves sends `share` of the time (at least
    `min_gap_seconds`).

    In the dispatcher's own process (as when tests run it on a thread) it shares the
    interpreter lock with hand-offs, so there it builds no snapshot while one is under way
    (`handoff_idle`, waited for up to MAX_DEFER_SECONDS) and takes at most a third of the
    time; the snapshot child (`SnapshotProcess`) runs one without the deferral and the gap.
    """

    SETTLE_SECONDS = 0.002
    MIN_GAP_SECONDS = 0.05
    MAX_DEFER_SECONDS = 0.1

    def __init__(
        self,
        handoff_idle: asyncio.Event | None = None,
        *,
        min_gap_seconds: float = MIN_GAP_SECONDS,
        share: float = 1 / 3,
        send=None,
    ):
        self._pending = False
        self._task: asyncio.Task | None = None
        self._next_allowed = -math.inf
        self._handoff_idle = handoff_idle
        self._min_gap_seconds = min_gap_seconds
        # What a send does (async, no arguments); by default, build and broadcast a snapshot.
        self._send = send
        self._share = share

    def request(self) -> None:
        self._pending = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._send_while_pending(), name="queue snapshot")

    async def _send_while_pending(self) -> None:
        # Not at the top: this module is also a program, run before Django is set up.
        from comfyproxy.services import broadcast

        while self._pending:
            await asyncio.sleep(max(self.SETTLE_SECONDS, self._next_allowed - time.monotonic()))
            if self._handoff_idle is not None and not self._handoff_idle.is_set():
                # A claim or POST /prompt would wait for the interpreter lock behind the build.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._handoff_idle.wait(), self.MAX_DEFER_SECONDS)
            self._pending = False
            began = time.monotonic()
            try:
                await (self._send or broadcast.broadcast_queue_snapshot)()
            except Exception as error:  # live state is best effort; the database is the truth
                logger.warning("event=broadcast_failed error=%r", error)
            ended = time.monotonic()
            self._next_allowed = ended + max(self._min_gap_seconds, self.pause_after(ended - began))
            logger.debug("event=broadcast took=%.3fs", ended - began)

    def pause_after(self, took: float) -> float:
        """How long to wait after a send that took `took`, so sends take `share` of the time."""
        return took * (1 - self._share) / self._share

    async def aclose(self) -> None:
        """Stop; a snapshot being sent is finished, one only requested is not."""
        if self._task is not None:
            self._pending = False
            await asyncio.gather(self._task, return_exceptions=True)

    async def drain(self) -> None:
        """Wait until every requested snapshot has been sent."""
        while self._task is not None and not self._task.done():
            await asyncio.gather(self._task, return_exceptions=True)


class SnapshotProcess:
    """The dispatcher's side: the child process, asked for a snapshot after each change."""

    # A child that died is started again on the next change, but not more often than this.
    RESTART_SECONDS = 2.0

    def __init__(self):
        self._process: subprocess.Popen | None = None
        self._next_start = 0.0

    def request(self) -> None:
        """Ask for a snapshot of the queue as it is from now on (call after the change commits)."""
        if self._process is None or self._process.poll() is not None:
            self._start()
            return  # a child sends a snapshot as soon as it starts
        try:
            os.write(self._process.stdin.fileno(), b".")
        except BlockingIOError:
            pass  # the pipe is full of requests the child has not read: it will send anyway
        except OSError:
            self._start()

    def _start(self) -> None:
        now = time.monotonic()
        if now < self._next_start:
            return
        self._next_start = now + self.RESTART_SECONDS
        if self._process is not None:
            logger.warning("event=snapshot_process_restarted returncode=%s", self._process.poll())
            self._process.stdin.close()
        # It logs as verbosely as the dispatcher (`comfy_dispatcher -v`).
        level = logging.getLogger("comfyproxy").getEffectiveLevel()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "comfyproxy.snapshots"],
            stdin=subprocess.PIPE,
            cwd=settings.BASE_DIR,
            env={**os.environ, LOG_LEVEL_VARIABLE: str(level)},
        )
        os.set_blocking(self._process.stdin.fileno(), False)

    async def aclose(self) -> None:
        """Let the child send what it was asked for, then stop it."""
        process, self._process = self._process, None
        if process is None:
            return
        process.stdin.close()
        try:
            await asyncio.to_thread(process.wait, timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)


async def serve(requests_fd: int) -> None:
    """Send a snapshot after each request read from `requests_fd`, until it closes."""
    # No hand-off to keep out of the way here: no minimum gap, so a run's end is shown at
    # once, and up to half of this process's time (a third left positions waiting after a
    # class's burst: bench/README.md).
    publisher = SnapshotPublisher(min_gap_seconds=0.0, share=1 / 2)
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()

    def read_requests() -> None:
        try:
            requests = os.read(requests_fd, 65536)
        except BlockingIOError:
            return
        if not requests:
            loop.remove_reader(requests_fd)
            closed.set()
            return
        publisher.request()

    os.set_blocking(requests_fd, False)
    loop.add_reader(requests_fd, read_requests)
    publisher.request()  # the state as it is now: requests made before this process began
    await publisher.drain()
    logger.info("event=snapshot_process_ready pid=%d", os.getpid())
    await closed.wait()
    await publisher.drain()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Under a burst of submissions the web server and the hand-offs come first; when the CPU
    # is free, as between a class's submissions, snapshots still go out at once.
    os.nice(NICENESS)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "teaching.settings")
    import django

    django.setup()
    if LOG_LEVEL_VARIABLE in os.environ:
        logging.getLogger("comfyproxy").setLevel(int(os.environ[LOG_LEVEL_VARIABLE]))
    asyncio.run(serve(sys.stdin.fileno()))


if __name__ == "__main__":
    main()
