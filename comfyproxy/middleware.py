"""Turn an unreachable Redis or database into a clear 503, never a 500."""

import json
import logging

from django.db import InterfaceError, OperationalError
from django.http import JsonResponse
from django.utils.translation import gettext as _
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

OUTAGES = (RedisError, OperationalError, InterfaceError)


class ServiceUnavailableMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, OUTAGES):
            return None
        logger.warning("service unavailable on %s: %s", request.path, exception)
        message = _("The queue service is temporarily unavailable. Please try again shortly.")
        if request.path.startswith("/comfyui/"):
            body = {
                "error": {
                    "type": "queue_unavailable",
                    "message": message,
                    "details": "",
                    "extra_info": {},
                },
                "node_errors": {},
            }
        else:
            body = {"code": "queue_unavailable", "message": message}
        response = JsonResponse(body, status=503, json_dumps_params={"ensure_ascii": False})
        response["Retry-After"] = "5"
        return response


class WebSocketOutageGuard:
    """ASGI: a WebSocket opened while Redis or the database is unreachable is refused with the
    same 503 as HTTP, not the server's bare 500 (Channels needs Redis before the handshake).

    Once a socket is accepted an outage is not refused here: the consumer stays open and
    picks up again when the service is back.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        answered = False

        async def send_noting_the_handshake(message):
            nonlocal answered
            answered = answered or message["type"] in {
                "websocket.accept",
                "websocket.close",
                "websocket.http.response.start",
            }
            await send(message)

        try:
            await self.app(scope, receive, send_noting_the_handshake)
        except OUTAGES as exception:
            if answered:
                raise
            logger.warning("service unavailable on WebSocket %s: %s", scope.get("path"), exception)
            await self._refuse(scope, send)

    @staticmethod
    async def _refuse(scope, send):
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1013})  # "try again later"
            return
        message = _("The queue service is temporarily unavailable. Please try again shortly.")
        body = json.dumps({"code": "queue_unavailable", "message": message}, ensure_ascii=False).encode()
        headers = [(b"content-type", b"application/json"), (b"retry-after", b"5")]
        await send({"type": "websocket.http.response.start", "status": 503, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
