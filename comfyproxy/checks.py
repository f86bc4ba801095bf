"""System checks for channel-layer settings that would only fail in front of a class."""

from channels.layers import InMemoryChannelLayer
from channels_redis.core import RedisChannelLayer
from channels_redis.pubsub import RedisPubSubChannelLayer
from django.conf import settings
from django.core.checks import Error, register
from django.utils.module_loading import import_string


@register()
def check_channel_layer(app_configs, **kwargs):
    layer = getattr(settings, "CHANNEL_LAYERS", {}).get("default")
    if layer is None:
        return [
            Error(
                "No default channel layer is configured.",
                hint="Configure CHANNEL_LAYERS['default'] with channels_redis; queue positions use it.",
                id="comfyproxy.E001",
            )
        ]
    try:
        backend = import_string(layer.get("BACKEND", ""))
    except ImportError as exc:
        return [Error(f"The channel layer backend cannot be imported: {exc}", id="comfyproxy.E004")]
    if issubclass(backend, InMemoryChannelLayer):
        return [
            Error(
                "The in-memory channel layer cannot carry queue updates.",
                hint=(
                    "The dispatcher (manage.py comfy_dispatcher) runs in its own process and the in-memory "
                    "layer only reaches sockets of the process that sends, so no student would see their "
                    "position change. Use channels_redis.pubsub.RedisPubSubChannelLayer with REDIS_URL."
                ),
                id="comfyproxy.E002",
            )
        ]
    if issubclass(backend, RedisChannelLayer | RedisPubSubChannelLayer):
        return [
            Error(
                f"Channel layer host #{number} keeps redis-py's 5 second read timeout.",
                hint=(
                    'Give each host as {"address": ..., "socket_timeout": None, "max_connections": <large>}: '
                    "with redis-py 8 an idle socket's wait for Redis times out after 5 s and the student's "
                    "WebSocket is closed."
                ),
                id="comfyproxy.E003",
            )
            for number, host in enumerate(layer.get("CONFIG", {}).get("hosts", []), start=1)
            if not (isinstance(host, dict) and "socket_timeout" in host and host["socket_timeout"] is None)
        ]
    return []
