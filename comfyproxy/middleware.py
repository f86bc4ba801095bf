"""Turn an unreachable Redis or database into a clear 503, never a 500."""

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
