"""The ComfyUI origin's doors: nginx's auth gate, the entry from the practice page, refusal pages.

nginx (see nginx/README.md) sends every request for `/comfyui/<user>/<port>/...` on the
ComfyUI origin to `comfy_gate` first and shows `comfy_refused` when it says no or when the
instance does not answer. The access rules themselves live in `comfyproxy.gateway`.
"""

from urllib.parse import unquote

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.clickjacking import xframe_options_exempt
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET

from comfyproxy import errors, gateway
from comfyproxy.api.errors import comfy_error_response
from comfyproxy.models import ComfyInstance
from comfyproxy.services.queue import authorize, resolve_owner

# Headers nginx fills in for the gate (never from the client: nginx sets each one).
GATE_ACCESS_HEADER = "X-Comfy-Access"
GATE_USER_HEADER = "X-Comfy-User"
GATE_PORT_HEADER = "X-Comfy-Port"
GATE_UNSAFE_HEADER = "X-Comfy-Unsafe"
GATE_ORIGIN_HEADER = "X-Comfy-Origin"
# The gate's answer: why it refused, for nginx to pass on to `comfy_refused`.
REFUSAL_HEADER = "X-Comfy-Refusal"

STOPPED_CODES = {errors.InstanceNotRunning.code, gateway.InstanceUnreachable.code}


async def comfy_gate(request):
    """nginx's auth_request: 200 lets the request through to ComfyUI, 401/403 refuse it.

    nginx caches the answer a few seconds per cookie, instance and origin, so a page load's
    ~500 requests cost one decision; the checks that need no database come first.
    """
    headers = request.headers
    try:
        grant = gateway.grant_for_path(
            headers.get(GATE_ACCESS_HEADER, ""),
            unquote(headers.get(GATE_USER_HEADER, "")),
            headers.get(GATE_PORT_HEADER, ""),
        )
        gateway.check_origin(
            unsafe=bool(headers.get(GATE_UNSAFE_HEADER)), origin=headers.get(GATE_ORIGIN_HEADER, "")
        )
        port = gateway.check_port(headers.get(GATE_PORT_HEADER, ""))
        await sync_to_async(gateway.check_instance_access)(grant, port)
    except errors.QueueError as refusal:
        # auth_request passes only 401 and 403 on (anything else becomes a 500).
        response = HttpResponse(status=401 if refusal.status_code == 401 else 403)
        response[REFUSAL_HEADER] = refusal.code
        return response
    return HttpResponse(status=200)


def refusal_page(request, error: errors.QueueError):
    """A page for people (in the practice page's iframe), ComfyUI's error shape for its frontend."""
    if "text/html" not in request.headers.get("Accept", ""):
        response = comfy_error_response(error)
    else:
        template = (
            "comfyproxy/instance_stopped.html"
            if error.code in STOPPED_CODES
            else "comfyproxy/gate_refused.html"
        )
        context = {
            "error": error,
            "practice_url": settings.SITE_ORIGIN.rstrip("/") + reverse("practice"),
        }
        response = render(request, template, context, status=error.status_code)
    response["Cache-Control"] = "no-store"
    # Shown inside the practice page's iframe, and only there.
    response["Content-Security-Policy"] = f"frame-ancestors 'self' {settings.SITE_ORIGIN.rstrip('/')}"
    return response


@csrf_exempt
@xframe_options_exempt
def comfy_refused(request):
    """What nginx shows instead of ComfyUI when the gate refused or the instance did not answer."""
    refusal = gateway.REFUSALS.get(request.headers.get(REFUSAL_HEADER, ""), gateway.PortOutOfRange)
    return refusal_page(request, refusal())


@require_GET
@xframe_options_exempt
def comfy_enter(request):
    """The ComfyUI origin's entry: redeem the practice page's ticket, set `comfy_access`, go in."""
    try:
        grant = gateway.redeem_ticket(request.GET.get("ticket", ""))
    except errors.QueueError as error:
        return refusal_page(request, error)
    response = HttpResponseRedirect(gateway.instance_path(grant.username, grant.port))
    gateway.grant_access(response, grant)
    return response


@require_GET
@login_required
def comfy_open(request, username: str, port: int):
    """`/comfyui/<user>/<port>/` asked of the teaching origin: continue on the ComfyUI origin."""
    try:
        owner = resolve_owner(username)
        authorize(request.user, owner)
        instance = (
            ComfyInstance.objects.running().select_related("user").filter(user=owner, port=port).first()
        )
        if instance is None:
            raise errors.InstanceNotRunning()
        url = gateway.comfy_entry_url(request.user, instance, request.session.session_key)
    except errors.QueueError as error:
        return refusal_page(request, error)
    return HttpResponseRedirect(url)
