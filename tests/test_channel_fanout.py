"""The per-process fan-out keeps delivering after its layer fails a receive."""

import asyncio

from comfyproxy import channel_layer
from comfyproxy.channel_layer import GroupFanout


class FlakyLayer:
    """Fails the first receive (as a dropped Redis connection would), then hands out messages."""

    def __init__(self):
        self.messages: asyncio.Queue = asyncio.Queue()
        self.failed = False

    async def new_channel(self):
        return "fanout!1"

    async def group_add(self, group, channel):
        pass

    async def group_send(self, group, message):
        pass

    async def receive(self, channel):
        if not self.failed:
            self.failed = True
            raise ConnectionError("connection reset by peer")
        return await self.messages.get()


class Member:
    def __init__(self):
        self.received: asyncio.Queue = asyncio.Queue()

    def deliver(self, message):
        self.received.put_nowait(message)


async def test_a_failed_receive_does_not_stop_the_updates(monkeypatch):
    monkeypatch.setattr(channel_layer, "RECEIVE_RETRY_SECONDS", 0)
    layer = FlakyLayer()
    fanout = GroupFanout(layer, "queue")
    member = Member()
    await fanout.join(member)

    snapshot = {"type": "queue.snapshot", "as_of": 1.0}
    await layer.messages.put(snapshot)

    assert await asyncio.wait_for(member.received.get(), timeout=5) == snapshot
    assert layer.failed
    fanout._pump.cancel()
