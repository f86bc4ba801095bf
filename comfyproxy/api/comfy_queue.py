"""The queue as the script injected into a student's ComfyUI sees it, on the ComfyUI origin.

Twins of /api/v1/comfy_proxy/status and cancel for `/comfyui/<user>/<port>/queue-status/`
and `.../queue-cancel/<task_id>/`, which nginx routes here from the ComfyUI origin. The
teaching session never counts on that origin (student JavaScript runs there): the user is
the one the instance's `comfy_access` cookie names (ComfyAccessMiddleware), and only that
instance owner's tasks are shown or cancelled.
"""

from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from comfyproxy import errors, gateway
from comfyproxy.api.errors import api_error_body
from comfyproxy.services import queue
from comfyproxy.services.broadcast import Viewer, read_viewer_state, render_frame


def _refusal(error: errors.QueueError) -> JsonResponse:
    response = JsonResponse(
        api_error_body(error.code, error.message, str(error.details)),
        status=error.status_code,
        json_dumps_params={"ensure_ascii": False},
    )
    response["Cache-Control"] = "no-store"
    return response


def _instance_owner(request, username: str):
    """The owner of the instance in the path, if the request's `comfy_access` admits to it."""
    if not request.user.is_authenticated:
        raise errors.NotAuthenticated()
    owner = queue.resolve_owner(username)
    queue.authorize(request.user, owner)
    return owner


@require_GET
def queue_status(request, username: str, port: int):
    """The instance owner's tasks and the queue, exactly as the queue socket sends them."""
    try:
        owner = _instance_owner(request, username)
    except errors.QueueError as error:
        return _refusal(error)
    viewer = Viewer(owner.pk)
    response = HttpResponse(
        render_frame(read_viewer_state(viewer), viewer), content_type="application/json; charset=utf-8"
    )
    response["Cache-Control"] = "no-store"
    return response


@csrf_exempt  # no CSRF token on the ComfyUI origin: the Origin check below stands in for it
@require_POST
def queue_cancel(request, username: str, port: int, task_id: str):
    """Leave the queue (or stop a running task), for the instance owner's own tasks only."""
    try:
        gateway.check_origin(unsafe=True, origin=request.headers.get("Origin", ""))
        owner = _instance_owner(request, username)
        task = queue.get_task_for(request.user, task_id)
        if task.owner_id != owner.pk:
            raise errors.TaskNotFound()
        task = queue.cancel_task(actor=request.user, task=task)
    except errors.QueueError as error:
        return _refusal(error)
    return JsonResponse(queue.describe_task(task), json_dumps_params={"ensure_ascii": False})
