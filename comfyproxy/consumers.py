"""The queue WebSocket: each student sees their own tasks live; teachers see the whole queue.

A consumer only relays: it joins its viewer's group, sends the current state read from the
database as soon as it connects, then forwards the dispatcher's broadcasts (see
`services.broadcast`), which one task per process hands to all its sockets
(`channel_layer.GroupFanout`). It never changes the queue and ignores whatever a client sends.

Two doors lead to it: the teaching site's, authenticated by the session (the practice page,
the admin board), and one per ComfyUI instance on the ComfyUI origin, authenticated by that
instance's `comfy_access` cookie (the script injected into ComfyUI's page).
"""

import asyncio

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer

from comfyproxy import errors, gateway
from comfyproxy.channel_layer import GroupFanout, group_fanout, start_eagerly
from comfyproxy.services.broadcast import Viewer, read_viewer_state, render_frame
from comfyproxy.services.queue import authorize, resolve_owner

# Why a socket is refused (4000-4999 are the application's own). Refused before the
# handshake completes, so over a real server the browser sees an HTTP 403.
NOT_AUTHENTICATED = 4401


class QueueConsumer(AsyncWebsocketConsumer):
    """`/ws/comfy_proxy/queue/` on the teaching site, authenticated by the Django session."""

    # No channel of its own: broadcasts reach it through its process's fan-out of its
    # viewer's group (`channel_layer.GroupFanout`), which calls `deliver` for each.
    channel_layer_alias = None
    viewer: Viewer | None = None
    # When the state last sent was read; an older broadcast arriving late is dropped.
    as_of = 0.0
    fanout: GroupFanout | None = None
    # Frames go out only once the handshake is answered.
    accepted = False
    # The send still waiting for the client to read (None when the socket has room)...
    _sending: asyncio.Task | None = None
    # ...and the newest frame to send after it: frames carry absolute state, so it
    # replaces any older one still unsent.
    _next_frame: str | None = None

    async def connect(self):
        self.viewer = await self.identify_viewer()
        if self.viewer is None:
            await self.close(code=NOT_AUTHENTICATED)
            return
        self.fanout = group_fanout(get_channel_layer(), self.viewer.group)
        await self.fanout.join(self)
        try:
            await self.accept()
            self.accepted = True
            # Joined before reading, so no change can fall between this state and the next broadcast.
            self.deliver(await database_sync_to_async(read_viewer_state)(self.viewer))
        except BaseException:
            # A consumer that fails here is never told of a disconnect.
            self.fanout.leave(self)
            raise

    async def identify_viewer(self) -> Viewer | None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            return None
        return Viewer(user.pk, whole_queue=user.is_staff)

    async def disconnect(self, code):
        if self.fanout is not None:
            self.fanout.leave(self)
        if self._sending is not None:
            self._sending.cancel()

    async def receive(self, text_data=None, bytes_data=None):
        """The stream is one-way."""

    def deliver(self, event: dict) -> None:
        """Send this viewer's frame of a queue state (a broadcast, or the state on connect).

        Called by the fan-out's task for every socket in turn, so it never waits: the frame
        is written at once if the socket has room, else it waits on a task of its own.
        """
        if not self.accepted or event["as_of"] < self.as_of:
            return
        self.as_of = event["as_of"]
        frame = render_frame(event, self.viewer)
        if self._sending is not None and not self._sending.done():
            self._next_frame = frame
            return
        self._sending = start_eagerly(self._send_frames(frame))

    async def _send_frames(self, frame: str) -> None:
        try:
            while frame is not None:
                await self.send(text_data=frame)
                frame, self._next_frame = self._next_frame, None
        except OSError:
            # The client is gone (uvicorn's ClientDisconnected is an OSError); its own
            # task is being told so and will leave the fan-out.
            self._next_frame = None


class InstanceQueueConsumer(QueueConsumer):
    """`/comfyui/<user>/<port>/queue-ws/` on the ComfyUI origin: that instance owner's tasks.

    Student JavaScript runs on that origin, so the session (whose cookie browsers send to
    every port of a host) never counts here: only `comfy_access` for exactly this instance,
    whose owner, or a teacher, is still logged in to the teaching site.
    """

    async def identify_viewer(self) -> Viewer | None:
        route = self.scope["url_route"]["kwargs"]
        access = self.scope.get("cookies", {}).get(gateway.ACCESS_COOKIE, "")
        return await database_sync_to_async(instance_viewer)(access, route["username"], route["port"])


def instance_viewer(access: str, username: str, port_text: str) -> Viewer | None:
    """Whose tasks a ComfyUI page may watch: the instance owner's, if `access` admits to it.

    The instance need not be running any more: a student whose ComfyUI stopped still sees
    why their task ended.
    """
    try:
        grant = gateway.grant_for_path(access, username, port_text)
        gateway.check_port(port_text)
        owner = resolve_owner(grant.username)
        authorize(gateway.session_user(grant), owner)
    except errors.QueueError:
        return None
    return Viewer(owner.pk)
