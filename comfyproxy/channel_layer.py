"""The channel layer: channels_redis's pub/sub layer, decoding each message once per process.

A queue broadcast carries the whole class's state, and channels_redis has every consumer
decode its own copy of a group message: with 300 sockets in one process that was 300
decodes of the same ~140 kB per change, most of the delivery time measured by
bench/ws_bench.py. The layer's one subscription hands every receiver the same bytes
object, so remembering the last one decoded makes the fan-out decode once.

Receivers therefore share the decoded message and must only read it (as consumers do).
"""

from channels_redis.pubsub import RedisPubSubChannelLayer


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
