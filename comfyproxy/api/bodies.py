"""Reading a workflow body safely: size first, then JSON, with every failure a QueueError."""

import json
import math

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from rest_framework.parsers import BaseParser

from comfyproxy import errors


class UnreadBody(BaseParser):
    """For DRF views that read the body with `read_json_body`: takes any media type and leaves
    the body unread. Without a parser, the CSRF check's look at request.POST made DRF refuse
    every browser's request with 415; with JSONParser it would read the body unbounded first."""

    media_type = "*/*"

    def parse(self, stream, media_type=None, parser_context=None):
        return {}


def _refuse_constant(token: str):
    raise ValueError(f"{token} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} does not fit a number")
    return value


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
        # Strict JSON only: NaN, Infinity and 1e999 would be stored, then refused by
        # the database or sent to ComfyUI as something no JSON parser reads.
        return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except ValueError:  # also bad UTF-8, and integers too long for Python to read
        raise errors.MalformedJSON() from None
    except RecursionError:
        raise errors.InvalidPrompt() from None
