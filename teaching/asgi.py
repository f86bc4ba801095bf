"""ASGI entry point: HTTP through Django, WebSockets through Channels."""

import os
from importlib import import_module

import django
from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIHandler

from teaching.request_threads import RequestThreads

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "teaching.settings")
# Set up Django (apps, settings) before anything imports models.
django.setup(set_prefix=False)


class SyncMiddlewareASGIHandler(ASGIHandler):
    """Django's ASGI handler, running the middleware chain and the view as one synchronous call.

    Requests run on threads kept between requests (teaching/request_threads.py).

    Every view and middleware here is synchronous. Django's own handler adapts each
    middleware to async, hopping to the sync thread and back around each of them (18 hops
    a request, about 2 ms of CPU, a fifth of a submission); one hop for the whole chain
    does the same work in the same thread.
    """

    def __init__(self):
        super().__init__()
        # More than the requests one process can move forward at once: one core runs its
        # Python, and SQLite takes one writer at a time (PostgreSQL's pool holds 10).
        self.request_threads = RequestThreads(size=16)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        async with self.request_threads.context():
            await self.handle(scope, receive, send)

    def load_middleware(self, is_async=False):
        super().load_middleware(is_async=False)

    async def get_response_async(self, request):
        return await sync_to_async(self.get_response, thread_sensitive=True)(request)


django_asgi_app = SyncMiddlewareASGIHandler()

from channels.auth import get_user  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from channels.sessions import CookieMiddleware  # noqa: E402
from django.conf import settings  # noqa: E402

from comfyproxy.middleware import WebSocketOutageGuard  # noqa: E402
from comfyproxy.routing import websocket_urlpatterns  # noqa: E402


class SessionUserMiddleware:
    """`scope["session"]` and `scope["user"]` from the session cookie, read at the handshake.

    What Channels' AuthMiddlewareStack provides, minus its session middleware's wrapper
    around every message sent, which saves a session the socket modified: queue sockets
    never modify it, and the wrapper cost a tenth of a broadcast's CPU at 300 sockets.
    """

    def __init__(self, app):
        self.app = app
        self.session_store = import_module(settings.SESSION_ENGINE).SessionStore

    async def __call__(self, scope, receive, send):
        session = self.session_store(scope["cookies"].get(settings.SESSION_COOKIE_NAME))
        scope = dict(scope, session=session)
        scope["user"] = await get_user(scope)
        return await self.app(scope, receive, send)


application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": WebSocketOutageGuard(
            AllowedHostsOriginValidator(
                CookieMiddleware(SessionUserMiddleware(URLRouter(websocket_urlpatterns)))
            )
        ),
    }
)
