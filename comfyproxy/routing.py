"""WebSocket routes. Each door accepts pages from its own origin only.

asgi.py's AllowedHostsOriginValidator compares host names but not ports, and the teaching
site and ComfyUI's origin may share a host name: without this, student JavaScript on a
ComfyUI page could open the teaching site's socket with a teacher's session cookie.
"""

from channels.security.websocket import OriginValidator
from django.conf import settings
from django.urls import path, re_path

from comfyproxy import consumers


async def refuse_unknown_socket(scope, receive, send):
    """Any other address: refused at the handshake (403). URLRouter raises for a path no
    route matches, which the server answers with 500."""
    await receive()  # websocket.connect
    await send({"type": "websocket.close"})


websocket_urlpatterns = [
    path(
        "ws/comfy_proxy/queue/",
        OriginValidator(consumers.QueueConsumer.as_asgi(), [settings.SITE_ORIGIN]),
    ),
    # nginx routes it from the ComfyUI origin; the injected script connects to it.
    re_path(
        r"^comfyui/(?P<username>[^/]+)/(?P<port>[0-9]{1,5})/queue-ws/$",
        OriginValidator(consumers.InstanceQueueConsumer.as_asgi(), [settings.COMFY_PUBLIC_ORIGIN]),
    ),
    re_path(r"", refuse_unknown_socket),
]
