"""The queue WebSocket: each student sees their own tasks live; teachers see the whole queue."""

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from comfyproxy.services.broadcast import QUEUE_GROUP, build_queue_snapshot, snapshot_for_user


class QueueConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        self.user_id = user.pk
        self.is_staff = user.is_staff
        await self.channel_layer.group_add(QUEUE_GROUP, self.channel_name)
        await self.accept()
        snapshot = await database_sync_to_async(build_queue_snapshot)()
        await self.send_json(snapshot_for_user(snapshot, self.user_id, is_staff=self.is_staff))

    async def disconnect(self, code):
        if hasattr(self, "user_id"):
            await self.channel_layer.group_discard(QUEUE_GROUP, self.channel_name)

    async def queue_snapshot(self, event):
        await self.send_json(snapshot_for_user(event["snapshot"], self.user_id, is_staff=self.is_staff))
