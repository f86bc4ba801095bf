"""A WebSocket to each ComfyUI instance that runs a task, to notice the moment a prompt ends.

Per-prompt events go only to the submitting browser's client id. What every socket
receives is the broadcast `status` frame, whose `queue_remaining` drops when a prompt
finishes, and, for prompts without a client id, `executing` and the `execution_*` events.
Those mean "read /history now". The socket uses a client id of the dispatcher's own:
ComfyUI keeps only the newest socket per client id, so borrowing the student's would
silence the student's page.
"""

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

logger = logging.getLogger(__name__)

ENDING_EVENTS = frozenset({"execution_success", "execution_error", "execution_interrupted"})
# Status frames are tiny; this only bounds what a misbehaving server can make us buffer.
MAX_FRAME_BYTES = 16 * 1024 * 1024


class FrameReader:
    """Decides which frames of one socket may mean that a prompt ended."""

    def __init__(self):
        self.queue_remaining: int | None = None

    def may_have_ended(self, frame: str) -> bool:
        try:
            message = json.loads(frame)
            kind, data = message["type"], message["data"]
        except (ValueError, TypeError, KeyError):
            return False
        if kind == "status":
            try:
                remaining = int(data["status"]["exec_info"]["queue_remaining"])
            except (TypeError, KeyError, ValueError):
                return True
            # It also rises when a prompt is queued: only a drop can be a prompt leaving.
            dropped = self.queue_remaining is None or remaining < self.queue_remaining
            self.queue_remaining = remaining
            return dropped
        if kind == "executing":
            return isinstance(data, dict) and data.get("node") is None
        return kind in ENDING_EVENTS


class InstanceWatchers:
    """One socket per instance, shared by whoever follows a prompt there.

    A socket stays open `linger_seconds` after its last follower leaves, since the same
    instance usually runs again soon (a student's next workflow) and reconnecting costs
    a handshake on every hand-off.
    """

    def __init__(
        self,
        client_id: str,
        *,
        open_timeout: float = 5.0,
        first_reconnect_delay: float = 0.1,
        max_reconnect_delay: float = 5.0,
        linger_seconds: float = 60.0,
    ):
        self.client_id = client_id
        self.open_timeout = open_timeout
        self.first_reconnect_delay = first_reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.linger_seconds = linger_seconds
        self._sockets: dict[str, asyncio.Task] = {}
        self._listeners: dict[str, set[asyncio.Event]] = {}
        self._closing: dict[str, asyncio.TimerHandle] = {}

    @contextlib.asynccontextmanager
    async def watch(self, base_url: str, activity: asyncio.Event) -> AsyncIterator[None]:
        """While inside, set `activity` whenever the instance reports something that may end a prompt.

        It is also set on (re)connecting, since frames may have been missed meanwhile,
        and on disconnecting, so the follower notices an instance that went away.
        """
        listeners = self._listeners.setdefault(base_url, set())
        listeners.add(activity)
        closing = self._closing.pop(base_url, None)
        if closing is not None:
            closing.cancel()
        if base_url not in self._sockets:
            self._sockets[base_url] = asyncio.create_task(
                self._keep_socket(base_url, listeners), name=f"watch {base_url}"
            )
        try:
            yield
        finally:
            listeners.discard(activity)
            if not listeners:
                self._closing[base_url] = asyncio.get_running_loop().call_later(
                    self.linger_seconds, self._close_unwatched, base_url
                )

    def _close_unwatched(self, base_url: str) -> None:
        self._closing.pop(base_url, None)
        if not self._listeners.get(base_url):
            self._listeners.pop(base_url, None)
            self._sockets.pop(base_url).cancel()

    async def aclose(self) -> None:
        for closing in self._closing.values():
            closing.cancel()
        tasks = list(self._sockets.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._closing.clear()
        self._sockets.clear()
        self._listeners.clear()

    async def _keep_socket(self, base_url: str, listeners: set[asyncio.Event]) -> None:
        def notify():
            for activity in listeners:
                activity.set()

        url = "ws" + base_url.removeprefix("http") + f"/ws?clientId={self.client_id}"
        delay = self.first_reconnect_delay
        while True:
            try:
                async with connect(
                    url,
                    open_timeout=self.open_timeout,
                    close_timeout=1,
                    proxy=None,
                    compression=None,
                    max_size=MAX_FRAME_BYTES,
                ) as socket:
                    delay = self.first_reconnect_delay
                    frames = FrameReader()
                    notify()
                    async for frame in socket:
                        if isinstance(frame, str) and frames.may_have_ended(frame):
                            notify()
            except (OSError, TimeoutError, WebSocketException) as error:
                logger.debug("socket to %s: %s", base_url, error)
            notify()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_reconnect_delay)
