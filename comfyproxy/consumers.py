"""The queue WebSocket: each student sees their own tasks live; teachers see the whole queue.

A consumer only relays: it joins its viewer's group, sends the current state read from the
database as soon as it connects, then forwards the dispatcher's broadcasts (see
`services.broadcast`). It never changes the queue and ignores whatever a client sends.

Two doors lead to it: the teaching site's, authenticated by the session (the practice page,
the admin board), and one per ComfyUI instance on the ComfyUI origin, authenticated by that
instance's `comfy_access` cookie (the script injected into ComfyUI's page).
"""

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from comfyproxy import errors, gateway
from comfyproxy.services.broadcast import SNAPSHOT_EVENT, Viewer, read_viewer_state, render_frame
from comfyproxy.services.queue import authorize, resolve_owner

# Why a socket is refused (4000-4999 are the application's own). Refused before the
# handshake completes, so over a real server the browser sees an HTTP 403.
NOT_AUTHENTICATED = 4401


class QueueConsumer(AsyncWebsocketConsumer):
    """`/ws/comfy_proxy/queue/` on the teaching site, authenticated by the Django session."""

    viewer: Viewer | None = None
    # When the state last sent was read; an older broadcast arriving late is dropped.
    as_of = 0.0

    async def connect(self):
        self.viewer = await self.identify_viewer()
        if self.viewer is None:
            await self.close(code=NOT_AUTHENTICATED)
            return
        await self.channel_layer.group_add(self.viewer.group, self.channel_name)
        await self.accept()
        # Joined before reading, so no change can fall between this state and the next broadcast.
        await self.queue_snapshot(await database_sync_to_async(read_viewer_state)(self.viewer))

    async def identify_viewer(self) -> Viewer | None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            return None
        return Viewer(user.pk, whole_queue=user.is_staff)

    async def disconnect(self, code):
        if self.viewer is not None:
            await self.channel_layer.group_discard(self.viewer.group, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None):
        """The stream is one-way."""

    async def dispatch(self, message):
        if message["type"] == SNAPSHOT_EVENT:
            # Broadcasts touch no database: skip the close_old_connections thread hop that
            # Channels puts before every handler (a third of the cost of each delivery).
            await self.queue_snapshot(message)
        else:
            await super().dispatch(message)

    async def queue_snapshot(self, event):
        if event["as_of"] < self.as_of:
            return
        self.as_of = event["as_of"]
        await self.send(text_data=render_frame(event, self.viewer))


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
