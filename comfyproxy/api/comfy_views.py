"""The ComfyUI-compatible submit endpoint that nginx routes the real frontend's POST /prompt to.

It answers at once in ComfyUI's shape, with the prompt id the dispatcher will later submit
under, so the unmodified frontend tracks the run as if ComfyUI had queued it itself.
"""

from urllib.parse import urlsplit

from django.conf import settings
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from comfyproxy import errors
from comfyproxy.api.bodies import read_json_body
from comfyproxy.api.errors import comfy_error_response
from comfyproxy.services import queue


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""


def check_same_origin(request) -> None:
    """Refuse cross-site POSTs (the frontend has no CSRF token; browsers always send Origin)."""
    allowed = {settings.COMFY_PUBLIC_ORIGIN, settings.SITE_ORIGIN}
    origin = request.headers.get("Origin")
    if origin is not None:
        if origin not in allowed:
            raise errors.CrossSiteRequest()
        return
    referer = request.headers.get("Referer")
    if referer is not None and _origin_of(referer) not in allowed:
        raise errors.CrossSiteRequest()


@csrf_exempt
@require_POST
def submit_prompt(request, username: str, port: str):
    try:
        check_same_origin(request)
        if not request.user.is_authenticated:
            raise errors.NotAuthenticated()
        body = read_json_body(request)
        state = queue.submit_and_describe(actor=request.user, username=username, body=body, port=int(port))
    except errors.QueueError as error:
        return comfy_error_response(error)
    return JsonResponse(
        {
            "prompt_id": state["prompt_id"],
            "number": state["position"],
            "node_errors": {},
            "queue": {
                "status": state["status"],
                "position": state["position"],
                "estimated_wait_seconds": state["estimated_wait_seconds"],
                "max_concurrent": state["max_concurrent"],
                "processing_count": state["processing_count"],
                "message": state["message"],
            },
        },
        json_dumps_params={"ensure_ascii": False},
    )
