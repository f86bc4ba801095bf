"""Reading a workflow body safely: size first, then JSON, with every failure a QueueError."""

import json

from django.conf import settings
from django.core.exceptions import RequestDataTooBig

from comfyproxy import errors


def read_json_body(request):
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > settings.COMFY_MAX_PROMPT_BYTES:
        raise errors.BodyTooLarge()
    try:
        raw = request.body
    except RequestDataTooBig:
        raise errors.BodyTooLarge() from None
    if len(raw) > settings.COMFY_MAX_PROMPT_BYTES:
        raise errors.BodyTooLarge()
    if not raw.strip():
        raise errors.MalformedJSON()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise errors.MalformedJSON() from None
    except RecursionError:
        raise errors.InvalidPrompt() from None
