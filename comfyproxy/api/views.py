"""The teaching system's queue API (/api/v1/comfy_proxy/...): one thin view per action."""

from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from comfyproxy import errors
from comfyproxy.api.bodies import UnreadBody, read_json_body
from comfyproxy.services import queue

ERROR_SCHEMA = inline_serializer(
    "Error",
    {"code": serializers.CharField(), "message": serializers.CharField(), "details": serializers.JSONField()},
)

TASK_SCHEMA = inline_serializer(
    "TaskState",
    {
        "task_id": serializers.UUIDField(),
        "prompt_id": serializers.UUIDField(),
        "status": serializers.ChoiceField(["queued", "processing", "completed", "failed", "cancelled"]),
        "reason": serializers.CharField(),
        "position": serializers.IntegerField(),
        "estimated_wait_seconds": serializers.IntegerField(),
        "message": serializers.CharField(),
        "after_own_run": serializers.BooleanField(
            help_text="Waiting for the student's own run (one at a time on their ComfyUI), not for a slot."
        ),
        "max_concurrent": serializers.IntegerField(),
        "processing_count": serializers.IntegerField(),
        "error": serializers.JSONField(allow_null=True),
        "node_errors": serializers.JSONField(),
    },
)

QUEUE_SCHEMA = inline_serializer(
    "QueueStatus",
    {
        "queue_length": serializers.IntegerField(),
        "processing_count": serializers.IntegerField(),
        "max_concurrent": serializers.IntegerField(),
        "available_slots": serializers.IntegerField(),
        "paused": serializers.BooleanField(),
    },
)

REFUSALS = {code: OpenApiResponse(ERROR_SCHEMA) for code in (400, 401, 403, 404, 409, 413, 415, 429, 503)}


class ExecuteView(APIView):
    """Queue a ComfyUI workflow (a ComfyUI /prompt body) on the student's running instance."""

    parser_classes = [UnreadBody]  # the body is read with size and depth limits in read_json_body

    @extend_schema(
        request={"application/json": {"type": "object", "properties": {"prompt": {"type": "object"}}}},
        responses={200: TASK_SCHEMA, **REFUSALS},
    )
    def post(self, request, username: str):
        content_type = request.content_type.split(";")[0].strip().lower()
        if content_type != "application/json":
            return Response(
                {"code": "unsupported_media_type", "message": str(errors.InvalidPrompt.message),
                 "details": "Content-Type must be application/json"},
                status=415,
            )
        body = read_json_body(request)
        return Response(queue.submit_and_describe(actor=request.user, username=username, body=body))


class TaskStatusView(APIView):
    @extend_schema(responses={200: TASK_SCHEMA, **REFUSALS})
    def get(self, request, task_id):
        task = queue.get_task_for(request.user, task_id)
        return Response(queue.describe_task(task))


class CancelView(APIView):
    @extend_schema(request=None, responses={200: TASK_SCHEMA, **REFUSALS})
    def post(self, request, task_id):
        task = queue.get_task_for(request.user, task_id)
        task = queue.cancel_task(actor=request.user, task=task)
        return Response(queue.describe_task(task))


class QueueStatusView(APIView):
    @extend_schema(responses={200: QUEUE_SCHEMA, **REFUSALS})
    def get(self, request):
        overview = queue.queue_overview()
        return Response(
            {
                "queue_length": overview.queue_length,
                "processing_count": overview.processing_count,
                "max_concurrent": overview.max_concurrent,
                "available_slots": overview.available_slots,
                "paused": overview.paused,
            }
        )
