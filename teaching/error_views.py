"""What Django answers when no view does (unknown URL, refused request, crash).

API clients get the documented `{code, message, details}` JSON; people get a short page in
their language. Neither touches the database, so they still work while it is unreachable.
"""

from django.http import JsonResponse
from django.shortcuts import render
from django.utils.translation import gettext as _

from comfyproxy.api.errors import api_error_body

# Paths whose callers are programs (the API, and the endpoints of the ComfyUI page's scripts).
_JSON_PREFIXES = ("/api/", "/comfyui/", "/metrics", "/healthz", "/_gate/")


def _wants_json(request) -> bool:
    if request.path.startswith(_JSON_PREFIXES):
        return True
    accept = request.headers.get("Accept", "")
    return "application/json" in accept and "text/html" not in accept


def _error(request, *, status: int, code: str, title: str, message: str):
    if _wants_json(request):
        return JsonResponse(
            api_error_body(code, message), status=status, json_dumps_params={"ensure_ascii": False}
        )
    return render(
        request, "error.html", {"title": title, "message": message, "status": status}, status=status
    )


def bad_request(request, exception=None):
    return _error(
        request,
        status=400,
        code="bad_request",
        title=_("Bad request"),
        message=_("The request could not be understood."),
    )


def permission_denied(request, exception=None):
    return _error(
        request,
        status=403,
        code="forbidden",
        title=_("Access denied"),
        message=_("You do not have permission to open this page."),
    )


def page_not_found(request, exception=None):
    return _error(
        request,
        status=404,
        code="not_found",
        title=_("Page not found"),
        message=_("There is nothing at this address."),
    )


def server_error(request):
    return _error(
        request,
        status=500,
        code="server_error",
        title=_("Something went wrong"),
        message=_("The teaching system hit an error. It has been logged; please try again."),
    )
