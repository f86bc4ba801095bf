"""The WebSockets of one instance by sid, and ComfyUI's ordered event stream to them (`send_sync`)."""

import asyncio
import json
import logging

from aiohttp import ClientError, web

logger = logging.getLogger(__name__)


class SocketHub:
    def __init__(self):
        self.sockets: dict[str, web.WebSocketResponse] = {}
        # Events go out in the order they were produced, through one queue, as in ComfyUI.
        self._outbox: asyncio.Queue[tuple[str, dict, object]] = asyncio.Queue()
        self._publisher: asyncio.Task | None = None

    def start(self) -> None:
        self._publisher = asyncio.create_task(self._publish())

    def stop(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()

    def register(self, sid: str, socket: web.WebSocketResponse) -> None:
        """A socket with a sid already in use replaces the older one, which stays open but gets nothing."""
        self.sockets.pop(sid, None)
        self.sockets[sid] = socket

    def unregister(self, sid: str) -> None:
        # By sid, as ComfyUI does: closing a replaced socket also silences the one that replaced it.
        self.sockets.pop(sid, None)

    def send(self, event: str, data: dict, sid=None) -> None:
        """Queue an event: to the socket of `sid`, or to every socket when sid is None."""
        self._outbox.put_nowait((event, data, sid))

    async def send_now(self, socket: web.WebSocketResponse, event: str, data: dict) -> None:
        """Send straight to one socket, ahead of queued events (the greeting of a new connection)."""
        await _send(socket, json.dumps({"type": event, "data": data}))

    async def _publish(self) -> None:
        while True:
            event, data, sid = await self._outbox.get()
            message = json.dumps({"type": event, "data": data})
            if sid is None:
                targets = list(self.sockets.values())
            else:
                # A client_id that is not a string (any JSON is accepted) matches no socket.
                socket = self.sockets.get(sid) if isinstance(sid, str) else None
                targets = [socket] if socket is not None else []
            for socket in targets:
                await _send(socket, message)


async def _send(socket: web.WebSocketResponse, message: str) -> None:
    if socket.closed:
        return
    try:
        await socket.send_str(message)
    except (ClientError, ConnectionError) as error:
        logger.warning("send error: %s", error)
