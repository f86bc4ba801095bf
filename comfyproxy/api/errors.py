"""How refusals look on the wire: one stable code and a translated message, never a 500.

/api/v1 answers `{"code", "message", "details"}`; the ComfyUI-compatible submit endpoint
answers ComfyUI's own error shape so the unmodified frontend shows the message.
"""

import logging

from django.core.exceptions import RequestDataTooBig
from django.http import Http404, JsonResponse
from django.utils.translation import gettext as _
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response

from comfyproxy import errors

logger = logging.getLogger(__name__)

# DRF's own exceptions, renamed to the codes this API documents.
DRF_CODES = {
    drf_exceptions.ParseError: "malformed_json",
    drf_exceptions.NotAuthenticated: "not_authenticated",
    drf_exceptions.AuthenticationFailed: "not_authenticated",
    drf_exceptions.PermissionDenied: "forbidden",
    drf_exceptions.NotFound: "not_found",
    drf_exceptions.MethodNotAllowed: "method_not_allowed",
    drf_exceptions.UnsupportedMediaType: "unsupported_media_type",
    drf_exceptions.Throttled: "throttled",
    drf_exceptions.ValidationError: "invalid_request",
}


def comfy_error_body(error: errors.QueueError) -> dict:
    return {
        "error": {
            "type": error.code,
            "message": str(error.message),
            "details": str(error.details),
            "extra_info": error.extra,
        },
        "node_errors": {},
    }


def comfy_error_response(error: errors.QueueError) -> JsonResponse:
    return JsonResponse(
        comfy_error_body(error),
        status=error.status_code,
        json_dumps_params={"ensure_ascii": False},
    )


def api_error_body(code: str, message, details="") -> dict:
    return {"code": code, "message": str(message), "details": details}


def api_exception_handler(exc, context):
    if isinstance(exc, errors.QueueError):
        return Response(api_error_body(exc.code, exc.message, str(exc.details)), status=exc.status_code)
    if isinstance(exc, Http404):
        return Response(api_error_body("not_found", _("Not found.")), status=404)
    if isinstance(exc, RequestDataTooBig):
        # DRF reads the body of any POST to parse it (the CSRF check asks for request.POST).
        too_large = errors.BodyTooLarge()
        return Response(api_error_body(too_large.code, too_large.message), status=too_large.status_code)
    if isinstance(exc, drf_exceptions.APIException):
        code = next((c for cls, c in DRF_CODES.items() if isinstance(exc, cls)), "bad_request")
        # Session auth has no WWW-Authenticate challenge, so DRF would answer 403.
        status = 401 if isinstance(exc, drf_exceptions.NotAuthenticated) else exc.status_code
        if isinstance(exc.detail, str):
            message, details = exc.detail, ""
        else:
            message, details = _("The request is not valid."), exc.detail
        return Response(api_error_body(code, message, details), status=status)
    return None
