"""The channel layer: channels_redis's pub/sub layer, decoding each message once per process.

A queue broadcast carries the whole class's state, and channels_redis has every consumer
decode its own copy of a group message: with 300 sockets in one process that was 300
decodes of the same ~140 kB per change, most of the delivery time measured by
bench/ws_bench.py. The layer's one subscription hands every receiver the same bytes
object, so remembering the last one decoded makes the fan-out decode once.

Receivers therefore share the decoded message and must only read it (as consumers do).

`GroupFanout` then hands each message to all of a process's sockets from one task.
"""

import asyncio
import logging
import weakref

from channels_redis.pubsub import RedisPubSubChannelLayer

logger = logging.getLogger(__name__)


class SharedDecodePubSubChannelLayer(RedisPubSubChannelLayer):
    # (raw bytes, decoded message) as one tuple, so a reader never pairs one with the other's.
    _last_decoded: tuple[bytes, dict] | None = None

    def deserialize(self, message: bytes) -> dict:
        last = self._last_decoded
        if last is not None and last[0] is message:
            return last[1]
        decoded = super().deserialize(message)
        self._last_decoded = (message, decoded)
        return decoded


# After a failed receive, the fan-out tries again this soon (the layer reconnects meanwhile).
RECEIVE_RETRY_SECONDS = 0.5


class GroupFanout:
    """Every socket of this process in one group, fed by a single subscription.

    Channels gives each consumer a channel of its own and a task that waits on it: a group
    message then wakes 300 tasks (a queue get, a new receive task, an `asyncio.wait`) before
    anything is written, which was most of the CPU of a broadcast under bench/ws_bench.py.
    Here one task per process and group receives the message and hands it to each member's
    `deliver(message)` in turn, in the order they joined.

    `deliver` runs on this task and must not wait (see `start_eagerly`): a socket whose
    client stopped reading must never hold up the others.
    """

    def __init__(self, layer, group: str):
        self.layer = layer
        self.group = group
        # A dict, not a set: members are served in the order they joined.
        self.members: dict = {}
        self._channel: str | None = None
        self._pump: asyncio.Task | None = None
        self._starting = asyncio.Lock()

    async def join(self, member) -> None:
        """Start delivering this group's messages to `member` (subscribed once this returns)."""
        async with self._starting:
            if self._pump is None or self._pump.done():
                self._channel = await self.layer.new_channel()
                self._pump = asyncio.ensure_future(self._run(self._channel))
        # Every join renews the membership: layers other than pub/sub expire groups.
        await self.layer.group_add(self.group, self._channel)
        # And reaches Redis once, as subscribing a channel per socket used to: while Redis is
        # away a new socket is refused (503) rather than opened to wait for updates in vain.
        await self.layer.group_send(f"{self.group}.joining", {"type": "fanout.join"})
        self.members[member] = None

    def leave(self, member) -> None:
        self.members.pop(member, None)

    async def _run(self, channel: str) -> None:
        while True:
            try:
                message = await self.layer.receive(channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The layer reconnects by itself; this task must outlive any one failure, or
                # every socket of the process would stop getting updates without a sign.
                logger.exception("could not receive %s messages; retrying", self.group)
                await asyncio.sleep(RECEIVE_RETRY_SECONDS)
                continue
            for member in list(self.members):
                try:
                    member.deliver(message)
                except Exception:
                    # One socket's failure must not cost the others their update.
                    logger.exception("could not deliver a %s message", self.group)


# Per event loop (the layer keeps its Redis connections per loop), then per (layer, group).
_fanouts: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict]" = weakref.WeakKeyDictionary()


def group_fanout(layer, group: str) -> GroupFanout:
    """This event loop's fan-out of `group` on `layer`."""
    by_group = _fanouts.setdefault(asyncio.get_running_loop(), {})
    fanout = by_group.get((layer, group))
    if fanout is None:
        fanout = by_group[(layer, group)] = GroupFanout(layer, group)
    return fanout


def start_eagerly(coroutine) -> asyncio.Task | None:
    """Run `coroutine` now, on the caller's task, up to its first suspension.

    Returns None if it finished without suspending (a WebSocket send into a socket whose
    buffer has room: the usual case, with no task created), else the task that finishes it.
    Its exception, if it raises before suspending, propagates to the caller.
    """
    try:
        waiting_on = coroutine.send(None)
    except StopIteration:
        return None
    task = asyncio.ensure_future(_resumed(coroutine, waiting_on))
    # A task cancelled before its first step never resumes the coroutine: close it then,
    # so its cleanup runs (a no-op once it has finished).
    task.add_done_callback(lambda _task: coroutine.close())
    return task


async def _resumed(coroutine, waiting_on):
    return await _Resumption(coroutine, waiting_on)


class _Resumption:
    """Awaiting it drives a coroutine that was started by hand, from where it suspended."""

    def __init__(self, coroutine, waiting_on):
        self.coroutine = coroutine
        self.waiting_on = waiting_on

    def __await__(self):
        coroutine, waiting_on = self.coroutine, self.waiting_on
        while True:
            # Hand what it waits on (a future, or None for a bare yield) to the running task.
            try:
                value = yield waiting_on
            except BaseException as exception:  # cancellation included: pass it in
                step, argument = coroutine.throw, exception
            else:
                step, argument = coroutine.send, value
            try:
                waiting_on = step(argument)
            except StopIteration as stop:
                return stop.value
