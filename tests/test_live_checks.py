"""The system check that guards the channel layer queue positions are pushed through."""

import pytest
from django.core import checks

REDIS_HOST = {"address": "redis://127.0.0.1:6379/0", "socket_timeout": None, "max_connections": 10_000}


def channel_layer_errors() -> list[str]:
    return [message.id for message in checks.run_checks() if message.id.startswith("comfyproxy.E00")]


def test_the_configured_layer_passes():
    assert channel_layer_errors() == []


def test_in_memory_layer_is_refused(settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    assert channel_layer_errors() == ["comfyproxy.E002"]


def test_unimportable_layer_is_refused(settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.nowhere.Layer"}}
    assert channel_layer_errors() == ["comfyproxy.E004"]


def test_missing_layer_is_refused(settings):
    settings.CHANNEL_LAYERS = {}
    assert channel_layer_errors() == ["comfyproxy.E001"]


@pytest.mark.parametrize(
    "hosts",
    [
        ["redis://127.0.0.1:6379/0"],
        [("127.0.0.1", 6379)],
        [{"address": "redis://127.0.0.1:6379/0"}],
        [{"address": "redis://127.0.0.1:6379/0", "socket_timeout": 5}],
    ],
)
@pytest.mark.parametrize(
    "backend",
    [
        "channels_redis.core.RedisChannelLayer",
        "channels_redis.pubsub.RedisPubSubChannelLayer",
        "comfyproxy.channel_layer.SharedDecodePubSubChannelLayer",
    ],
)
def test_redis_layer_that_keeps_the_five_second_read_timeout_is_refused(settings, backend, hosts):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": backend, "CONFIG": {"hosts": [REDIS_HOST, *hosts]}}}
    assert channel_layer_errors() == ["comfyproxy.E003"]
