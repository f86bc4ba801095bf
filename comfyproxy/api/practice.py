"""The practice API (/api/v1/practice/...): a student starts, stops and watches their own ComfyUI.

Each view acts on the logged-in user's own instance only; teachers manage other
students' instances in admin or with `manage.py comfy_instances`.
"""

from django.utils.translation import gettext as _
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from comfyproxy.api.views import ERROR_SCHEMA
from comfyproxy.gateway import comfy_entry_url
from comfyproxy.models import ComfyInstance
from comfyproxy.services import instances

INSTANCE_FIELDS = {
    "state": serializers.ChoiceField(["starting", "running", "stopping", "stopped", "failed"]),
    "running": serializers.BooleanField(),
    "port": serializers.IntegerField(allow_null=True),
    "url": serializers.CharField(allow_null=True, help_text="/comfyui/<username>/<port>/"),
    "iframe_url": serializers.CharField(
        allow_null=True, help_text="The ComfyUI origin's one-time entry URL, for the practice page's iframe."
    ),
    "direct_url": serializers.CharField(
        allow_null=True, help_text="The GPU server itself (teachers only; null for students)."
    ),
    "healthy": serializers.BooleanField(allow_null=True),
    "started_at": serializers.DateTimeField(allow_null=True),
    "message": serializers.CharField(),
}
INSTANCE_SCHEMA = inline_serializer("PracticeInstance", INSTANCE_FIELDS)
ACTION_SCHEMA = inline_serializer(
    "PracticeAction", {"status": serializers.ChoiceField(["success"]), **INSTANCE_FIELDS}
)
REFUSALS = {code: OpenApiResponse(ERROR_SCHEMA) for code in (401, 403, 409, 502, 503)}


def practice_state(request, instance: ComfyInstance | None) -> dict:
    """The instance as students see it, plus the iframe's entry URL for this viewer and session."""
    state = instances.describe_instance(instance)
    if not request.user.is_staff:
        # Students reach ComfyUI only through the teaching system; the GPU server's own
        # address is for teachers debugging (the key stays, as the seed's API has it).
        state["direct_url"] = None
    state["iframe_url"] = (
        comfy_entry_url(request.user, instance, request.session.session_key) if state["running"] else None
    )
    return state


class StartPracticeView(APIView):
    """Start the student's own ComfyUI (or return it if it already runs) and wait until it answers."""

    @extend_schema(request=None, responses={200: ACTION_SCHEMA, **REFUSALS})
    def post(self, request):
        instance = instances.start_instance(request.user)
        return Response(
            {
                "status": "success",
                **practice_state(request, instance),
                "message": _("Practice environment started."),
            }
        )


class StopPracticeView(APIView):
    """Stop the student's own ComfyUI; tasks still waiting for it fail with a clear reason."""

    @extend_schema(request=None, responses={200: ACTION_SCHEMA, **REFUSALS})
    def post(self, request):
        instance = instances.stop_instance(request.user)
        return Response(
            {
                "status": "success",
                **practice_state(request, instance),
                "message": _("Practice environment stopped."),
            }
        )


class PracticeStatusView(APIView):
    """The student's ComfyUI as it is now."""

    @extend_schema(responses={200: INSTANCE_SCHEMA, **REFUSALS})
    def get(self, request):
        return Response(practice_state(request, instances.instance_of(request.user)))


class PresenceView(APIView):
    """The practice page is open: keeps the student's ComfyUI from being stopped as idle."""

    @extend_schema(request=None, responses={200: INSTANCE_SCHEMA, **REFUSALS})
    def post(self, request):
        instances.record_activity(request.user)
        return Response(practice_state(request, instances.instance_of(request.user)))
